"""Simulated gradient fields of a triplet loss over (S_ap, S_an), the paper's Fig. 2.

Xuan et al. (ECCV 2020, "Hard negative examples are hard, but useful", eqs. 4-12)
model one triplet as three unit vectors in R³ whose cosines are S_ap (anchor to
positive) and S_an (anchor to negative); ``projection`` q sets how much of the
negative lies in the positive's plane, so S_pn = S_ap·S_an + q·√(1−S_ap²)·√(1−S_an²).
One SGD step of size α is taken on the unnormalised vectors, which are then
renormalised; the field is the change of the two cosines. The loss enters only
through two scalars: g_p, how hard the anchor is pulled to the positive, and
g_n, how hard it is pushed from the negative:

* NCA: g_p = g_n = (α/τ)·softmax([S_ap, S_an]/τ)[S_an].
* SCT (eq. 13): on hard triplets (S_an > S_ap) the loss is λ·S_an, so g_p = 0 and
  g_n = α·λ; easy triplets get NCA.

Entanglement p models that moving one pair also moves the other through the
shared network: ΔS_ap += p·S_ap·S_an·ΔS_an and ΔS_an += p·S_ap·S_an·ΔS_ap.

numpy only (matplotlib when drawing); no torch.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LOSSES = ("nca", "sct")

ArrayLike = Any  # float or numpy array


@dataclass(frozen=True)
class GradientField:
    """The change of (S_ap, S_an) after one step, on a grid×grid mesh over [0, 1]².

    Arrays are indexed [row, column] = [S_an index, S_ap index] (``np.meshgrid``'s
    "xy" layout): ``s_ap`` grows along columns, ``s_an`` along rows.
    """

    loss: str
    entanglement: float
    lr: float
    temperature: float
    lam: float
    projection: float
    s_ap: np.ndarray
    s_an: np.ndarray
    d_ap: np.ndarray
    d_an: np.ndarray

    @property
    def grid(self) -> int:
        return int(self.s_ap.shape[0])

    def parameters(self) -> dict[str, Any]:
        """The simulation's settings, JSON-ready."""
        return {
            "loss": self.loss,
            "entanglement": self.entanglement,
            "lr": self.lr,
            "temperature": self.temperature,
            "lam": self.lam,
            "projection": self.projection,
            "grid": self.grid,
        }

    def to_json(self, decimals: int = 6) -> dict[str, Any]:
        """Parameters plus the four grid arrays as nested lists (non-finite values as null)."""
        arrays = {name: _rounded(getattr(self, name), decimals) for name in ("s_ap", "s_an", "d_ap", "d_an")}
        return {**self.parameters(), **arrays}


# ---------------------------------------------------------------- validation


def _fmt(value: Any) -> str:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return f"{float(value):g}"
    return repr(value)


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} {_fmt(value)}: must be a finite number")
    return float(value)


def _check_unit_interval(name: str, value: Any) -> float:
    number = _check_real(name, value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} {_fmt(value)}: must be between 0 and 1")
    return number


def _check_positive(name: str, value: Any) -> float:
    number = _check_real(name, value)
    if number <= 0.0:
        raise ValueError(f"{name} {_fmt(value)}: must be greater than 0")
    return number


def check_parameters(
    *,
    loss: str,
    entanglement: float,
    lr: float,
    temperature: float,
    lam: float,
    projection: float,
    grid: int = 2,
    prefix: str = "",
) -> None:
    """Raise ValueError naming the first bad value; ``prefix`` ("--" for the CLI) goes before each name."""
    if loss not in LOSSES:
        raise ValueError(f"{prefix}loss {loss!r}: must be one of {', '.join(LOSSES)}")
    _check_unit_interval(f"{prefix}entanglement", entanglement)
    _check_unit_interval(f"{prefix}projection", projection)
    _check_positive(f"{prefix}lr", lr)
    _check_positive(f"{prefix}temperature", temperature)
    if _check_real(f"{prefix}lam", lam) < 0.0:
        raise ValueError(f"{prefix}lam {_fmt(lam)}: must be 0 or greater")
    if isinstance(grid, bool) or not isinstance(grid, numbers.Integral) or grid < 2:
        raise ValueError(f"{prefix}grid {_fmt(grid)}: must be an integer of at least 2")


def _check_similarities(s_ap: np.ndarray, s_an: np.ndarray) -> None:
    for name, values in (("s_ap", s_ap), ("s_an", s_an)):
        bad = ~np.isfinite(values) | (np.abs(values) > 1.0)
        if np.any(bad):
            raise ValueError(f"{name} {_fmt(float(values[bad].flat[0]))}: must be a cosine between -1 and 1")


# ---------------------------------------------------------------- the model


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1/(1+e^-x) without overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def gradient_coefficients(
    s_ap: ArrayLike, s_an: ArrayLike, *, loss: str, lr: float = 0.1, temperature: float = 1.0, lam: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(g_p, g_n): α times the loss's derivatives −∂L/∂S_ap and ∂L/∂S_an.

    For NCA, β = (α/τ)·e^{S_an/τ}/(e^{S_ap/τ}+e^{S_an/τ}) = (α/τ)·σ((S_an−S_ap)/τ).
    """
    s_ap, s_an = np.broadcast_arrays(np.asarray(s_ap, dtype=np.float64), np.asarray(s_an, dtype=np.float64))
    beta = (lr / temperature) * _sigmoid((s_an - s_ap) / temperature)
    if loss == "nca":
        return beta, beta.copy()
    if loss == "sct":
        hard = s_an > s_ap
        return np.where(hard, 0.0, beta), np.where(hard, lr * lam, beta)
    raise ValueError(f"loss {loss!r}: must be one of {', '.join(LOSSES)}")


def positive_negative_similarity(s_ap: ArrayLike, s_an: ArrayLike, projection: float = 0.0) -> np.ndarray:
    """S_pn of the R³ geometry: f_a = e1, f_p in the e1-e2 plane, f_n leaning q towards e2."""
    s_ap = np.asarray(s_ap, dtype=np.float64)
    s_an = np.asarray(s_an, dtype=np.float64)
    sin_ap = np.sqrt(np.clip(1.0 - s_ap**2, 0.0, None))
    sin_an = np.sqrt(np.clip(1.0 - s_an**2, 0.0, None))
    return s_ap * s_an + projection * sin_ap * sin_an


def _cosine(dot: np.ndarray, squared_norm_a: np.ndarray, squared_norm_b: np.ndarray) -> np.ndarray:
    """dot/(‖a‖‖b‖); NaN where a vector vanished (only possible for α·λ = 1 or similar)."""
    denominator = np.sqrt(np.clip(squared_norm_a, 0.0, None) * np.clip(squared_norm_b, 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0.0, dot / np.where(denominator > 0.0, denominator, 1.0), np.nan)


def raw_step(
    s_ap: np.ndarray, s_an: np.ndarray, s_pn: np.ndarray, g_p: np.ndarray, g_n: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(ΔS_ap, ΔS_an) of one renormalised step, before entanglement (closed forms of the dot products).

    f_a' = f_a + g_p·f_p − g_n·f_n,  f_p' = f_p + g_p·f_a,  f_n' = f_n − g_n·f_a.
    """
    dot_ap = s_ap + 2 * g_p + g_p**2 * s_ap - g_n * s_pn - g_n * g_p * s_an
    dot_an = s_an - 2 * g_n + g_p * s_pn - g_p * g_n * s_ap + g_n**2 * s_an
    norm_a = 1 + g_p**2 + g_n**2 + 2 * g_p * s_ap - 2 * g_n * s_an - 2 * g_p * g_n * s_pn
    norm_p = 1 + 2 * g_p * s_ap + g_p**2
    norm_n = 1 - 2 * g_n * s_an + g_n**2
    return _cosine(dot_ap, norm_a, norm_p) - s_ap, _cosine(dot_an, norm_a, norm_n) - s_an


def entangle(
    s_ap: np.ndarray, s_an: np.ndarray, d_ap: np.ndarray, d_an: np.ndarray, entanglement: float
) -> tuple[np.ndarray, np.ndarray]:
    """Each pair also moves by p·S_ap·S_an times the other pair's change."""
    coupling = entanglement * s_ap * s_an
    return d_ap + coupling * d_an, d_an + coupling * d_ap


def step(
    s_ap: ArrayLike,
    s_an: ArrayLike,
    *,
    loss: str,
    lr: float = 0.1,
    temperature: float = 1.0,
    lam: float = 1.0,
    projection: float = 0.0,
    entanglement: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(ΔS_ap_total, ΔS_an_total) at the given similarities; vectorised over numpy arrays."""
    check_parameters(
        loss=loss, entanglement=entanglement, lr=lr, temperature=temperature, lam=lam, projection=projection
    )
    s_ap, s_an = np.broadcast_arrays(np.asarray(s_ap, dtype=np.float64), np.asarray(s_an, dtype=np.float64))
    _check_similarities(s_ap, s_an)
    g_p, g_n = gradient_coefficients(s_ap, s_an, loss=loss, lr=lr, temperature=temperature, lam=lam)
    s_pn = positive_negative_similarity(s_ap, s_an, projection)
    d_ap, d_an = raw_step(s_ap, s_an, s_pn, g_p, g_n)
    return entangle(s_ap, s_an, d_ap, d_an, entanglement)


def simulate(
    loss: str,
    *,
    entanglement: float,
    lr: float = 0.1,
    temperature: float = 1.0,
    lam: float = 1.0,
    projection: float = 0.0,
    grid: int = 20,
) -> GradientField:
    """The field on a grid×grid mesh with S_ap and S_an each running over [0, 1]."""
    check_parameters(
        loss=loss, entanglement=entanglement, lr=lr, temperature=temperature, lam=lam, projection=projection, grid=grid
    )
    axis = np.linspace(0.0, 1.0, int(grid))
    s_ap, s_an = np.meshgrid(axis, axis, indexing="xy")
    d_ap, d_an = step(
        s_ap, s_an, loss=loss, lr=lr, temperature=temperature, lam=lam, projection=projection, entanglement=entanglement
    )
    return GradientField(
        loss=loss,
        entanglement=float(entanglement),
        lr=float(lr),
        temperature=float(temperature),
        lam=float(lam),
        projection=float(projection),
        s_ap=s_ap,
        s_an=s_an,
        d_ap=d_ap,
        d_an=d_an,
    )


def _rounded(values: np.ndarray, decimals: int) -> list:
    rounded = np.round(values, decimals)
    return [[float(v) if math.isfinite(v) else None for v in row] for row in rounded.tolist()]


# ---------------------------------------------------------------- drawing


def figure_name(loss: str, entanglement: float) -> str:
    """``gradient_field_{loss}_p{p:g}.png``, e.g. gradient_field_sct_p0.5.png."""
    return f"gradient_field_{loss}_p{float(entanglement):g}.png"


def title(field: GradientField) -> str:
    """E.g. "SCT (λ = 1), entanglement p = 0.5 (α = 0.1, τ = 1)"."""
    name = f"SCT (λ = {field.lam:g})" if field.loss == "sct" else field.loss.upper()
    settings = f"α = {field.lr:g}, τ = {field.temperature:g}"
    if field.projection:
        settings += f", q = {field.projection:g}"
    return f"{name}, entanglement p = {field.entanglement:g} ({settings})"


def _decorate(axes: Any, panel_title: str) -> None:
    """Unit square, shaded hard region above the diagonal, the diagonal itself, labels."""
    axes.fill([0.0, 0.0, 1.0], [0.0, 1.0, 1.0], color="tab:red", alpha=0.08, linewidth=0, zorder=0)
    axes.plot([0.0, 1.0], [0.0, 1.0], color="0.4", linestyle="--", linewidth=1, zorder=1)
    label_box = {"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1.5}
    axes.text(0.05, 0.97, "hard triplets", color="tab:red", fontsize=9, va="top", zorder=3, bbox=label_box)
    axes.text(0.95, 0.07, "easy triplets", color="0.35", fontsize=9, ha="right", zorder=3)
    axes.set_xlim(-0.05, 1.05)
    axes.set_ylim(-0.05, 1.05)
    axes.set_aspect("equal")
    axes.set_xlabel("S_ap (anchor–positive similarity)")
    axes.set_ylabel("S_an (anchor–negative similarity)")
    axes.set_title(panel_title)


def _largest_change(field: GradientField) -> float:
    """The largest finite |ΔS| over both panels (0 when there is none)."""
    changes = np.abs(np.concatenate([field.d_ap.ravel(), field.d_an.ravel()]))
    changes = changes[np.isfinite(changes)]
    return float(changes.max()) if changes.size else 0.0


def _quiver_scale(field: GradientField) -> float:
    """Data units per arrow unit, shared by both panels: the longest arrow spans 0.9 grid cells."""
    largest = _largest_change(field)
    spacing = 1.0 / (field.grid - 1)
    return float(largest / (0.9 * spacing)) if largest > 0 else 1.0


def build_figure(field: GradientField) -> Any:
    """A matplotlib Figure (Agg canvas, no pyplot) with the ΔS_ap and ΔS_an panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    scale = _quiver_scale(field)
    magnitude_ap = np.ma.masked_invalid(np.abs(field.d_ap))
    magnitude_an = np.ma.masked_invalid(np.abs(field.d_an))
    norm = Normalize(0.0, _largest_change(field) or 1.0)
    zeros = np.zeros_like(field.d_ap)
    common = {
        "angles": "xy",
        "scale_units": "xy",
        "scale": scale,
        "cmap": "viridis",
        "norm": norm,
        "width": 0.005,
        "zorder": 2,
    }
    arrows = left.quiver(field.s_ap, field.s_an, np.ma.masked_invalid(field.d_ap), zeros, magnitude_ap, **common)
    right.quiver(field.s_ap, field.s_an, zeros, np.ma.masked_invalid(field.d_an), magnitude_an, **common)
    _decorate(left, "ΔS_ap (positives)")
    _decorate(right, "ΔS_an (negatives)")
    figure.colorbar(arrows, ax=[left, right], label="|ΔS| after one step", shrink=0.85)
    figure.suptitle(title(field))
    return figure


def draw(field: GradientField, path: str | os.PathLike[str]) -> Path:
    """Write the field's PNG to ``path`` atomically (temp file in the same folder, then rename)."""
    from core.atomic import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = build_figure(field)
    with atomic_file(path) as temporary:
        figure.savefig(temporary, format="png")
    return path
