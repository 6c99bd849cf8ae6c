"""``sct simulate-gradients``: draw the paper's Fig. 2 gradient fields for NCA and SCT.

Pure numpy simulation (see ``training.analysis.gradient_field``); nothing here
imports torch, and numpy/matplotlib are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

LOSS_CHOICES = ("nca", "sct")

EPILOG = """\
Examples:
  sct simulate-gradients --out figures/gradients
  sct simulate-gradients --loss sct --entanglement 0 1 --lam 0.5 --out figures/sct-lam0.5
  sct simulate-gradients --loss nca --temperature 0.1 --projection 0.6 --grid 30 --out figures/nca-t0.1

Each PNG shows, over a grid of (S_ap, S_an), how one SGD step moves S_ap (left, horizontal
arrows) and S_an (right, vertical arrows); triplets above the diagonal S_an = S_ap are hard.
DIR/fields.json holds every field's parameters and grid arrays (rounded to 6 decimals).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate-gradients",
        help="draw simulated gradient fields of NCA and SCT over (S_ap, S_an) (the paper's Fig. 2)",
        description=(
            "Simulate one SGD step of a triplet loss on unit vectors for every (S_ap, S_an) on a grid, "
            "with no, some or complete entanglement, and draw the change of both similarities "
            "(Xuan et al., ECCV 2020, eqs. 4-12)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--loss",
        nargs="+",
        choices=LOSS_CHOICES,
        default=list(LOSS_CHOICES),
        help="losses to simulate (default: nca sct)",
    )
    parser.add_argument(
        "--entanglement",
        nargs="+",
        type=float,
        default=[0.0, 0.5, 1.0],
        metavar="P",
        help="entanglement p in [0, 1]: 0 none, 1 complete (default: 0 0.5 1)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs and fields.json")
    parser.add_argument("--lr", type=float, default=0.1, metavar="ALPHA", help="SGD step size α (default 0.1)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="TAU",
        help="NCA temperature τ (default 1, as in the paper's simulation)",
    )
    parser.add_argument("--lam", type=float, default=1.0, help="SCT's λ on hard triplets (default 1)")
    parser.add_argument(
        "--projection",
        type=float,
        default=0.0,
        metavar="Q",
        help="q in [0, 1]: how far the negative leans into the anchor-positive plane (default 0)",
    )
    parser.add_argument("--grid", type=int, default=20, metavar="N", help="N×N grid points (default 20)")
    parser.set_defaults(func=run_simulate)


def _unique(values: list[Any]) -> list[Any]:
    """The values in order, repeats dropped (0 and 0.0 would write the same file twice)."""
    return list(dict.fromkeys(values))


def _check(args: argparse.Namespace) -> None:
    """Validate every combination before anything is written; errors name the flag."""
    from core.errors import UserValueError
    from training.analysis.gradient_field import check_parameters

    for loss in args.loss:
        for entanglement in args.entanglement:
            try:
                check_parameters(
                    loss=loss,
                    entanglement=entanglement,
                    lr=args.lr,
                    temperature=args.temperature,
                    lam=args.lam,
                    projection=args.projection,
                    grid=args.grid,
                    prefix="--",
                )
            except ValueError as error:  # check_parameters' refusals, each naming the flag
                raise UserValueError(str(error)) from error


def _write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Atomic JSON write (temp file in the same folder, then rename); no NaN in the output."""
    from core.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(payload, allow_nan=False) + "\n")
    return path


def run_simulate(args: argparse.Namespace) -> int:
    from training.analysis import gradient_field

    _check(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for loss in _unique(args.loss):
        for entanglement in _unique([float(p) for p in args.entanglement]):
            field = gradient_field.simulate(
                loss,
                entanglement=entanglement,
                lr=args.lr,
                temperature=args.temperature,
                lam=args.lam,
                projection=args.projection,
                grid=args.grid,
            )
            path = gradient_field.draw(field, out / gradient_field.figure_name(loss, entanglement))
            print(f"wrote {path}")
            records.append({"file": path.name, **field.to_json()})
    fields_path = _write_json(
        out / "fields.json",
        {
            "description": (
                "Change of (S_ap, S_an) after one SGD step on unit vectors, then renormalisation "
                "(Xuan et al., ECCV 2020, eqs. 4-12). Arrays are [row = S_an index][column = S_ap index]."
            ),
            "fields": records,
        },
    )
    print(f"wrote {fields_path}")
    return 0
