"""benchmarks/gpu_speed.py runs end to end at smoke size on the CPU, so the GPU run it exists for cannot fail
on a typo; its correctness check (the device's Recall@K against FAISS's) is live."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from benchmarks import gpu_speed
from retrieval.metrics import evaluate


def test_smoke_run_records_every_measurement(tmp_path, capsys):
    results, numbers = tmp_path / "gpu_speed.md", tmp_path / "out.json"
    status = gpu_speed.main(["--smoke", "--device", "cpu", "--results", str(results), "--json", str(numbers)])
    assert status == 0
    table = results.read_text()
    assert table.startswith(gpu_speed.HEADER)
    rows = table[len(gpu_speed.HEADER) :].splitlines()
    measured = [row.split(" | ")[4] for row in rows]
    assert len(rows) == 7, rows
    for start in (
        "train in memory, bf16 + channels_last",
        "train from JPEG",
        "the training loader alone",
        "embed in memory",
        "embed from JPEG",
        "Recall@",
        "JPEG decode, Pillow",
    ):
        assert any(m.startswith(start) for m in measured), start
    assert "equal to FAISS's" in table
    assert all(
        row.split(" | ")[1] == f"`python -m benchmarks.gpu_speed --smoke --device cpu --results {results} "
        f"--json {numbers}`"
        for row in rows
    )  # the command that reruns it
    out = json.loads(numbers.read_text())
    assert out["knn"]["agree_with_faiss"] is True
    assert all(
        rate > 0
        for rate in (
            out["train"]["official"],
            out["train"]["best_rate"],
            out["jpeg"]["training"],
            out["jpeg"]["loader_only"],
            out["embed"]["fp32"],
            out["embed"]["from_jpeg"],
        )
    )
    assert f"{100 * out['jpeg']['wait_fraction']:.0f}% of the time waiting for the loader" in table
    # the recorded recall is the one a FAISS evaluation of the same vectors gives
    args = gpu_speed.parse_args(["--smoke"])
    vectors, labels = gpu_speed.knn_data(args.knn_items, args.knn_dim)
    expected = evaluate(vectors, labels, ks=tuple(out["knn"]["ks"]))
    assert {int(k): v for k, v in out["knn"]["recall"].items()} == {
        k: expected[f"recall@{k}"] for k in out["knn"]["ks"]
    }
    assert "train in memory" in capsys.readouterr().out  # the summary printed last


def test_the_wait_fraction_is_the_time_spent_waiting_for_batches(tmp_path, monkeypatch):
    """Every batch comes 50 ms late and every training step takes 50 ms more: the recorded share of the time
    spent waiting for the loader must hold the first delays and none of the second."""
    delay = 0.05
    forever, training_step = gpu_speed.forever, gpu_speed.training_step

    def late(loader):
        for batch in forever(loader):
            time.sleep(delay)
            yield batch

    def slow_step(*args, **kwargs):
        step = training_step(*args, **kwargs)

        def slower(*step_args):
            time.sleep(delay)
            step(*step_args)

        return slower

    monkeypatch.setattr(gpu_speed, "forever", late)
    monkeypatch.setattr(gpu_speed, "training_step", slow_step)
    numbers = tmp_path / "out.json"
    assert (
        gpu_speed.main(["--smoke", "--device", "cpu", "--sections", "jpeg", "--no-record", "--json", str(numbers)]) == 0
    )
    jpeg = json.loads(numbers.read_text())["jpeg"]
    args = gpu_speed.parse_args(["--smoke"])
    steps = 2 * args.steps  # the timed steps of the JPEG run
    elapsed = steps * args.batch_size / jpeg["training"]
    waited = jpeg["wait_fraction"] * elapsed
    assert waited >= steps * delay
    assert elapsed - waited >= steps * delay


def test_a_device_search_that_disagrees_with_faiss_fails_the_run(tmp_path, monkeypatch):
    class Wrong(gpu_speed.TorchKnn):
        def __call__(self, *args, **kwargs):
            scores, ids = super().__call__(*args, **kwargs)
            return scores, np.roll(ids, 1, axis=0)  # every query gets another query's neighbours

    monkeypatch.setattr(gpu_speed, "TorchKnn", Wrong)
    assert gpu_speed.main(["--smoke", "--device", "cpu", "--sections", "knn", "--no-record"]) == 1


@pytest.mark.parametrize("argv", [["--sections", "nope"], ["--jpeg-size", "10"]])
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit) as exit_info:
        gpu_speed.parse_args(argv)
    assert exit_info.value.code == 2
