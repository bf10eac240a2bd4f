"""``stas postprocess``: remove small or faint connected components of predicted masks, fill holes; or, with
``--study``, score every combination of those settings on out-of-fold probability maps to choose them.

The steps and the study are segmentation's (:mod:`stas_pipeline.tasks.segmentation.postprocess`, whose docstring
says what each does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.cli_types import non_negative_int, probability_threshold
from stas_pipeline.tasks.segmentation.postprocess import postprocess_folder, study_command


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Post-process predicted masks: remove connected components smaller than --min-size "
        "pixels or fainter than --seed-threshold, fill holes. Writes --out/<stem>.png (mode L, 0/255) "
        "atomically; every step is off by default.",
    )
    parser.add_argument("--pred", type=Path, required=True,
                        help="folder of predicted <stem>.png masks (or probability maps, p * 255)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path, help="output folder (written only when complete)")
    mode.add_argument("--study", type=Path, metavar="CSV",
                      help="score every combination of --thresholds, --min-sizes, --seed-thresholds and hole "
                      "filling against --ref instead (use out-of-fold probability maps): the table, best first, "
                      "goes to CSV")
    parser.add_argument("--ref", type=Path, help="--study: folder of reference <stem>.png masks (nonzero = fg)")
    parser.add_argument("--thresholds", type=probability_threshold, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7],
                        metavar="T", help="--study: cuts of value / 255 (default: 0.3 0.4 0.5 0.6 0.7)")
    parser.add_argument("--min-sizes", type=non_negative_int, nargs="+", default=[0, 100, 500, 2000, 5000],
                        metavar="N", help="--study: smallest kept components (default: 0 100 500 2000 5000)")
    parser.add_argument("--seed-thresholds", type=probability_threshold, nargs="+", default=[0.6, 0.7, 0.8],
                        metavar="S", help="--study: peak values a kept component must reach, tried besides none "
                        "(default: 0.6 0.7 0.8; those at or below a cut are skipped for it)")
    parser.add_argument(
        "--min-size",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="remove 8-connected foreground components of fewer than N pixels (default: 0, keep all)",
    )
    parser.add_argument(
        "--seed-threshold",
        type=probability_threshold,
        default=0.0,
        metavar="S",
        help="on probability maps: remove components whose highest value / 255 is below S, so that a low "
        "--threshold traces outlines without keeping faint blobs (default: 0, keep all)",
    )
    parser.add_argument(
        "--fill-holes", action="store_true", help="fill background regions enclosed by foreground"
    )
    parser.add_argument(
        "--threshold",
        type=probability_threshold,
        default=0.0,
        metavar="T",
        help="foreground where value / 255 > T (default: 0, any value > 0)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when every mask was written, 1 when any was skipped, 2 for unusable input."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.study is not None:
        if args.ref is None:
            parser.error("--study needs --ref")
        return study_command(args).finish()
    return postprocess_folder(
        args.pred,
        args.out,
        min_size=args.min_size,
        fill_holes=args.fill_holes,
        threshold=args.threshold,
        overwrite=args.overwrite,
        seed_threshold=args.seed_threshold,
    ).finish()


if __name__ == "__main__":
    sys.exit(main())
