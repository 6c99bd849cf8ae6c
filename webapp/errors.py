"""Errors as JSON ``{"error": "..."}`` for the API, so a client always gets a reason; as a page for the pages."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, InternalServerError, RequestEntityTooLarge

if TYPE_CHECKING:
    from webapp.served import SearchSettings

#: Room in a request body for the form around images of the largest accepted size (boundaries, part headers,
#: the text fields), so that images of exactly the limit are accepted.
FORM_OVERHEAD_BYTES = 64 << 10


class ApiError(Exception):
    """A request the API refuses: ``status`` is the HTTP status, ``message`` says what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def quoted(text: str, limit: int = 64) -> str:
    """``repr`` of a value taken from a request, cut to ``limit`` characters, for error messages."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


def error_response(status: int, message: str) -> tuple[Response, int]:
    return jsonify(error=message), status


def register_error_handlers(app: Flask) -> None:
    """JSON errors for /api/*, /healthz and /metrics; the pages show an ApiError's message in a page."""

    @app.errorhandler(ApiError)
    def api_error(error: ApiError):
        if not _wants_json():
            return render_template("error.html", status=error.status, message=error.message), error.status
        return error_response(error.status, error.message)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error: RequestEntityTooLarge):
        limit = app.config["MAX_CONTENT_LENGTH"]
        length = request.content_length
        if length is not None and length <= limit:  # within the size limit, so one of the form's limits
            parts, field = app.config["MAX_FORM_PARTS"], app.config["MAX_FORM_MEMORY_SIZE"]
            return error_response(
                413,
                f"form too large: at most {parts} parts and {field:,} bytes per text "
                "field; send the images in the file field 'image'",
            )
        served = app.extensions["sct"]
        return error_response(413, f"{upload_too_large(served.max_upload_bytes)}, {batch_limit(served)}")

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if not _wants_json():
            return error
        return error_response(error.code or 500, error.description or error.name)

    @app.errorhandler(InternalServerError)
    def internal_error(error: InternalServerError):
        if not _wants_json():
            return error
        return error_response(500, "internal server error")


def drain_refused_bodies(app: Flask) -> None:
    """Read the rest of a request body that a handler refused without reading it (wrong content type, too many
    form parts, a missing field), up to the upload limit.

    gunicorn answers such a request with "Connection: keep-alive" but then drains at most 64 KiB of the unread
    body; beyond that it closes the connection, and the client's next request on it fails (found by
    benchmarks/fuzz_search.py). A body over the limit is not read: that connection closes after its 413.
    """

    @app.after_request
    def drain(response: Response) -> Response:
        if request.content_length is None or request.content_length > (app.config["MAX_CONTENT_LENGTH"] or 0):
            return response
        try:
            while request.stream.read(1 << 16):
                pass
        except Exception:  # a client that went away, or a stream werkzeug refuses: nothing left to keep alive
            pass
        return response


def upload_too_large(max_upload_bytes: int) -> str:
    """The 413 message of an image over the upload limit, whether werkzeug or the search handler finds it."""
    return f"upload too large: the limit is {_size(max_upload_bytes)} per image"


def batch_limit(served: SearchSettings) -> str:
    """The limits of a search of several images (webapp.served.SearchSettings ``served``), for 413 and 400 messages."""
    return f"at most {served.max_batch} images and {_size(served.max_batch_bytes)} in all per search"


def _size(count: int) -> str:
    return f"{count / (1 << 20):.3g} MiB" if count >= 1 << 20 else f"{count:,} bytes"


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path in ("/healthz", "/metrics")
