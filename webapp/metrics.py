"""Request counts and per-stage latencies, for ``GET /metrics`` in Prometheus's text format.

Under gunicorn (``sct serve``) every worker writes its values to files in the folder named by
``PROMETHEUS_MULTIPROC_DIR``, and ``GET /metrics``, whichever worker answers it, reports the sums over
all workers, including those that have since exited (prometheus_client's multiprocess mode; webapp.server
makes a fresh folder for each server). Without that variable (Flask's development server, test clients)
each ``Metrics`` keeps its values in its own registry, in memory. Every method is thread-safe.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
#: Upper bounds of the latency buckets, in seconds: a sub-millisecond render to a search waiting its turn.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Request counters, request and stage latency histograms, and the sizes of a worker's caches."""

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_DIR_VARIABLE) or None
        if self.multiprocess_dir is None:
            self._registry: CollectorRegistry | None = CollectorRegistry()
        else:
            if not os.path.isdir(self.multiprocess_dir):
                raise ValueError(f"{MULTIPROC_DIR_VARIABLE}={self.multiprocess_dir!r} is not a folder")
            _write_values_to_files()
            self._registry = None  # values go to the folder's files; GET /metrics reads them all back
        registry = self._registry
        self._requests = Counter(
            "sct_requests", "HTTP responses by endpoint and status code", ["endpoint", "code"], registry=registry
        )
        self._request_seconds = Histogram(
            "sct_request_duration_seconds",
            "time from a request's arrival at the app to its response, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._stage_seconds = Histogram(
            "sct_stage_duration_seconds",
            "time spent in each stage of a request: decode, embed, search, render, item_view, heatmap",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._sizes: list[tuple[Gauge, Callable[[], int]]] = []

    def count_request(self, endpoint: str, status: int) -> None:
        self._requests.labels(endpoint=endpoint, code=str(status)).inc()

    def observe_request(self, endpoint: str, seconds: float) -> None:
        self._request_seconds.labels(endpoint=endpoint).observe(seconds)

    def observe(self, stage: str, seconds: float) -> None:
        self._stage_seconds.labels(stage=stage).observe(seconds)

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

    def track_size(self, name: str, documentation: str, size: Callable[[], int]) -> None:
        """Report ``size()`` as the gauge ``sct_<name>``, updated after each request (see ``update_sizes``).

        Under gunicorn the gauge is the sum over the live workers ("livesum"): the entries all of them hold,
        which is what their memory use follows; a worker that exits stops counting.
        """
        gauge = Gauge(f"sct_{name}", documentation, multiprocess_mode="livesum", registry=self._registry)
        self._sizes.append((gauge, size))

    def update_sizes(self) -> None:
        for gauge, size in self._sizes:
            gauge.set(size())

    def exposition(self) -> tuple[bytes, str]:
        """The body of ``GET /metrics`` and its content type: every metric in Prometheus's text format."""
        self.update_sizes()
        if self._registry is not None:
            return generate_latest(self._registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST


def _write_values_to_files() -> None:
    """Make the metrics created from now on in this process keep their values in ``PROMETHEUS_MULTIPROC_DIR``.

    prometheus_client picks where values live when it is first imported; ``sct serve`` imports it before it
    sets the variable for its workers, so a worker picks again, as prometheus_client would have at import.
    """
    if prometheus_values.ValueClass is prometheus_values.MutexValue:
        prometheus_values.ValueClass = prometheus_values.get_value_class()


def count_requests(app: Flask, metrics: Metrics) -> None:
    """Count and time every response of ``app`` by endpoint ("unmatched" for unknown URLs) and status code, and
    update the cache sizes ``metrics`` tracks."""

    @app.before_request
    def start_clock() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def count(response: Response) -> Response:
        endpoint = request.endpoint or "unmatched"
        metrics.count_request(endpoint, response.status_code)
        started = g.get("metrics_started")
        if started is not None:  # a request refused before the app's handlers ran has no start time
            metrics.observe_request(endpoint, time.perf_counter() - started)
        metrics.update_sizes()
        return response


def milliseconds(seconds: float) -> float:
    """Seconds as milliseconds, rounded to the microsecond, for JSON."""
    return round(float(seconds) * 1000, 3)
