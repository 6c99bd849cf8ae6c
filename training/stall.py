"""Stall detection while training: the hard-triplet fraction pinned near 1 while the positives come no closer.

Trained from scratch on many classes, SCT can stall: nearly every triplet starts hard (S_an > S_ap), and on a hard
triplet SCT only pushes the negative away (λ·S_an), never pulling the positive in, so S_ap stays put, the hard
fraction stays near 1 and Recall@1 does not improve. With a stronger optimiser the same start can collapse instead,
S_ap and S_an both going to 1. The evaluation's collapse check (mean pairwise similarity) misses the first case,
whose similarities are low. ``StallDetector`` watches the per-iteration statistics of metrics.jsonl instead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

HARD_START, HARD_END = 0.9, 0.85  # window mean of the hard fraction that starts / ends a stall
COLLAPSE_START, COLLAPSE_END = 0.95, 0.9  # S_ap and S_an both above: a collapse / still one
MIN_RISE = 0.02  # a smaller rise of S_ap over the window never counts as rising, however quiet the data
START_ERRORS, END_ERRORS = 2.0, 5.0  # S_ap rises if its fitted rise exceeds MIN_RISE by this many standard errors
MIN_WINDOW, MAX_WINDOW = 20, 50
START, END = "stall_start", "stall_end"  # the "type" of the metrics.jsonl lines


def stall_window(total_iterations: int) -> int:
    """Iterations the detector averages over: a tenth of the run, at least 20 and at most 50. Fifty average out a
    batch's noise without waiting long in a run of thousands of iterations; a short run still gets a few windows,
    but none shorter than 20: over fewer, a noisy S_ap line too often looks like a recovery (see StallDetector).
    A run of fewer than 20 iterations is never checked."""
    return min(MAX_WINDOW, max(MIN_WINDOW, total_iterations // 10))


@dataclass(frozen=True)
class Window:
    """The last ``size`` iterations, from ``first`` to ``last``: mean hard fraction, mean S_ap and S_an, and the
    least-squares line of S_ap: its rise from the first iteration to the last and that rise's standard error."""

    size: int
    first: int
    last: int
    hard_fraction: float
    s_ap: float
    s_an: float
    s_ap_rise: float
    s_ap_rise_error: float

    def collapsed(self, level: float) -> bool:
        return self.s_ap > level and self.s_an > level

    def s_ap_rising(self, errors: float) -> bool:
        return self.s_ap_rise > MIN_RISE + errors * self.s_ap_rise_error


@dataclass(frozen=True)
class StallChange:
    """A stall starting (``started``) or ending, of ``kind`` "stall" or "collapse", which began at
    ``start_iteration``; ``window`` is the window that showed it."""

    started: bool
    kind: str
    start_iteration: int
    window: Window

    def log_line(self, epoch: int) -> dict[str, Any]:
        w = self.window
        return {
            "type": START if self.started else END,
            "iter": w.last,
            "epoch": epoch,
            "kind": self.kind,
            "start_iter": self.start_iteration,
            "window": w.size,
            "hard_fraction": w.hard_fraction,
            "s_ap": w.s_ap,
            "s_an": w.s_an,
            "s_ap_rise": w.s_ap_rise,
        }

    def message(self) -> str:
        w = self.window
        span = f"iterations {w.first}–{w.last}"
        if not self.started:
            return (
                f"note: the {self.kind} that began at iteration {self.start_iteration} ended at iteration "
                f"{w.last}: over {span} {w.hard_fraction:.0%} of triplets were hard, mean S_ap {w.s_ap:.3f} "
                f"(change {w.s_ap_rise:+.3f}), mean S_an {w.s_an:.3f}."
            )
        if self.kind == "collapse":
            return (
                f"warning: the embedding is collapsing: over {span}, {w.hard_fraction:.0%} of triplets were "
                f"hard (S_an > S_ap) with mean S_ap {w.s_ap:.3f} and S_an {w.s_an:.3f}, both near 1: every image "
                "maps to nearly the same point; from scratch this often passes. Things to try: a smaller --lr "
                "or another --optimizer, for SCT a warm start that pulls positives in (--sct-warmup 1, the "
                "default from scratch), --loss ep; see docs/hard-negatives/ZERO_SHOT.md."
            )
        return (
            f"warning: training has stalled: over {span}, {w.hard_fraction:.0%} of triplets were hard "
            f"(S_an > S_ap) and S_ap did not rise (mean S_ap {w.s_ap:.3f}, change {w.s_ap_rise:+.3f}; "
            f"mean S_an {w.s_an:.3f}): positives are not coming closer, and Recall@K often stops improving (watch the evaluations). "
            "Things to try: for SCT a warm start that pulls positives in (--sct-warmup 1, the default from "
            "scratch), --loss ep or shn, or a different --lr; see docs/hard-negatives/ZERO_SHOT.md."
        )


class StallDetector:
    """Fed one iteration's hard fraction, mean S_ap and mean S_an at a time; ``update`` returns a ``StallChange``
    when a stall starts or ends, else None.

    Over the last ``window`` iterations, a stall starts when the mean hard fraction is above 0.9 and either S_ap and
    S_an both average above 0.95 (kind "collapse"), or S_ap shows no rise (kind "stall"): the least-squares line
    of S_ap rises by no more than 0.02 plus 2 standard errors over the window. It ends when the mean hard fraction
    drops below 0.85, or when S_ap clearly rises (more than 0.02 plus 5 standard errors) and the similarities are
    not both above 0.9. Until a stall has ended another cannot start. The first ``window`` iterations are a grace
    period: a window that begins in them is not judged, because at initialisation nearly every triplet is hard for
    every loss (from scratch, S_ap often falls at first too) and the first window measures the start, not a trend.

    Why this rule:
    - Window means, not single values: a batch's hard fraction and mean S_ap jump by hundredths, in small batches
      by tenths, from one iteration to the next.
    - The pinned hard fraction is the symptom. S_ap's trend only excuses a run that is climbing out: at
      initialisation most triplets are hard too, but a learning run's S_ap rises within a few iterations (and its
      hard fraction falls). So a pinned window is a stall unless it shows evidence of a rise, measured against
      its own noise (the slope's standard error, from the residuals): noisy batches neither hide a stall nor fake
      a recovery. A line fitted to every point is less noisy than comparing the window's first and last quarters.
    - Hysteresis (start above 0.9, end below 0.85; start unless a 2-error rise, end only on a 5-error one): a
      hard fraction hovering at 0.9 or a noisy S_ap does not start and end stalls over and over. Windows slide
      one iteration at a time, so over a long run the largest of many overlapping fits is what could end a stall
      by chance: simulated pinned runs with S_ap noise up to 0.2 per iteration ended spuriously in none of 100
      runs of 200–3,000 iterations at 5 errors, against up to 6% at 4, and 8% at 5 with windows of 10.

    The state depends only on the values fed, so replaying a run's logged iterations restores it (resume).
    """

    def __init__(self, window: int) -> None:
        if window < 3:
            raise ValueError(f"a stall window needs at least 3 iterations to fit a line with an error, not {window}")
        self.window = window
        self._recent: deque[tuple[int, float, float, float]] = deque(maxlen=window)
        self._current: tuple[str, int] | None = None  # (kind, first iteration) of the stall under way
        self._fed = 0

    def update(self, iteration: int, hard_fraction: float, s_ap: float, s_an: float) -> StallChange | None:
        self._recent.append((iteration, hard_fraction, s_ap, s_an))
        self._fed += 1
        if self._fed < 2 * self.window:  # the grace period, then a full window after it
            return None
        w = self._summary()
        if self._current is None:
            if w.hard_fraction <= HARD_START:
                return None
            if w.collapsed(COLLAPSE_START):
                kind = "collapse"
            elif not w.s_ap_rising(START_ERRORS):
                kind = "stall"
            else:
                return None
            self._current = (kind, w.first)
            return StallChange(True, kind, w.first, w)
        if w.hard_fraction >= HARD_END and (w.collapsed(COLLAPSE_END) or not w.s_ap_rising(END_ERRORS)):
            return None
        kind, start = self._current
        self._current = None
        return StallChange(False, kind, start, w)

    def _summary(self) -> Window:
        iterations, hard, s_ap, s_an = (np.array(column, dtype=np.float64) for column in zip(*self._recent))
        x = np.arange(len(s_ap), dtype=np.float64)
        x -= x.mean()
        slope = float(x @ (s_ap - s_ap.mean()) / (x @ x))
        residuals = s_ap - s_ap.mean() - slope * x
        slope_error = float(np.sqrt(residuals @ residuals / (len(s_ap) - 2) / (x @ x)))
        span = len(s_ap) - 1
        return Window(
            size=len(s_ap),
            first=int(iterations[0]),
            last=int(iterations[-1]),
            hard_fraction=float(hard.mean()),
            s_ap=float(s_ap.mean()),
            s_an=float(s_an.mean()),
            s_ap_rise=slope * span,
            s_ap_rise_error=slope_error * span,
        )


class StallWatch:
    """A run's ``StallDetector``, fed each step's metrics.jsonl line as it is logged: a stall's start and end are
    logged through ``log`` (as ``StallChange.log_line``) and printed above the progress bar. Under torchrun only
    rank 0 watches (``active``), so a stall is reported once. On resume ``replay`` feeds it the step lines kept
    from before the checkpoint, which restores its state without reporting anything again."""

    def __init__(self, detector: StallDetector, log: Callable[[dict[str, Any]], None], *, active: bool = True) -> None:
        self.detector, self.log, self.active = detector, log, active

    def step(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        change = self._feed(record)
        if change is not None:
            self.log(change.log_line(record["epoch"]))
            tqdm.write(change.message())

    def replay(self, lines: Iterable[dict[str, Any]]) -> None:
        """Feed the step lines among ``lines`` (metrics.jsonl's, in order), silently."""
        if not self.active:
            return
        for line in lines:
            if line.get("type") is None:  # the detector's state is a function of the iterations logged
                self._feed(line)

    def _feed(self, line: dict[str, Any]) -> StallChange | None:
        return self.detector.update(line["iter"], line["hard_fraction"], line["mean_s_ap"], line["mean_s_an"])
