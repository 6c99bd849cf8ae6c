"""Run the app under gunicorn from ``sct serve``, the way it runs in production."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker


class GunicornServer(BaseApplication):
    """gunicorn with threaded workers, each building its own app from ``factory``.

    The app is built after the fork, in each worker, because ONNX Runtime
    sessions (and their thread pools) do not survive a fork.
    """

    def __init__(self, factory: Callable[[], Flask], options: dict[str, Any]) -> None:
        self.factory, self.options = factory, options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.factory()


class QuitSafeThreadWorker(ThreadWorker):
    """gunicorn's gthread worker, without a deadlock on quick shutdown (SIGINT, SIGQUIT).

    gunicorn's own ``handle_quit`` shuts its thread pool down inside the signal
    handler. When the signal lands while the main thread is inside
    ``tpool.submit`` (a keep-alive connection became readable), which holds the
    pool's lock, the handler waits for that lock forever: the worker hangs at
    "Worker exiting" until the master kills it after the graceful timeout, or,
    if the master is killed first, forever (found by benchmarks/load_test.py).
    Exiting without that call lets the interrupted ``with`` blocks release
    their locks; the interpreter's exit then stops the pool's threads.
    """

    def handle_quit(self, sig, frame) -> None:
        self.alive = False
        self.cfg.worker_int(self)
        time.sleep(0.1)
        sys.exit(0)


def serve_with_gunicorn(factory: Callable[[], Flask], *, host: str, port: int, workers: int, threads: int) -> None:
    GunicornServer(factory, {
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": QuitSafeThreadWorker,
        "timeout": 120,
        "preload_app": False,
        "accesslog": "-",
        "access_log_format": '%(h)s "%(r)s" %(s)s %(b)s %(M)sms',
    }).run()
