"""Run the app under gunicorn from ``sct serve``, the way it runs in production.

The worker class is gevent's: every connection is a greenlet, so clients that
send their headers or body slowly, or stall, hold a greenlet rather than one of
a few threads, and cannot keep ``/healthz`` or anyone else waiting. Headers must
arrive within ``HEADER_TIMEOUT_S`` (gunicorn's keepalive setting, which the
gevent worker applies to reading every request), and a connection idle for
``IDLE_TIMEOUT_S`` in the middle of a body or a response is closed. The heavy
work of each request runs in real threads (webapp.compute).

The workers share one fresh folder of metric files (webapp.metrics), made when
the server starts and removed when it stops; a worker that exits stops counting
in the gauges but its counts stay in the totals.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker
from prometheus_client import multiprocess

from webapp.metrics import MULTIPROC_DIR_VARIABLE

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 5
IDLE_TIMEOUT_S = 30
#: glibc's mallopt parameter number of M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3
#: Allocations from this size up get their own mapping, returned to the system when freed.
MMAP_THRESHOLD_BYTES = 1 << 20


class GunicornServer(BaseApplication):
    """gunicorn with the gevent worker below, each worker building its own app from ``factory``.

    The app is built after the fork, in each worker, because ONNX Runtime
    sessions (and their thread pools) do not survive a fork.
    """

    def __init__(self, factory: Callable[[], Flask], options: dict[str, Any]) -> None:
        self.factory, self.options = factory, options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings:  # settings that an older gunicorn lacks (e.g. its control socket) are moot
                self.cfg.set(key, value)

    def load(self) -> Flask:
        return boot_or_exit(self.factory)


class SlowClientSafeWorker(GeventWorker):
    """gunicorn's gevent worker with an idle timeout on every client socket (see the module docstring)."""

    def handle(self, listener, client, addr) -> None:
        # Instead of GeventWorker.handle's setblocking(1), which would clear the timeout: still blocking for
        # this greenlet, but a read or write that waits longer than the timeout fails and the connection closes.
        client.settimeout(IDLE_TIMEOUT_S)
        AsyncWorker.handle(self, listener, client, addr)


def boot_or_exit(factory: Callable[[], Flask]) -> Flask:
    """Build a worker's app; if that fails, say why and exit with gunicorn's boot-error status (3).

    gunicorn's master then stops the whole server, with a non-zero status,
    instead of restarting workers that cannot serve (e.g. after the gallery
    folder broke on disk and the worker was killed).
    """
    return_memory_when_freed()
    try:
        return factory()
    except Exception as exc:  # whatever stops the app from being built: the worker cannot serve
        log.error("worker %d cannot start: %s", os.getpid(), exc, exc_info=not isinstance(exc, (OSError, ValueError)))
        sys.exit(Arbiter.WORKER_BOOT_ERROR)


def exit_without_exit_handlers(arbiter: Arbiter, worker) -> None:
    """gunicorn's ``worker_exit`` hook: end a worker process with ``os._exit`` once gunicorn is done with it.

    At a normal exit, ONNX Runtime's exit handlers join a thread of a session
    that Python's finalisation never freed, and wait forever: every stop took
    the master's full timeout, and a worker that failed to boot hung, leaving
    a port that accepted connections and never answered. The status is the one
    the worker was exiting with. The master calls this hook too, for a worker
    already gone; there it does nothing.
    """
    if os.getpid() != worker.pid:
        return
    error = sys.exc_info()[1]  # called from gunicorn's ``finally``: the SystemExit under way, if any
    if isinstance(error, SystemExit):
        status = error.code if isinstance(error.code, int) else 1
    else:
        status = 0 if error is None else 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def forget_exited_worker(arbiter: Arbiter, worker) -> None:
    """gunicorn's ``child_exit`` hook (in the master): drop the gauges of a worker that exited from the sums."""
    if os.environ.get(MULTIPROC_DIR_VARIABLE):  # else each worker reported its own, and nothing is left to drop
        multiprocess.mark_process_dead(worker.pid)


@contextmanager
def metrics_folder() -> Iterator[str]:
    """A fresh, empty ``PROMETHEUS_MULTIPROC_DIR`` for the workers of one server, removed when the server stops.

    Set here in the master, before gunicorn forks, so every worker inherits it; a previous value is restored.
    """
    owner = os.getpid()
    previous = os.environ.get(MULTIPROC_DIR_VARIABLE)
    folder = tempfile.mkdtemp(prefix="sct-metrics-")
    os.environ[MULTIPROC_DIR_VARIABLE] = folder
    try:
        yield folder
    finally:
        if os.getpid() == owner:  # not a forked worker unwinding (they leave through os._exit anyway)
            if previous is None:
                del os.environ[MULTIPROC_DIR_VARIABLE]
            else:
                os.environ[MULTIPROC_DIR_VARIABLE] = previous
            shutil.rmtree(folder, ignore_errors=True)


def return_memory_when_freed() -> None:
    """Make glibc give large freed blocks back to the system at once.

    glibc raises its mmap threshold each time a mapped block is freed (up to
    32 MiB), after which the multi-megabyte buffers of decoded images come from
    the heap and stay in the process when freed: a burst of large uploads left
    a worker at 2.2 GiB. Setting the threshold turns that adjustment off.
    Nothing to do on other C libraries.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def serve_with_gunicorn(factory: Callable[[], Flask], *, host: str, port: int, workers: int) -> None:
    with metrics_folder():
        GunicornServer(
            factory,
            {
                "bind": f"{host}:{port}",
                "workers": workers,
                "worker_class": SlowClientSafeWorker,
                "keepalive": HEADER_TIMEOUT_S,
                "timeout": 120,
                "preload_app": False,
                "worker_exit": exit_without_exit_handlers,
                "child_exit": forget_exited_worker,
                "control_socket_disable": True,  # each server would otherwise listen on one shared path in $HOME
                "accesslog": "-",
                "access_log_format": '%(h)s "%(r)s" %(s)s %(b)s %(M)sms',
            },
        ).run()
