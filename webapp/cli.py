"""``sct serve``: the web app under gunicorn (or Flask's development server with --dev-server)."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import sys
from collections.abc import Sequence

from flask import Flask

from core.argtypes import positive_int
from core.errors import UserValueError, as_user_error
from retrieval.cli_options import add_workers
from webapp import MiB, create_app
from webapp.query_store import default_query_store
from webapp.served import BATCH_UPLOADS, DEFAULT_MAX_BATCH

#: ONNX Runtime providers of the galleries that `sct serve` loads in gunicorn's master to check them.
CHECK_PROVIDERS = ("CPUExecutionProvider",)

EPILOG = """\
Examples:
  sct serve --index index_data/fashion-mnist
  sct serve --index index_data/cub --index index_data/cars --port 8080
  sct serve --index index_data/sop --host 0.0.0.0 --max-upload-mb 32   # reachable from other hosts
  sct serve --index index_data/sop --workers 4 --threads 2              # more processes on a bigger machine
  sct serve --index index_data/sop --host 0.0.0.0 --allowed-host search.example.org   # served under a name
  sct serve --index index_data/sop --port 5001 --query-store /srv/sct-queries   # heatmaps from either server
  sct serve --index index_data/sop --port 5002 --query-store /srv/sct-queries

  The first --index is the default gallery; each is named after its folder.

A search by upload names its query by the SHA-256 of the image and keeps the
image in the --query-store folder, so that any worker, and any server reading
the same folder, draws its heatmaps. By default that folder is under the temp
dir and shared by the servers of one user on one machine; servers on several
machines need a folder they all mount, or clients that POST the image to
/api/pair and /api/heatmap, which keeps nothing.

`sct serve` runs the app under gunicorn with gevent workers: slow or stalled
clients hold a greenlet, not a thread, so they cannot take the server down
(docs/RELIABILITY.md). The same with gunicorn's own command line, e.g. under a
process manager, needs that worker class and its timeouts:
  gunicorn -w 2 -k webapp.server.SlowClientSafeWorker --keep-alive 5 --no-control-socket -b 127.0.0.1:5000 'webapp:create_app(["index_data/NAME"])'
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="serve galleries in a web page and a JSON API",
        description="Serve one or more gallery folders (built by `sct index`): a search page at /, a pair "
        "view with similarity heatmaps at /pair, an evaluation page at /evaluation, and the JSON API "
        "/api/search, /api/pair, /api/heatmap, /api/items/<id>/image, /healthz, /metrics. A gallery folder "
        "rebuilt by `sct index` while serving is picked up at the next request, without a restart.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--index", action="append", required=True, metavar="DIR", help="gallery folder; repeat to serve several"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=16,
        metavar="MB",
        help="largest accepted upload in MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch",
        type=positive_int,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help="most images one search may send (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch-mb",
        type=float,
        metavar="MB",
        help=f"most MiB the images of one search may take together (default: {BATCH_UPLOADS} × --max-upload-mb)",
    )
    add_workers(parser, default=1, help="gunicorn worker processes (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="searches each worker decodes and embeds at once, in as many threads; each may hold "
        "one decoded upload of up to 40 megapixels (default: %(default)s)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the server may be reached by, besides IP addresses, localhost and this machine's name "
        "(other Host headers are refused, against DNS rebinding); .example.org allows that domain and its "
        "subdomains, * any name; repeat for several",
    )
    parser.add_argument(
        "--query-store",
        metavar="DIR",
        help="folder of the uploaded images of recent searches, for their heatmaps; give servers the same folder "
        f"to answer each other's query ids (default: {default_query_store()})",
    )
    parser.add_argument(
        "--query-store-mb",
        type=float,
        default=256,
        metavar="MB",
        help="most MiB the query store holds; the oldest images go first (default: %(default)s)",
    )
    parser.add_argument(
        "--query-store-hours",
        type=float,
        default=24,
        metavar="H",
        help="how long a search's query id stays valid after its last search (default: %(default)s)",
    )
    parser.add_argument("--dev-server", action="store_true", help="use Flask's development server instead of gunicorn")
    parser.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    """Load the galleries and serve them until interrupted; 2 when a gallery cannot be loaded."""
    for flag, value in (
        ("--max-upload-mb", args.max_upload_mb),
        ("--workers", args.workers),
        ("--threads", args.threads),
        ("--query-store-mb", args.query_store_mb),
        ("--query-store-hours", args.query_store_hours),
    ):
        if value <= 0:
            raise UserValueError(f"{flag} must be positive")
    if args.max_batch_mb is not None and args.max_batch_mb < args.max_upload_mb:
        raise UserValueError(
            f"--max-batch-mb ({args.max_batch_mb:g}) must be at least --max-upload-mb ({args.max_upload_mb:g})"
        )
    max_batch_bytes = None if args.max_batch_mb is None else int(args.max_batch_mb * MiB)

    def factory(providers: Sequence[str] | None = None) -> Flask:
        return create_app(
            args.index,
            max_upload_bytes=int(args.max_upload_mb * MiB),
            max_batch=args.max_batch,
            max_batch_bytes=max_batch_bytes,
            allowed_hosts=args.allowed_host,
            compute_slots=args.threads,
            query_store=args.query_store,
            query_store_bytes=int(args.query_store_mb * MiB),
            query_store_age_s=args.query_store_hours * 3600,
            providers=providers,
        )

    # Load once here, so a bad gallery is reported before any worker starts. Under gunicorn this copy only checks
    # the galleries, on the CPU: a CUDA session made before the fork would be inherited by every worker (CUDA
    # does not survive a fork); each worker loads its own with the default providers. The development server
    # serves this copy, so it gets the default providers too.
    with as_user_error(OSError):  # a gallery folder that cannot be read; mismatched files are UserErrors already
        app = factory(None if args.dev_server else CHECK_PROVIDERS)
    names = ", ".join(app.extensions["sct"].indexes)
    print(f"serving {names} at http://{args.host}:{args.port}/ (Ctrl+C to stop)", file=sys.stderr, flush=True)
    if args.dev_server:
        if not is_loopback(args.host):
            print(
                f"warning: Flask's development server on {args.host} is reachable from other hosts, and one "
                "client sending slowly can block it; drop --dev-server to serve with gunicorn",
                file=sys.stderr,
                flush=True,
            )
        app.run(host=args.host, port=args.port, threaded=True)
    else:
        # Free the check's ONNX Runtime sessions here, before gunicorn forks: a forked worker that inherits a
        # live session (a Flask app is a reference cycle, so `del` alone leaves it to the garbage collector)
        # hangs destroying it at exit, and each shutdown then waited for the master's 30 s timeout.
        del app
        gc.collect()
        from webapp.server import serve_with_gunicorn  # gunicorn and gevent: only where it serves

        serve_with_gunicorn(factory, host=args.host, port=args.port, workers=args.workers)
    return 0


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
