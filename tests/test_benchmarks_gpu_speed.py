"""benchmarks/gpu_speed.py runs end to end at smoke size on the CPU, so the GPU run it exists for cannot fail
on a typo; its correctness check (the device's Recall@K against FAISS's) is live."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

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


def test_a_failing_section_keeps_the_earlier_rows_and_the_later_sections_run(tmp_path, monkeypatch):
    """train and knn run before embed, which raises, and decode after it: train's and knn's rows are on disk
    when embed starts (read from inside it), embed's error is recorded, decode still runs, and the exit status
    says that a section failed."""
    results, numbers = tmp_path / "gpu_speed.md", tmp_path / "out.json"
    seen = {}

    def broken_embed(args, device, out, records):
        seen["table"] = results.read_text()
        seen["json"] = json.loads(numbers.read_text())
        raise RuntimeError("CUDA out of memory (pretend)")

    monkeypatch.setitem(gpu_speed.SECTION_RUNS, "embed", broken_embed)
    argv = ["--smoke", "--device", "cpu", "--sections", "train", "knn", "embed", "decode"]
    status = gpu_speed.main([*argv, "--results", str(results), "--json", str(numbers)])
    assert status == 1
    assert "train in memory, bf16 + channels_last" in seen["table"]
    assert "Recall@" in seen["table"]
    assert set(seen["json"]) >= {"train", "knn"} and seen["json"]["errors"] == []
    out = json.loads(numbers.read_text())
    assert out["errors"] == [{"section": "embed", "type": "RuntimeError", "message": "CUDA out of memory (pretend)"}]
    assert out["decode"]["pil_one_process"] > 0  # the section after the failing one ran
    table = results.read_text()
    measured = [row.split(" | ")[4] for row in table[len(gpu_speed.HEADER) :].splitlines()]
    assert measured[-2] == "section embed FAILED: RuntimeError: CUDA out of memory (pretend)"
    assert measured[-1].startswith("JPEG decode, Pillow")
    assert "embed" not in out  # nothing measured is made up for it


def test_without_a_failure_the_same_sections_exit_0(tmp_path):
    """The other side of the test above: its status of 1 comes from the failing section."""
    argv = ["--smoke", "--device", "cpu", "--sections", "knn", "decode", "--no-record"]
    assert gpu_speed.main([*argv, "--json", str(tmp_path / "out.json")]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["errors"] == []


@pytest.fixture
def tf32_on():
    """Both TF32 flags on (cuDNN's default; matmul's is off), restored afterwards (monkeypatch cannot: torch's
    flag modules refuse its undo)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_fp32_baselines_run_with_tf32_off_and_the_flags_come_back(tmp_path, monkeypatch, tf32_on):
    """The official training baseline and the fp32 embedding baseline see both TF32 flags off; the bf16 rows and
    everything after see the flags as they were (here: on)."""
    seen = []
    make_model = gpu_speed.make_model

    def instrumented(args, device, *, fast, compiled=False):
        seen.append([fast, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32])
        return make_model(args, device, fast=fast, compiled=compiled)

    monkeypatch.setattr(gpu_speed, "make_model", instrumented)
    numbers = tmp_path / "out.json"
    argv = ["--smoke", "--device", "cpu", "--sections", "train", "embed", "--no-record", "--json", str(numbers)]
    assert gpu_speed.main(argv) == 0
    # train: fp32, bf16; embed: fp32, bf16, bf16 from JPEG
    assert seen == [
        [False, False, False],
        [True, True, True],
        [False, False, False],
        [True, True, True],
        [True, True, True],
    ]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    out = json.loads(numbers.read_text())
    assert out["train"]["official_flags"] == {"matmul_allow_tf32": False, "cudnn_allow_tf32": False}


def test_jpegs_written_by_the_pool_equal_those_written_serially(tmp_path):
    serial = gpu_speed.write_jpegs(tmp_path / "serial", 10, (40, 30), per_class=3, processes=1)
    pooled = gpu_speed.write_jpegs(tmp_path / "pool", 10, (40, 30), per_class=3, processes=2)
    assert [(Path(r.path).relative_to(tmp_path / "serial"), r.label) for r in serial] == [
        (Path(r.path).relative_to(tmp_path / "pool"), r.label) for r in pooled
    ]
    assert [r.label for r in serial] == ["c00000"] * 3 + ["c00001"] * 3 + ["c00002"] * 3 + ["c00003"]
    contents = [Path(r.path).read_bytes() for r in serial]
    assert contents == [Path(r.path).read_bytes() for r in pooled]
    assert len(set(contents)) == 10  # every image its own
    # the class folders are a --dataset folder layout
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == [
        "c00000",
        "c00001",
        "c00002",
        "c00003",
        "jpegs.json",
    ]


def test_a_written_set_is_reused_and_a_different_one_rewritten(tmp_path):
    first = gpu_speed.write_jpegs(tmp_path, 4, (40, 30), processes=1)
    Path(first[0].path).write_bytes(b"marker")
    gpu_speed.write_jpegs(tmp_path, 4, (40, 30), processes=1)
    assert Path(first[0].path).read_bytes() == b"marker"  # the same set: kept as it is
    gpu_speed.write_jpegs(tmp_path, 4, (48, 30), processes=1)
    assert Path(first[0].path).read_bytes()[:2] == b"\xff\xd8"  # another size: written again


def test_the_sct_train_row_is_the_median_rate_past_each_epochs_first_steps(tmp_path):
    """Two epochs of 8 steps: the first 5 of each are start-up and left out; the row holds the median of the
    other 6 rates, computed here by hand."""
    rates = [1, 2, 3, 4, 5, 100, 200, 300, 9, 9, 9, 9, 9, 700, 400, 500]
    lines = [json.dumps({"iter": i, "epoch": i // 8, "images_per_s": rate}) for i, rate in enumerate(rates)]
    lines.insert(8, json.dumps({"epoch": 0, "recall@1": 0.5}))  # an evaluation record has no rate
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    numbers = tmp_path / "out.json"
    argv = ["--sections", "sct-train", "--train-run", str(tmp_path), "--no-record", "--json", str(numbers)]
    assert gpu_speed.main(argv) == 0
    out = json.loads(numbers.read_text())["sct_train"]
    assert out["steps"] == 6
    assert out["images_per_s"] == 350  # median of 100, 200, 300, 700, 400, 500


def test_the_sct_train_section_without_a_run_is_a_recorded_failure(tmp_path):
    numbers = tmp_path / "out.json"
    assert gpu_speed.main(["--sections", "sct-train", "--no-record", "--json", str(numbers)]) == 1
    assert json.loads(numbers.read_text())["errors"][0]["section"] == "sct-train"


@pytest.mark.parametrize("argv", [["--sections", "nope"], ["--jpeg-size", "10"]])
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit) as exit_info:
        gpu_speed.parse_args(argv)
    assert exit_info.value.code == 2
