"""The simulated gradient fields of ``sct simulate-gradients`` (the paper's Fig. 2, eqs. 4-12).

The closed forms are checked against an independent torch autograd step on the
explicit R³ vectors; the qualitative claims of the paper are checked on the
formulas; the CLI is checked for files, fields.json, help text and errors.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.analysis import gradient_field, simulate_cli
from training.analysis.gradient_field import GradientField, simulate, step

ROOT = Path(__file__).resolve().parents[1]

# hard (S_an > S_ap), easy, on the diagonal, and on the grid's edges
POINTS = [(0.3, 0.8), (0.9, 0.95), (0.05, 0.99), (0.8, 0.2), (0.99, 0.0), (0.5, 0.5), (0.0, 1.0), (1.0, 0.0)]


def torch_step(
    s_ap: float,
    s_an: float,
    *,
    loss: str,
    lr: float,
    temperature: float,
    lam: float,
    projection: float,
    entanglement: float,
) -> tuple[float, float]:
    """One explicit SGD step with autograd on three R³ vectors, renormalised, then entangled."""
    import torch

    def leaf(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, requires_grad=True)

    sin_ap, sin_an = math.sqrt(1 - s_ap**2), math.sqrt(1 - s_an**2)
    f_a = leaf([1.0, 0.0, 0.0])
    f_p = leaf([s_ap, sin_ap, 0.0])
    f_n = leaf([s_an, sin_an * projection, sin_an * math.sqrt(1 - projection**2)])
    dot_ap, dot_an = f_a @ f_p, f_a @ f_n
    if loss == "sct" and s_an > s_ap:
        objective = lam * dot_an
    else:
        objective = -torch.log_softmax(torch.stack([dot_ap, dot_an]) / temperature, dim=0)[0]
    objective.backward()
    with torch.no_grad():
        stepped = [f - lr * (f.grad if f.grad is not None else torch.zeros_like(f)) for f in (f_a, f_p, f_n)]
        a, p, n = (f / f.norm() for f in stepped)
        d_ap, d_an = float(a @ p) - s_ap, float(a @ n) - s_an
    coupling = entanglement * s_ap * s_an
    return d_ap + coupling * d_an, d_an + coupling * d_ap


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sct")
    sub = parser.add_subparsers(dest="command", required=True)
    simulate_cli.register(sub)
    return parser


# ---------------------------------------------------------------- closed form vs autograd


@pytest.mark.parametrize("loss", ["nca", "sct"])
@pytest.mark.parametrize("projection", [0.0, 0.6])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_closed_form_matches_autograd_step(loss: str, projection: float, temperature: float) -> None:
    settings = {"loss": loss, "lr": 0.1, "temperature": temperature, "lam": 1.0, "projection": projection}
    for entanglement in (0.0, 0.5, 1.0):
        for s_ap, s_an in POINTS:
            expected = torch_step(s_ap, s_an, entanglement=entanglement, **settings)
            got = step(s_ap, s_an, entanglement=entanglement, **settings)
            np.testing.assert_allclose(
                [float(got[0]), float(got[1])],
                expected,
                rtol=0,
                atol=1e-9,
                err_msg=f"{settings} p={entanglement} at {(s_ap, s_an)}",
            )


def test_simulated_grid_matches_autograd_with_non_default_settings() -> None:
    """Every grid point of ``simulate`` with all knobs moved, so no parameter can be silently dropped."""
    settings = {"lr": 0.05, "temperature": 0.3, "lam": 0.7, "projection": 0.4, "entanglement": 0.5}
    field = simulate("sct", grid=5, **settings)
    assert field.d_ap.shape == field.d_an.shape == (5, 5)
    for index in np.ndindex(field.s_ap.shape):
        s_ap, s_an = float(field.s_ap[index]), float(field.s_an[index])
        expected = torch_step(s_ap, s_an, loss="sct", **settings)
        np.testing.assert_allclose([field.d_ap[index], field.d_an[index]], expected, rtol=0, atol=1e-9)


def test_step_is_vectorised() -> None:
    s_ap = np.array([[0.3, 0.8], [0.9, 0.5]])
    s_an = np.array([[0.8, 0.2], [0.95, 0.5]])
    d_ap, d_an = step(s_ap, s_an, loss="sct", entanglement=0.5, projection=0.6)
    assert d_ap.shape == d_an.shape == (2, 2)
    for index in np.ndindex(2, 2):
        one = step(s_ap[index], s_an[index], loss="sct", entanglement=0.5, projection=0.6)
        assert (d_ap[index], d_an[index]) == (float(one[0]), float(one[1]))


# ---------------------------------------------------------------- the paper's qualitative facts


@pytest.mark.parametrize("projection", [0.0, 0.6])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_nca_without_entanglement_pulls_positives_and_pushes_negatives(projection: float, temperature: float) -> None:
    """NCA at p = 0: away from the grid's edges every step raises S_ap and lowers S_an.

    (On the edges S = 1 makes two vectors coincide and the renormalised step can vanish.)
    """
    field = simulate("nca", entanglement=0.0, projection=projection, temperature=temperature, grid=20)
    inner = (slice(1, -1), slice(1, -1))
    assert (field.d_ap[inner] > 0).all()
    assert (field.d_an[inner] < 0).all()


def test_sct_equals_nca_on_easy_triplets() -> None:
    """SCT is NCA wherever S_an ≤ S_ap (the diagonal included), at any entanglement and projection."""
    for entanglement in (0.0, 0.5, 1.0):
        for projection in (0.0, 0.6):
            nca = simulate("nca", entanglement=entanglement, projection=projection, grid=11)
            sct = simulate("sct", entanglement=entanglement, projection=projection, grid=11)
            easy = nca.s_an <= nca.s_ap
            np.testing.assert_array_equal(sct.d_ap[easy], nca.d_ap[easy])
            np.testing.assert_array_equal(sct.d_an[easy], nca.d_an[easy])
            assert not np.allclose(sct.d_an[~easy], nca.d_an[~easy])


@pytest.mark.parametrize("point", [(0.3, 0.8), (0.9, 0.95), (0.05, 0.5), (0.6, 0.61)])
def test_sct_hard_triplet_moves_positive_only_through_the_anchor(point: tuple[float, float]) -> None:
    """SCT on a hard triplet: g_p = 0, so S_ap changes only because f_a moves by −α·λ·f_n.

    With q = 0 and p = 0, ΔS_ap is the cosine of (f_a − α·λ·f_n) with the untouched f_p, minus
    S_ap; computed here from explicit numpy vectors. It is slightly negative (pushing the
    negative away drags the anchor a little away from the positive) and much smaller than ΔS_an.
    """
    s_ap, s_an = point
    lr, lam = 0.1, 1.0
    f_a = np.array([1.0, 0.0, 0.0])
    f_p = np.array([s_ap, math.sqrt(1 - s_ap**2), 0.0])
    f_n = np.array([s_an, 0.0, math.sqrt(1 - s_an**2)])
    moved = f_a - lr * lam * f_n
    expected = moved @ f_p / np.linalg.norm(moved) - s_ap
    g_p, g_n = gradient_field.gradient_coefficients(s_ap, s_an, loss="sct", lr=lr, lam=lam)
    assert (float(g_p), float(g_n)) == (0.0, lr * lam)
    d_ap, d_an = step(s_ap, s_an, loss="sct", lr=lr, lam=lam, projection=0.0, entanglement=0.0)
    assert float(d_ap) == pytest.approx(expected, abs=1e-12)
    assert float(d_ap) < 0 < -float(d_an)
    assert abs(float(d_ap)) < 0.1 * abs(float(d_an))


@pytest.mark.parametrize("point", [(0.9, 0.9), (0.85, 0.9), (0.9, 0.85), (0.88, 0.92)])
def test_complete_entanglement_cancels_the_nca_push(point: tuple[float, float]) -> None:
    """NCA near S_ap = S_an ≈ 0.9: with p = 1 the rise of S_ap, fed back through the entanglement
    (+S_ap·S_an·ΔS_ap > 0), cancels at least 40 % of the negative's push: |ΔS_an_total| < 0.6·|ΔS_an(p = 0)|.
    (Computed: the ratio is 0.31, 0.05, 0.55 and -0.01 at these points.)"""
    _, free = step(*point, loss="nca", entanglement=0.0)
    _, entangled = step(*point, loss="nca", entanglement=1.0)
    assert float(free) < 0
    assert abs(float(entangled)) < 0.6 * abs(float(free))


def test_nca_with_complete_entanglement_drifts_to_collapse_but_sct_does_not() -> None:
    """The paper's point: at a hard triplet near collapse, (S_ap, S_an) = (0.9, 0.95), NCA with p = 1
    raises both similarities (towards (1, 1), every embedding alike), while SCT still lowers S_an."""
    nca_ap, nca_an = step(0.9, 0.95, loss="nca", entanglement=1.0)
    sct_ap, sct_an = step(0.9, 0.95, loss="sct", entanglement=1.0)
    assert float(nca_ap) > 0 and float(nca_an) > 0
    assert float(sct_an) < -0.01


# ---------------------------------------------------------------- simulate's grid and validation


def test_simulate_grid_layout() -> None:
    field = simulate("nca", entanglement=0.5, grid=7)
    assert isinstance(field, GradientField)
    for array in (field.s_ap, field.s_an, field.d_ap, field.d_an):
        assert array.shape == (7, 7)
    np.testing.assert_allclose(field.s_ap[0], np.linspace(0, 1, 7))  # S_ap along columns
    np.testing.assert_allclose(field.s_an[:, 0], np.linspace(0, 1, 7))  # S_an along rows
    assert field.parameters() == {
        "loss": "nca",
        "entanglement": 0.5,
        "lr": 0.1,
        "temperature": 1.0,
        "lam": 1.0,
        "projection": 0.0,
        "grid": 7,
    }
    assert np.isfinite(field.d_ap).all() and np.isfinite(field.d_an).all()


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"loss": "triplet"}, ["loss", "'triplet'"]),
        ({"entanglement": 1.5}, ["entanglement", "1.5"]),
        ({"entanglement": -0.1}, ["entanglement", "-0.1"]),
        ({"projection": 1.2}, ["projection", "1.2"]),
        ({"lr": 0.0}, ["lr", "0"]),
        ({"lr": -0.5}, ["lr", "-0.5"]),
        ({"temperature": 0.0}, ["temperature", "0"]),
        ({"temperature": -2.0}, ["temperature", "-2"]),
        ({"grid": 1}, ["grid", "1"]),
        ({"entanglement": float("nan")}, ["entanglement", "nan"]),
    ],
)
def test_simulate_rejects_bad_values(overrides: dict, words: list[str]) -> None:
    settings = {"loss": "nca", "entanglement": 0.0, **overrides}
    loss = settings.pop("loss")
    with pytest.raises(ValueError) as error:
        simulate(loss, **settings)
    for word in words:
        assert word in str(error.value)


def test_step_rejects_similarities_outside_cosine_range() -> None:
    with pytest.raises(ValueError, match="s_an 1.2"):
        step(0.5, np.array([0.1, 1.2]), loss="nca")


# ---------------------------------------------------------------- the CLI


def test_cli_writes_pngs_and_fields_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    out = tmp_path / "figures" / "new"
    args = build_parser().parse_args(
        [
            "simulate-gradients",
            "--loss",
            "nca",
            "sct",
            "--entanglement",
            "0",
            "0.5",
            "--grid",
            "5",
            "--projection",
            "0.6",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    names = [gradient_field.figure_name(loss, p) for loss in ("nca", "sct") for p in (0.0, 0.5)]
    assert names[1] == "gradient_field_nca_p0.5.png"
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "fields.json"])  # no temp files left
    for name in names:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.mode in ("RGB", "RGBA")
            width, height = image.size
            assert 1000 <= width <= 1200 and abs(width / height - 10 / 4.8) < 0.05
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"wrote {out / name}" for name in [*names, "fields.json"]]

    records = json.loads((out / "fields.json").read_text())["fields"]
    assert [r["file"] for r in records] == names
    record = records[3]
    field = simulate("sct", entanglement=0.5, projection=0.6, grid=5)
    assert {k: record[k] for k in field.parameters()} == field.parameters()
    for name in ("s_ap", "s_an", "d_ap", "d_an"):
        np.testing.assert_allclose(record[name], getattr(field, name), rtol=0, atol=5e-7)
        assert record[name] == np.round(getattr(field, name), 6).tolist()


def test_cli_defaults_and_duplicates(tmp_path: Path) -> None:
    parser = build_parser()
    defaults = parser.parse_args(["simulate-gradients", "--out", str(tmp_path)])
    assert (defaults.loss, defaults.entanglement) == (["nca", "sct"], [0.0, 0.5, 1.0])
    assert (defaults.lr, defaults.temperature, defaults.lam, defaults.projection, defaults.grid) == (
        0.1,
        1.0,
        1.0,
        0.0,
        20,
    )
    args = parser.parse_args(
        ["simulate-gradients", "--loss", "sct", "--entanglement", "1", "1.0", "--grid", "3", "--out", str(tmp_path)]
    )
    args.func(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fields.json", "gradient_field_sct_p1.png"]
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate-gradients", "--loss", "nca"])  # --out is required


def test_cli_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["simulate-gradients", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "Examples:" in text
    examples = [line.strip() for line in text.split("Examples:", 1)[1].splitlines()]
    assert sum(line.startswith("sct simulate-gradients") for line in examples) >= 3


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--entanglement", "2"], ["--entanglement", "2", "between 0 and 1"]),
        (["--entanglement", "0", "-1"], ["--entanglement", "-1"]),
        (["--lr", "0"], ["--lr", "0"]),
        (["--temperature", "-1"], ["--temperature", "-1"]),
        (["--projection", "3"], ["--projection", "3"]),
        (["--grid", "1"], ["--grid", "1"]),
    ],
)
def test_cli_rejects_bad_values_before_writing(tmp_path: Path, flags: list[str], words: list[str]) -> None:
    out = tmp_path / "never"
    args = build_parser().parse_args(["simulate-gradients", *flags, "--out", str(out)])
    with pytest.raises(ValueError) as error:
        args.func(args)
    for word in words:
        assert word in str(error.value)
    assert not out.exists()


# ---------------------------------------------------------------- import hygiene


def test_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import training.analysis.gradient_field as g, training.analysis.simulate_cli\n"
        "g.simulate('sct', entanglement=1.0, grid=3)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
