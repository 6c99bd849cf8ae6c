"""Hardening of every request and response: trusted Host names, security headers, no caching of query data.

The Host check blocks DNS rebinding: a web page on an attacker's domain whose
name then resolves to 127.0.0.1 would otherwise reach this server as a
same-origin site, and read its answers. Browsers send that domain as the Host,
so only names this server knows are accepted: any IP address, ``localhost``,
the machine's own names, and those given as ``allowed_hosts``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence

from flask import Flask, Response, request

from core.errors import UserValueError
from webapp.errors import ApiError, quoted

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
#: The pages load only this server's script, style sheet and images; the search page previews its query from
#: a blob: URL, and a data: thumbnail when it restores the last search.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
#: The endpoints whose answers (errors included) carry a user's query: a search, its pairs and their heatmaps.
QUERY_DATA_ENDPOINTS = frozenset({"api.search", "pair_api.pair", "pair_api.heatmap", "pages.pair"})

_HOST = re.compile(r"(?:\[(?P<ipv6>[^\]]*)\]|(?P<name>[^:\[\]]*))(?::[0-9]*)?")
_ALLOWED_HOST = re.compile(r"\*|\.?[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")


class TrustedHosts:
    """The host names a server answers to, besides IP addresses and ``localhost``.

    ``allowed`` holds names, ``.domain`` for a domain and all its subdomains, or ``*`` for any name.
    """

    def __init__(self, allowed: Sequence[str] = ()) -> None:
        if isinstance(allowed, str):
            raise TypeError(f"allowed hosts are a list of names, not one string: [{allowed!r}]")
        for entry in allowed:
            if not _ALLOWED_HOST.fullmatch(entry.lower()):
                raise UserValueError(f"an allowed host is a name, .domain or *, without a port; got {entry!r}")
        entries = [entry.lower().rstrip(".") for entry in allowed]
        self.any = "*" in entries
        self.domains = tuple(entry for entry in entries if entry.startswith("."))
        self.names = {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
        self.names.update(entry for entry in entries if not entry.startswith("."))

    def __contains__(self, host: str) -> bool:
        """Whether a Host header value (``name[:port]``, ``[ipv6][:port]``) is trusted."""
        match = _HOST.fullmatch(host)
        if match is None:
            return False
        if match["ipv6"] is not None:
            return _is_ip(match["ipv6"], ipaddress.IPv6Address)
        name = match["name"].lower().rstrip(".")
        if not name:
            return False
        return (
            self.any
            or name in self.names
            or _is_ip(name, ipaddress.IPv4Address)
            or any(name == domain[1:] or name.endswith(domain) for domain in self.domains)
        )


def install_security(app: Flask, allowed_hosts: Sequence[str] = ()) -> None:
    """Check each request's Host against ``allowed_hosts`` (see TrustedHosts) and add the security headers.

    The check is a ``before_request``, so it also runs before a routing redirect (``//`` → ``/``, whose
    Location names the Host) and before static files.
    """
    trusted = TrustedHosts(allowed_hosts)

    @app.before_request
    def check_host() -> None:
        # werkzeug's request.host is "" when the header holds characters no host name has
        if request.host not in trusted:
            host = request.headers.get("Host", request.host)
            raise ApiError(
                400,
                f"unknown host {quoted(host)}: this server answers to IP addresses, localhost and "
                "its machine's own name; to use another name, start it with --allowed-host NAME",
            )

    @app.after_request
    def add_headers(response: Response) -> Response:
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        if response.mimetype == "text/html":
            response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)
        if request.endpoint in QUERY_DATA_ENDPOINTS:
            response.headers.setdefault("Cache-Control", "no-store")
        return response


def _is_ip(text: str, kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True
