"""Run the app under gunicorn from ``sct serve``, the way it runs in production."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication


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


def serve_with_gunicorn(factory: Callable[[], Flask], *, host: str, port: int, workers: int, threads: int) -> None:
    GunicornServer(factory, {
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread",
        "timeout": 120,
        "preload_app": False,
        "accesslog": "-",
        "access_log_format": '%(h)s "%(r)s" %(s)s %(b)s %(M)sms',
    }).run()
