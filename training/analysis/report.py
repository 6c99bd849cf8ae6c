"""``sct report``: the paper's figures for one or more runs, as PNGs plus one self-contained HTML page.

Written into OUT: triplets_<run>.png per run, model_<run>.png per run with a
checkpoint, hard_fraction.png, recall.png, report.json (the comparison table's
numbers) and report.html (every figure inlined, so the page can be mailed).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from core.atomic import atomic_write_text
from training.analysis import figures
from training.analysis.runs import Run, load_run, pick_iterations

TABLE_KS = (1, 2, 4, 8)


@dataclass
class RunSummary:
    """One row of the comparison table."""

    label: str
    path: str
    loss: str
    dim: int | None
    lr: float | None
    lam: float | None
    evaluated_split: str | None
    recall: dict[str, float | None]
    map_at_r: float | None
    final_hard_fraction: float | None
    images_per_s: float | None
    mean_similarity: float | None = None  # over the evaluation split: the checkpoint's sample, else the last eval
    chance_recall_at_1: float | None = None
    stalls: list[dict[str, Any]] = field(default_factory=list)  # kind, start, end (None: until the run stopped)
    figures: dict[str, str] = field(default_factory=dict)


def run_labels(runs: list[Run]) -> list[str]:
    """Folder names, made unique with their parent folder where two runs share a name."""
    names = [r.name for r in runs]
    return [f"{r.path.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


def summarise(run: Run, label: str) -> RunSummary:
    final = run.final_evaluation or {}
    return RunSummary(
        label=label,
        path=str(run.path),
        loss=run.loss,
        dim=run.config.get("dim"),
        lr=run.config.get("lr"),
        lam=run.config.get("lam") if run.loss == "sct" else None,
        evaluated_split=final.get("split", "test") if final else None,
        recall={f"recall@{k}": final.get(f"recall@{k}") for k in TABLE_KS},
        map_at_r=final.get("map@r"),
        final_hard_fraction=run.final_hard_fraction,
        images_per_s=run.images_per_second,
        mean_similarity=final.get("mean_similarity"),
        stalls=[asdict(stall) for stall in run.stalls],
    )


def build_report(
    run_paths: list[str | Path],
    out: str | Path,
    *,
    iterations: list[int] | None = None,
    analyse_model: bool = True,
    data_root: str | None = None,
    max_images: int = 2000,
    device: str = "auto",
    title: str = "SCT Retrieval: run report",
) -> list[RunSummary]:
    """Draw every figure for ``run_paths`` into ``out``; returns the table rows (also in report.json)."""
    runs = [load_run(p) for p in run_paths]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs)
    summaries = []
    for run, label in zip(runs, labels):
        summary = summarise(run, label)
        slug = _slug(label)
        chosen = pick_iterations(run.triplet_iterations(), iterations)
        if chosen:
            path = figures.draw_triplet_diagrams(
                f"{label} ({run.loss})", [run.triplets(i) for i in chosen], out / f"triplets_{slug}.png"
            )
            summary.figures["triplets"] = path.name
        checkpoint = _checkpoint_of(run)
        if analyse_model and checkpoint is not None:
            from training.analysis.model_diagram import analyse_checkpoint

            panels = analyse_checkpoint(checkpoint, data_root=data_root, max_images=max_images, device=device)
            if panels:
                path = figures.draw_gallery_diagram(
                    f"{label} ({run.loss})", [(p.title, p.s_ap, p.s_an) for p in panels], out / f"model_{slug}.png"
                )
                summary.figures["model"] = path.name
                summary.mean_similarity = panels[-1].mean_similarity
                summary.chance_recall_at_1 = panels[-1].chance_recall_at_1
        summaries.append(summary)
    curve_labels = [f"{label} ({run.loss})" for run, label in zip(runs, labels)]
    shared = {
        "hard_fraction": figures.draw_hard_fraction_curves(runs, curve_labels, out / "hard_fraction.png").name,
        "recall": figures.draw_recall_curves(runs, curve_labels, out / "recall.png").name,
    }
    created = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    atomic_write_text(
        out / "report.json",
        json.dumps({"created": created, "runs": [vars(s) for s in summaries], "figures": shared}, indent=2) + "\n",
    )
    atomic_write_text(out / "report.html", _render_html(out, title, created, summaries, shared))
    return summaries


def _checkpoint_of(run: Run) -> Path | None:
    for name in ("best.pt", "last.pt"):
        if (run.path / name).is_file():
            return run.path / name
    return None


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _render_html(out: Path, title: str, created: str, summaries: list[RunSummary], shared: dict[str, str]) -> str:
    environment = Environment(
        loader=PackageLoader("training.analysis", "templates"), autoescape=select_autoescape(["html"])
    )
    environment.filters["num"] = _format_number
    environment.filters["stall"] = describe_stall
    template = environment.get_template("report.html")
    inline = {name: _data_uri(out / name) for s in summaries for name in s.figures.values()}
    inline.update({name: _data_uri(out / name) for name in shared.values()})
    return template.render(title=title, created=created, runs=summaries, shared=shared, inline=inline, ks=TABLE_KS)


def describe_stall(stall: dict[str, Any]) -> str:
    """ "stall 120–480", or "collapse 900–end" for one still under way when the run stopped."""
    return f"{stall['kind']} {stall['start']}–{'end' if stall['end'] is None else stall['end']}"


def _format_number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
