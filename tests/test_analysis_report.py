"""`sct report` on two tiny real runs: figures, table numbers checked against the run files and a numpy recomputation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.metrics import mean_pairwise_similarity
from sct.cli import main
from tests.test_training_trainer import _images
from training.analysis.model_diagram import chance_recall_at_1, nearest_positive_and_negative, sample_by_class
from training.analysis.report import build_report
from training.analysis.runs import load_run, pick_iterations
from training.config import resolve_config
from training.trainer import Trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("report")
    data = _images(root / "data")
    made = []
    for loss in ("sct", "hn"):
        config = resolve_config(
            "folder",
            str(data),
            str(root / "runs" / loss),
            overrides=dict(
                loss=loss,
                arch="resnet18",
                pretrained="none",
                dim=8,
                image_size=16,
                epochs=2,
                batch_size=4,
                images_per_class=2,
                lr=0.002,  # AdamW from scratch at batch 4: 0.05 could diverge to NaN with another thread count
                workers=0,
                device="cpu",
                eval_every=1,
                triplets_every=1,
            ),
        )
        made.append(Trainer(config, progress=False).fit())
    return made


def test_run_files_are_read_back(runs: list[Path]) -> None:
    run = load_run(runs[0])
    lines = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert run.loss == "sct" and len(run.steps) + len(run.evaluations) == len(lines)
    assert [e["epoch"] for e in run.evaluations] == [0, 1]
    tail = run.steps[-max(1, round(0.05 * len(run.steps))) :]
    assert run.final_hard_fraction == pytest.approx(sum(s["hard_fraction"] for s in tail) / len(tail))
    saved = run.triplet_iterations()
    assert saved == list(range(len(run.steps)))
    snapshot = run.triplets(saved[-1])
    assert snapshot.s_ap_after is not None and snapshot.s_ap.shape == snapshot.s_an_after.shape


def test_report_writes_figures_table_and_a_self_contained_page(runs: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "sct (sct): R@1" in printed and "hn (hn): R@1" in printed and "report.html" in printed
    for name in (
        "triplets_sct.png",
        "triplets_hn.png",
        "model_sct.png",
        "model_hn.png",
        "hard_fraction.png",
        "recall.png",
    ):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300, name
    report = json.loads((out / "report.json").read_text())
    rows = {row["label"]: row for row in report["runs"]}
    for path in runs:
        last = [
            json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if '"type": "eval"' in line
        ][-1]
        row = rows[path.name]
        assert row["recall"]["recall@1"] == last["recall@1"] and row["map_at_r"] == last["map@r"]
        assert row["loss"] == path.name and row["evaluated_split"] == "test"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and 'src="triplets' not in html
    assert html.count("<tr>") == 1 + len(runs)


def test_mean_similarity_in_the_table_is_that_of_the_checkpoint(runs: list[Path], tmp_path: Path) -> None:
    """Recomputed here: embed the test split with best.pt in a plain torch loop and average the off-diagonal."""
    from training.analysis.report import build_report
    from training.export import load_checkpoint_model
    from training.trainer import preprocessing_of
    from training.transforms import eval_transform

    summaries = build_report([runs[0]], tmp_path / "r", device="cpu")
    model, config = load_checkpoint_model(runs[0] / "best.pt")
    transform = eval_transform(preprocessing_of(config))
    paths = sorted(Path(config.data_root).glob("class_[345]/*.png"))  # the folder layout's test classes
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        unit = torch.nn.functional.normalize(model(batch), dim=1).double().numpy()
    sims = unit @ unit.T
    expected = (sims.sum() - np.trace(sims)) / (len(paths) * (len(paths) - 1))
    assert summaries[0].mean_similarity == pytest.approx(expected, abs=1e-5)
    assert summaries[0].chance_recall_at_1 == pytest.approx(3 / 11)  # 3 classes × 4 images


def test_nearest_positive_and_negative_match_a_loop() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 5))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 4, size=40).astype(str)
    labels[0] = "alone"
    s_ap, s_an = nearest_positive_and_negative(emb, labels, block=7)
    for i in range(40):
        pos = [emb[i] @ emb[j] for j in range(40) if j != i and labels[j] == labels[i]]
        neg = [emb[i] @ emb[j] for j in range(40) if labels[j] != labels[i]]
        assert np.isnan(s_ap[i]) if not pos else s_ap[i] == pytest.approx(max(pos))
        assert s_an[i] == pytest.approx(max(neg))


def test_collapse_and_chance_measures() -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(30, 4))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T
    assert mean_pairwise_similarity(emb) == pytest.approx((sims.sum() - 30) / (30 * 29))
    collapsed = np.tile([[0.6, 0.8]], (10, 1))
    assert mean_pairwise_similarity(collapsed) == pytest.approx(1.0)
    labels = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2)
    loop = np.mean([sum(labels[j] == labels[i] for j in range(10) if j != i) / 9 for i in range(10)])
    assert chance_recall_at_1(labels) == pytest.approx(loop)


def test_sampling_spreads_the_budget_over_classes() -> None:
    from catalog import ImageRecord

    records = [ImageRecord(f"{c}/{i}.png", f"c{c}", "test") for c in range(10) for i in range(50)]
    chosen = sample_by_class(records, 100)
    assert len(chosen) == 100 and len({r.label for r in chosen}) == 10
    assert sample_by_class(records, 100) == chosen  # seeded


def test_iterations_snap_to_saved_ones() -> None:
    saved = [0, 50, 100, 150, 200, 250]
    assert pick_iterations(saved, [0, 120, 260]) == [0, 100, 250]
    assert pick_iterations(saved, None, count=3) == [0, 100, 250] or pick_iterations(saved, None, count=3) == [
        0,
        150,
        250,
    ]
    assert pick_iterations([], [5]) == []


def test_a_folder_that_is_not_a_run_is_named(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.yaml is missing" in err and str(tmp_path) in err


def test_report_without_checkpoints_draws_from_the_logs_only(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "logs-only"
    assert main(["report", str(runs[1]), "--out", str(out), "--no-model", "--iterations", "0", "3"]) == 0
    assert not (out / "model_hn.png").exists() and (out / "triplets_hn.png").is_file()
    row = json.loads((out / "report.json").read_text())["runs"][0]
    assert row["figures"] == {"triplets": "triplets_hn.png"}
    assert row["mean_similarity"] == load_run(runs[1]).final_evaluation["mean_similarity"]  # from the log


def test_typed_lines_other_than_evaluations_are_not_iterations(tmp_path: Path) -> None:
    """An HTL run logs "htl_tree" lines between iterations; they must not count as steps."""
    (tmp_path / "config.yaml").write_text("loss: htl\n")
    lines = [
        {"iter": 0, "loss": 1.0, "hard_fraction": 0.5},
        {"type": "htl_tree", "iter": 1, "d0": 0.3},
        {"iter": 1, "loss": 0.9, "hard_fraction": 0.25},
        {"type": "eval", "iter": 2, "recall@1": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = load_run(tmp_path)
    assert [s["iter"] for s in run.steps] == [0, 1] and len(run.evaluations) == 1
    assert run.final_hard_fraction == 0.25


def _synthetic_run(folder: Path, stall_lines: list[dict]) -> Path:
    """100 SCT iterations, evaluations at 49 and 99, and ``stall_lines`` where the trainer would have logged them."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("loss: sct\ndim: 8\nlr: 0.009\nlam: 1.0\n")
    lines = []
    for i in range(100):
        lines.append(
            {
                "iter": i,
                "epoch": i // 50,
                "loss": 1.0,
                "hard_fraction": 0.97 if i < 60 else 0.4,
                "mean_s_ap": 0.05,
                "mean_s_an": 0.3,
                "lr": 0.009,
                "images_per_s": 100.0,
            }
        )
        lines.extend(line for line in stall_lines if line["iter"] == i)
        if i in (49, 99):
            lines.append(
                {
                    "type": "eval",
                    "epoch": i // 50,
                    "iter": i + 1,
                    "split": "test",
                    "recall@1": 0.1 + i / 1000,
                    "map@r": 0.05,
                }
            )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


STALL_LINES = [
    {
        "type": "stall_start",
        "iter": 29,
        "epoch": 0,
        "kind": "stall",
        "start_iter": 10,
        "window": 20,
        "hard_fraction": 0.97,
        "s_ap": 0.05,
        "s_an": 0.3,
        "s_ap_rise": 0.0,
    },
    {
        "type": "stall_end",
        "iter": 63,
        "epoch": 1,
        "kind": "stall",
        "start_iter": 10,
        "window": 20,
        "hard_fraction": 0.84,
        "s_ap": 0.05,
        "s_an": 0.3,
        "s_ap_rise": 0.0,
    },
    {
        "type": "stall_start",
        "iter": 94,
        "epoch": 1,
        "kind": "collapse",
        "start_iter": 75,
        "window": 20,
        "hard_fraction": 0.98,
        "s_ap": 0.998,
        "s_an": 0.9995,
        "s_ap_rise": 0.001,
    },
]


def test_stall_lines_become_stretches_not_iterations(tmp_path: Path) -> None:
    run = load_run(_synthetic_run(tmp_path / "stalled", STALL_LINES))
    assert len(run.steps) == 100 and len(run.evaluations) == 2
    assert [(s.kind, s.start, s.end) for s in run.stalls] == [("stall", 10, 63), ("collapse", 75, None)]
    assert run.stalled_ranges() == [(10, 63), (75, 99)]  # the unfinished one runs to the last iteration


def test_report_marks_stalled_runs_and_shades_their_stretches(tmp_path: Path, capsys) -> None:
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    from training.analysis import figures

    stalled = _synthetic_run(tmp_path / "runs" / "stalled", STALL_LINES)
    clean = _synthetic_run(tmp_path / "runs" / "clean", [])
    out = tmp_path / "report"
    assert main(["report", str(stalled), str(clean), "--out", str(out), "--no-model"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "stalled at iterations: stall 10–63, collapse 75–end" in printed[0] and "stalled" not in printed[1]
    rows = {row["label"]: row for row in json.loads((out / "report.json").read_text())["runs"]}
    assert rows["stalled"]["stalls"] == [
        {"kind": "stall", "start": 10, "end": 63},
        {"kind": "collapse", "start": 75, "end": None},
    ]
    assert rows["clean"]["stalls"] == []
    html = (out / "report.html").read_text()
    stalled_row, clean_row = (html[html.index(f">{name}</td>") :].split("</tr>")[0] for name in ("stalled", "clean"))
    assert (
        '<span class="stalled">stall 10–63</span>' in stalled_row
        and '<span class="stalled">collapse 75–end</span>' in stalled_row
    )
    assert 'class="stalled"' not in clean_row

    # the curves shade exactly the stalled iterations, in the run's colour
    ax = Figure().subplots()
    figures._shade_stalls(ax, [load_run(clean), load_run(stalled)])
    assert [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches] == [(10, 63), (75, 99)]
    assert all(p.get_facecolor()[:3] == to_rgb("C0") for p in ax.patches)  # sct's colour
    unshaded = tmp_path / "unshaded"
    build_report([_synthetic_run(tmp_path / "again" / "stalled", []), clean], unshaded, analyse_model=False)
    for name in ("hard_fraction.png", "recall.png"):
        with Image.open(out / name) as shaded, Image.open(unshaded / name) as plain:
            assert shaded.size == plain.size and np.asarray(shaded).tobytes() != np.asarray(plain).tobytes(), name
