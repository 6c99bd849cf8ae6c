"""benchmarks/zero_shot_study.py: the commands it runs and the table it makes from finished runs' metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import zero_shot_study as study


def _run(folder: Path, recall: float, events: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"")
    (folder / "seconds.txt").write_text("120\n")
    lines = [
        {"iter": i, "epoch": 0, "loss": 1.0, "hard_fraction": 0.5, "mean_s_ap": 0.1, "mean_s_an": 0.2}
        for i in range(30)
    ]
    lines += [{"type": kind, "iter": 10 + i} for i, kind in enumerate(events)]
    lines.append(
        {"type": "eval", "iter": 30, "recall@1": 0.0, "recall@2": 0.0, "recall@4": 0.0, "recall@8": 0.0, "map@r": 0.0}
    )  # an earlier evaluation: the last one counts
    lines.append(
        {
            "type": "eval",
            "iter": 30,
            "recall@1": recall,
            "recall@2": recall + 0.1,
            "recall@4": 0.7,
            "recall@8": 0.8,
            "map@r": recall / 4,
        }
    )
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder


def test_a_run_without_a_final_evaluation_is_not_finished(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"iter": 0, "loss": 1.0}) + "\n")
    assert study.final_result(tmp_path / "run") is None  # no checkpoint, no evaluation: run it again
    assert study.final_result(tmp_path / "absent") is None


def test_the_table_gives_mean_and_spread_over_seeds_and_which_runs_stalled(tmp_path: Path) -> None:
    recalls = [0.40, 0.43, 0.47]
    events = [["stall_start", "stall_end"], [], ["stall_start"]]
    runs = [
        {"seed": seed, **study.final_result(_run(tmp_path / f"sct-seed{seed}", recall, stall))}
        for seed, recall, stall in zip((1, 2, 3), recalls, events)
    ]
    assert [r["stalls"] for r in runs] == [1, 0, 1]
    assert [r["stalled_at_the_end"] for r in runs] == [False, False, True]
    row = study.table({"glyphs": {"sct": runs}}).splitlines()[2]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:3] == ["glyphs", "sct", "3"]
    assert cells[3] == f"{np.mean(recalls):.3f} ± {np.std(recalls):.3f}"
    assert cells[7] == f"{np.mean(recalls) / 4:.3f} ± {np.std(np.array(recalls) / 4):.3f}"
    assert cells[8] == "2 of 3 (1)" and cells[9] == "120"


@pytest.mark.parametrize("loss", ["sct", study.UNTRAINED])
def test_every_run_uses_the_defaults_from_scratch_and_names_no_learning_rate(loss: str) -> None:
    command = study.run_command(Path("data/glyphs"), Path("runs/x"), loss, 2, [])
    assert command[:2] == ["sct", "train"] and "--pretrained" in command
    assert command[command.index("--pretrained") + 1] == "none" and command[command.index("--seed") + 1] == "2"
    if loss == study.UNTRAINED:  # the untrained network: one epoch at lr 0 (the last --epochs wins)
        assert command[-4:] == ["--lr", "0", "--epochs", "1"]
    else:
        assert "--lr" not in command and "--optimizer" not in command and command[command.index("--loss") + 1] == "sct"
