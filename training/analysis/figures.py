"""The report's figures, drawn with matplotlib's object API (no global pyplot state) and written atomically.

- triplet diagrams (paper Fig. 1 and 5): sampled (S_ap, S_an) pairs, hard ones red,
  with arrows to where the same triplets were one step later when the run saved it;
- the easiest-positive / hardest-negative diagram of a trained model (Fig. 7);
- hard-triplet fraction per iteration and Recall@1 per evaluation, runs overlaid (Fig. 6), with the iterations
  the trainer flagged as stalled shaded in the run's colour.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from core.atomic import atomic_file
from training.analysis.runs import Run, TripletSnapshot

HARD, EASY, DIAGONAL = "#d62728", "#1f77b4", "#444444"
MAX_ARROWS = 150  # more arrows than this turn into a smear
STALL_ALPHA = 0.12


def save(figure: Figure, path: Path, dpi: int = 110) -> Path:
    with atomic_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _similarity_axes(ax: Axes, lo: float) -> None:
    ax.plot([lo, 1], [lo, 1], color=DIAGONAL, lw=1, ls="--", zorder=1)
    ax.set_xlim(lo, 1.02)
    ax.set_ylim(lo, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("S_ap (anchor · positive)")
    ax.set_ylabel("S_an (anchor · negative)")


def _lower_limit(*arrays: np.ndarray | None) -> float:
    values = [a.min() for a in arrays if a is not None and a.size]
    return float(min(0.0, np.floor(min(values, default=0.0) * 10) / 10))


def draw_triplet_diagrams(run_label: str, snapshots: Sequence[TripletSnapshot], path: Path) -> Path:
    """One panel per saved iteration; arrows show one optimisation step where the run saved it."""
    figure = Figure(figsize=(4.2 * max(1, len(snapshots)), 4.6), layout="constrained")
    axes = figure.subplots(1, max(1, len(snapshots)), squeeze=False)[0]
    for ax, snap in zip(axes, snapshots):
        lo = _lower_limit(snap.s_ap, snap.s_an, snap.s_ap_after, snap.s_an_after)
        _similarity_axes(ax, lo)
        hard = snap.hard
        ax.scatter(snap.s_ap[~hard], snap.s_an[~hard], s=9, c=EASY, alpha=0.7, label="easy", zorder=2)
        ax.scatter(snap.s_ap[hard], snap.s_an[hard], s=9, c=HARD, alpha=0.7, label="hard (S_an > S_ap)", zorder=3)
        if snap.s_ap_after is not None:
            shown = np.linspace(0, len(snap.s_ap) - 1, min(MAX_ARROWS, len(snap.s_ap))).astype(int)
            ax.quiver(
                snap.s_ap[shown],
                snap.s_an[shown],
                (snap.s_ap_after - snap.s_ap)[shown],
                (snap.s_an_after - snap.s_an)[shown],
                angles="xy",
                scale_units="xy",
                scale=1,
                color=np.where(hard[shown], HARD, EASY),
                width=0.004,
                alpha=0.8,
                zorder=4,
            )
        ax.set_title(
            f"iteration {snap.iteration} (epoch {snap.epoch + 1})\n" f"hard {hard.mean():.0%} of {len(hard)} anchors",
            fontsize=10,
        )
    axes[0].legend(loc="lower right", fontsize=8)
    figure.suptitle(
        f"Triplet diagram: {run_label}"
        + ("  (arrows: one step)" if any(s.s_ap_after is not None for s in snapshots) else "")
    )
    return save(figure, path)


def draw_gallery_diagram(run_label: str, panels: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path) -> Path:
    """Each image's easiest positive against its hardest negative, per panel (training classes, unseen)."""
    figure = Figure(figsize=(4.6 * len(panels), 4.8), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, s_ap, s_an) in zip(axes, panels):
        _similarity_axes(ax, _lower_limit(s_ap, s_an))
        hard = s_an > s_ap
        size = 3 if len(s_ap) > 500 else 12
        ax.scatter(s_ap[~hard], s_an[~hard], s=size, c=EASY, alpha=0.35, lw=0, zorder=2)
        ax.scatter(s_ap[hard], s_an[hard], s=size, c=HARD, alpha=0.35, lw=0, zorder=3)
        ax.set_title(f"{title}\n{len(s_ap)} images, {hard.mean():.1%} with S_an > S_ap", fontsize=10)
    figure.suptitle(f"Easiest positive vs hardest negative: {run_label}")
    return save(figure, path)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def draw_hard_fraction_curves(runs: Sequence[Run], labels: Sequence[str], path: Path) -> Path:
    """Share of anchors whose hardest negative is closer than their easiest positive, per iteration."""
    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = figure.subplots()
    _shade_stalls(ax, runs)
    for run, label, style in zip(runs, labels, _styles(runs)):
        if not run.steps:
            continue
        iterations = np.array([s["iter"] for s in run.steps])
        fraction = np.array([s["hard_fraction"] for s in run.steps])
        window = max(1, len(fraction) // 100)
        ax.plot(iterations[window - 1 :], _smooth(fraction, window), label=label, lw=1.4, **style)
    _finish_curves(
        ax,
        "hard-triplet fraction (S_an > S_ap)",
        "Hard triplets per iteration (moving average over 1% of the run)",
        (0.0, 1.0),
    )
    return save(figure, path)


def draw_recall_curves(runs: Sequence[Run], labels: Sequence[str], path: Path) -> Path:
    """Recall@1 at each evaluation, against the iteration it was taken at."""
    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = figure.subplots()
    _shade_stalls(ax, runs)
    values: list[float] = []
    for run, label, style in zip(runs, labels, _styles(runs)):
        points = [(e["iter"], e["recall@1"]) for e in run.evaluations if "recall@1" in e]
        if points:
            x, y = zip(*points)
            values.extend(y)
            ax.plot(x, y, marker="o", ms=4, label=label, lw=1.4, **style)
    # zoomed on the data: runs of one study often differ by a few points of Recall@1
    limits = (max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.03)) if values else (0.0, 1.0)
    _finish_curves(ax, "Recall@1", "Recall@1 per evaluation", limits)
    return save(figure, path)


def _shade_stalls(ax: Axes, runs: Sequence[Run]) -> None:
    """Each run's stalled iterations (training.stall) as a band in its colour, with one legend entry for all."""
    label = "stalled (shaded)"
    for run, style in zip(runs, _styles(runs)):
        for first, last in run.stalled_ranges():
            ax.axvspan(first, last, color=style["color"], alpha=STALL_ALPHA, lw=0, label=label)
            label = "_stalled"  # a leading underscore keeps it out of the legend


def _styles(runs: Sequence[Run]) -> list[dict[str, str]]:
    """One colour per loss, and a different line style for each further run of the same loss (seeds)."""
    colours: dict[str, str] = {}
    seen: dict[str, int] = {}
    styles = []
    for run in runs:
        colour = colours.setdefault(run.loss, f"C{len(colours) % 10}")
        styles.append({"color": colour, "linestyle": ("-", "--", ":", "-.")[seen.get(run.loss, 0) % 4]})
        seen[run.loss] = seen.get(run.loss, 0) + 1
    return styles


def _finish_curves(ax: Axes, ylabel: str, title: str, limits: tuple[float, float]) -> None:
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_ylim(*limits)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title(title)
