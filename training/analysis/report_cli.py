"""``sct report``: figures and a comparison table for training runs. torch loads only to embed with checkpoints."""

from __future__ import annotations

import argparse

from retrieval.cli_options import add_device

REPORT_EPILOG = """\
Examples:
  sct report runs/fmnist --out reports/fmnist
  sct report runs/hn runs/shn runs/sct --out reports/hard-negatives        # overlay and compare three runs
  sct report runs/cub-sct --out reports/cub --iterations 0 500 2000 8000   # triplet diagrams at these iterations
  sct report runs/cub-* --out reports/cub --no-model                       # from the logs only, no checkpoint

Writes into OUT: triplets_<run>.png (sampled (S_ap, S_an) pairs, hard ones red, arrows
for one step), model_<run>.png (each gallery image's easiest positive vs hardest
negative under the trained model, on training classes and on unseen data),
hard_fraction.png, recall.png, report.json and report.html (self-contained). Iterations
sct train flagged as stalled are shaded in the curves and listed in the table.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="draw triplet diagrams, hard-triplet and recall curves, and compare runs",
        description="Render the paper's analysis figures (Fig. 1, 5, 6, 7) and a comparison table for training runs.",
        epilog=REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by sct train --out")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs, report.json and report.html")
    parser.add_argument(
        "--iterations",
        type=int,
        nargs="+",
        metavar="N",
        help="iterations for the triplet diagrams (nearest saved ones; default: four spread out)",
    )
    parser.add_argument(
        "--no-model", action="store_true", help="skip the trained-model diagram (no checkpoint or dataset needed)"
    )
    parser.add_argument(
        "--data-root", metavar="PATH", help="dataset folder for the model diagram, if it moved since training"
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=2000,
        metavar="N",
        help="images per split for the model diagram (default 2000)",
    )
    add_device(parser, default="auto")
    parser.add_argument("--title", default="SCT Retrieval: run report", help="heading of report.html")
    parser.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from core.errors import UserValueError
    from training.analysis.report import build_report, describe_stall

    if args.max_images < 2:
        raise UserValueError(f"--max-images {args.max_images}: needs at least 2 images")
    summaries = build_report(
        args.runs,
        args.out,
        iterations=args.iterations,
        analyse_model=not args.no_model,
        data_root=args.data_root,
        max_images=args.max_images,
        device=args.device,
        title=args.title,
    )
    for s in summaries:
        recall = s.recall.get("recall@1")
        shown = f"R@1 {recall:.4f}" if recall is not None else "no evaluation"
        collapse = f"  mean similarity {s.mean_similarity:.3f}" if s.mean_similarity is not None else ""
        stalled = f"  stalled at iterations: {', '.join(map(describe_stall, s.stalls))}" if s.stalls else ""
        print(f"{s.label} ({s.loss}): {shown}{collapse}{stalled}")
    print(f"wrote {args.out}/report.html")
    return 0
