"""``sct serve`` stays up under slow and stalled clients, and fails loud instead of hanging.

Before, four clients sending slowly (as many as the worker's threads) made every /healthz probe time out; a
gallery broken on disk was only logged while /healthz said "ok"; and when the worker then died, its replacement
hung in ONNX Runtime's exit handlers, so the port accepted connections and never answered."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from benchmarks.fixtures.hostile_inputs import search_form
from benchmarks.load_test import build_color_gallery, running_server
from tests.test_webapp_api import png_bytes

THREADS = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serving")


def _healthz(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url + "/healthz", timeout=timeout) as response:
        return json.loads(response.read())


def _slow_headers(port: int, stop: threading.Event) -> None:
    """Send a request line and headers one byte every 0.3 s."""
    with socket.create_connection(("127.0.0.1", port)) as connection:
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"p" * 200:
                if stop.is_set():
                    return
                connection.sendall(bytes([byte]))
                time.sleep(0.3)
        except OSError:  # the server closed the connection: what it should do
            pass


def _slow_body(port: int, stop: threading.Event, *, stall: bool) -> None:
    """Send the headers of a search whose body then trickles one byte every 0.3 s, or never comes."""
    body = search_form(png_bytes()).body
    with socket.create_connection(("127.0.0.1", port)) as connection:
        try:
            connection.sendall(
                b"POST /api/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; "
                b"boundary=hostile-boundary-7d1f\r\nContent-Length: %d\r\n\r\n" % len(body)
            )
            for byte in body:
                if stop.wait(0.3):
                    return
                if not stall:
                    connection.sendall(bytes([byte]))
        except OSError:
            pass


def test_more_slow_clients_than_threads_do_not_stop_healthz_or_searches(root):
    model_root = root / "slow"
    build_color_gallery(model_root, model_root / "colors")
    with running_server([model_root / "colors"], threads=THREADS, log_dir=root) as server:
        stop = threading.Event()
        clients = [threading.Thread(target=_slow_headers, args=(server.port, stop)) for _ in range(3 * THREADS)]
        clients += [
            threading.Thread(target=_slow_body, args=(server.port, stop), kwargs={"stall": stall})
            for stall in (False, True)
            for _ in range(3 * THREADS)
        ]
        for client in clients:
            client.start()
        try:
            time.sleep(1.0)  # every slow client is connected and has started sending
            slowest = 0.0
            for _ in range(10):
                started = time.monotonic()
                assert _healthz(server.url, timeout=5)["status"] == "ok"
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.5)
            form = search_form(png_bytes(), k="3")
            request = urllib.request.Request(
                server.url + "/api/search", data=form.body, headers={"Content-Type": form.content_type}
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200 and len(json.loads(response.read())["results"]) == 3
        finally:
            stop.set()
            for client in clients:
                client.join()
        assert slowest < 1.0, f"/healthz took {slowest:.2f} s with {len(clients)} slow clients"
        assert server.process.poll() is None


def _break_items(folder: Path) -> bytes:
    """Rewrite items.csv without its last row (atomically, as an edit would); returns the good file."""
    items = folder / "items.csv"
    good = items.read_bytes()
    broken = folder / "items.csv.tmp"
    broken.write_bytes(good[: good.rstrip(b"\n").rfind(b"\n") + 1])
    os.replace(broken, items)
    return good


def test_a_gallery_broken_on_disk_is_reported_then_a_worker_that_cannot_load_it_stops_the_server(root):
    model_root = root / "broken"
    build_color_gallery(model_root, model_root / "colors")
    folder = model_root / "colors"
    with running_server([folder], threads=THREADS, log_dir=root) as server:
        good = _break_items(folder)
        health = _healthz(server.url)
        assert health["status"] == "degraded", health
        assert "colors" in health["problems"][0] and "items.csv" in health["problems"][0]
        assert health["indexes"][0]["count"] == 24  # the last good gallery is still served

        (folder / "items.csv.tmp").write_bytes(good)
        os.replace(folder / "items.csv.tmp", folder / "items.csv")
        assert _healthz(server.url)["status"] == "ok"  # repaired: the folder loads again

        _break_items(folder)
        assert _healthz(server.url)["status"] == "degraded"
        worker = server.pids()[1]
        os.kill(worker, signal.SIGKILL)  # as the out-of-memory killer would
        try:
            server.process.wait(timeout=60)
        except Exception:
            pytest.fail(f"the server neither recovered nor exited after its worker died:\n{server.log_tail()}")
        assert server.process.returncode not in (0, None)
        log = server.log.read_text()
        assert "cannot start" in log and "items.csv" in log
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
