"""Arguments that several ``sct`` commands take, each defined once: the image source (``--dataset`` or
``--images``, with ``--data-root`` and ``--split``), ``--device``, ``--precision`` and ``--workers``.

The choices of ``--device`` and ``--precision`` are the ``Device`` and ``Precision`` types, which
``training.config.TrainConfig`` uses too. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
from typing import Any, Literal, get_args

import catalog
from core.argtypes import non_negative_int

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
DEVICES: tuple[str, ...] = get_args(Device)
PRECISIONS: tuple[str, ...] = get_args(Precision)

DEVICE_HELP = "default: cuda when present"
PRECISION_HELP = "auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32"


def add_image_source(parser: argparse.ArgumentParser, *, verb: str) -> Any:
    """``--dataset NAME`` or ``--images DIR`` (one of them, required), ``--data-root PATH`` and ``--split``
    (with ``--dataset``). Returns the mutually exclusive group, to which a command may add another source
    (``sct index --merge``). ``verb``: what the command does with the split ("index", "embed")."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dataset",
        metavar="NAME",  # an unknown name: catalog's error, which lists the names
        help=f"dataset name ({', '.join(sorted(catalog.DATASETS))})",
    )
    source.add_argument("--images", metavar="DIR", help="folder of images; subfolder names are the labels")
    parser.add_argument("--data-root", metavar="PATH", help="dataset folder (with --dataset)")
    parser.add_argument("--split", help=f"split to {verb} (with --dataset; default: the dataset's gallery split)")
    return source


def add_device(parser: argparse.ArgumentParser, *, default: str | None = None, help: str = DEVICE_HELP) -> None:
    """``--device auto|cpu|cuda``."""
    parser.add_argument("--device", choices=DEVICES, default=default, help=help)


def add_precision(parser: argparse.ArgumentParser, *, default: str | None = None, help: str = PRECISION_HELP) -> None:
    """``--precision auto|fp32|bf16``."""
    parser.add_argument("--precision", choices=PRECISIONS, default=default, help=help)


def add_workers(parser: argparse.ArgumentParser, *, help: str, default: int | None = None) -> None:
    """``--workers N``: a count of processes, a whole number at least 0 for every command (a command that
    needs at least 1 says so when it runs)."""

    parser.add_argument("--workers", type=non_negative_int, default=default, metavar="N", help=help)
