"""Where a request's CPU-heavy steps run: at most ``slots`` at once per server process, off the event loop.

``sct serve`` runs gunicorn's gevent worker: each connection is a greenlet on
one event loop, so a slow or stalled client costs a greenlet, never a thread,
and ``/healthz`` keeps answering. Decoding an upload, running the model, FAISS
and drawing heatmaps would block that loop, so they run in a pool of ``slots``
real threads (Pillow, onnxruntime and FAISS release the GIL). The same bound
caps how many uploads are decoded at once, and so the memory a burst of large
images can take: at most ``slots`` decodes of at most ``max_pixels`` each.

Outside gevent (Flask's test client, the development server, a threaded WSGI
server) the work runs in the calling thread, still at most ``slots`` at once.
A request that waits longer than ``wait_s`` for a slot is refused with 503.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TypeVar

from webapp.errors import ApiError

T = TypeVar("T")


class ComputePool:
    """Runs callables with bounded concurrency; under gevent, in real threads so the event loop stays free."""

    def __init__(self, slots: int, *, wait_s: float = 30.0) -> None:
        if slots < 1:
            raise ValueError(f"compute slots must be at least 1, got {slots}")
        self.slots, self.wait_s = slots, wait_s
        # Made in the serving process: under gevent (patched by the worker before the app is built) this is a
        # cooperative semaphore, so waiting for a slot parks only the waiting greenlet.
        self._free = threading.BoundedSemaphore(slots)
        self._threads = _gevent_thread_pool(slots)

    def run(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` in a free slot; its exceptions propagate. It must not use Flask's request context."""
        if not self._free.acquire(timeout=self.wait_s):
            raise ApiError(503, f"the server is busy: no free slot for {self.wait_s:g} s; try again shortly")
        try:
            if self._threads is None:
                return function(*args)
            result, error = self._threads.apply(_outcome, (function, args))
        finally:
            self._free.release()
        if error is not None:
            raise error
        return result


def _outcome(function: Callable[..., T], args: tuple) -> tuple[T | None, BaseException | None]:
    """``function(*args)`` as (result, None) or (None, its exception): gevent's pool would print the traceback of
    every exception raised in a thread, such as each unreadable upload, before passing it on."""
    try:
        return function(*args), None
    except Exception as error:
        return None, error


def _gevent_thread_pool(size: int):
    """A gevent pool of ``size`` real threads when this process runs under gevent's monkey-patching, else None."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return None
    from gevent.threadpool import ThreadPool

    return ThreadPool(size)
