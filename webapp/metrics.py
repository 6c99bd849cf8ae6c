"""Request counts and per-stage latencies of one worker, for ``GET /metrics``.

Counts are totals since the worker started; latency statistics cover the last
``window`` observations of each stage, so memory stays bounded. Every method
is thread-safe (requests run in greenlets and in compute threads at once).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from flask import Flask, Response, request


class Metrics:
    """Counters and latency windows of one worker process."""

    def __init__(self, window: int = 1000) -> None:
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")
        self.window = window
        self.started = time.time()
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str]] = Counter()  # (endpoint, "2xx") → count
        self._stage_counts: Counter[str] = Counter()
        self._stage_seconds: dict[str, deque[float]] = {}

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._requests[endpoint, f"{status // 100}xx"] += 1

    def observe(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._stage_counts[stage] += 1
            self._stage_seconds.setdefault(stage, deque(maxlen=self.window)).append(seconds)

    @contextmanager
    def timed(self, stage: str, timings: dict[str, float] | None = None) -> Iterator[None]:
        """Observe the ``with`` block's duration as ``stage`` (and store it in ``timings``, in seconds).

        A block that raises is not observed: the statistics describe work that was done.
        """
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.observe(stage, seconds)
        if timings is not None:
            timings[stage] = seconds

    def snapshot(self) -> dict[str, Any]:
        """The JSON of ``GET /metrics``."""
        with self._lock:
            requests = dict(self._requests)
            counts = dict(self._stage_counts)
            recent = {stage: np.array(seconds) for stage, seconds in self._stage_seconds.items()}
        by_endpoint: dict[str, dict[str, int]] = {}
        for (endpoint, status_class), count in sorted(requests.items()):
            by_endpoint.setdefault(endpoint, {})[status_class] = count
        latency = {
            stage: {
                "count": counts[stage],
                "window": len(seconds),
                "mean_ms": milliseconds(seconds.mean()),
                "p50_ms": milliseconds(np.percentile(seconds, 50)),
                "p99_ms": milliseconds(np.percentile(seconds, 99)),
            }
            for stage, seconds in sorted(recent.items())
        }
        return {"uptime_s": round(time.time() - self.started, 1), "requests": by_endpoint, "latency": latency}


def count_requests(app: Flask, metrics: Metrics) -> None:
    """Count every response of ``app`` by endpoint ("unmatched" for unknown URLs) and status class."""

    @app.after_request
    def count(response: Response) -> Response:
        metrics.count_request(request.endpoint or "unmatched", response.status_code)
        return response


def milliseconds(seconds: float) -> float:
    """Seconds as milliseconds, rounded to the microsecond, for JSON."""
    return round(float(seconds) * 1000, 3)
