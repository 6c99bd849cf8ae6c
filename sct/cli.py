"""The ``sct`` console script: one parser, subcommands contributed by each package.

Nothing imported here loads torch; ``train``, ``export`` and ``demo`` import it
when they run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from core.errors import UserError
from sct import __version__

EPILOG = """\
The pipeline, in order:
  sct train  --dataset fashion-mnist --data-root data/fashion-mnist --out runs/fmnist
  sct export --checkpoint runs/fmnist/best.pt --out runs/fmnist/model.onnx
  sct index  --model runs/fmnist/model.onnx --dataset fashion-mnist --data-root data/fashion-mnist \\
             --split test --out index_data/fashion-mnist
  sct eval   --index index_data/fashion-mnist --k 1 2 4 8
  sct search --index index_data/fashion-mnist query.png --k 10
  sct serve  --index index_data/fashion-mnist

Big galleries on GPUs (torch instead of ONNX Runtime for the embedding; see `sct embed --help`):
  torchrun --nproc-per-node 8 -m sct embed --checkpoint runs/sop/best.pt --model runs/sop/model.onnx \\
             --dataset sop --data-root data/sop --out shards/sop
  sct index  --merge shards/sop --out index_data/sop

Research: figures of the paper from your own runs
  sct report runs/hn runs/shn runs/sct --out reports/hard-negatives
  sct simulate-gradients --loss nca sct --entanglement 0 0.5 1 --out reports/fields

Or all of it on Fashion-MNIST at once:
  sct demo            (then open http://127.0.0.1:5000)

Run `sct COMMAND --help` for each command's options and examples.
"""


def build_parser() -> argparse.ArgumentParser:
    from retrieval import cli as retrieval_cli
    from sct import demo
    from training import cli as training_cli
    from training.analysis import report_cli, simulate_cli
    from webapp import cli as webapp_cli

    parser = argparse.ArgumentParser(
        prog="sct",
        description="Image retrieval with the Selectively Contrastive Triplet loss (Xuan et al., ECCV 2020).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sct {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    training_cli.register(subparsers)
    report_cli.register(subparsers)
    simulate_cli.register(subparsers)
    retrieval_cli.register(subparsers)
    webapp_cli.register(subparsers)
    demo.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. A ``UserError`` is reported as ``error: <message>`` on stderr with
    status 2; any other exception is a bug and propagates with its traceback."""
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


#: The packages whose INFO records users see
OWN_PACKAGES = ("catalog", "core", "retrieval", "training", "webapp", "sct")


def configure_logging() -> None:
    """The project's log records of INFO and above go to stderr as their bare message, as the commands' own
    notes do; other libraries' only from WARNING (FAISS, for one, logs at INFO which CPU build it loaded).

    Only the first call configures anything (``logging.basicConfig``), so an application embedding ``main``
    keeps its own handlers.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    for package in OWN_PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO)
