"""``stas ensemble``: combine the predictions of several models or folds, image by image.

The members say whose predictions they are (:func:`~stas_pipeline.tasks.base.task_of_predictions`), and that task
ensembles them: folders of masks or probability maps by vote or mean
(:mod:`stas_pipeline.tasks.segmentation.ensemble`), prediction CSVs joined on ``image`` by mean or vote
(:mod:`stas_pipeline.tasks.classification.ensemble`), grading CSVs by mean, label average or scaled average
(:mod:`stas_pipeline.tasks.grading.ensembles`). Members are all folders or all CSVs of one task.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.cli_types import probability_threshold
from stas_pipeline.tasks.base import task_of_predictions
from stas_pipeline.tasks.grading.ensembles import GRADING_METHODS
from stas_pipeline.tasks.segmentation.ensemble import METHODS, TIES


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Combine the predictions of several models/folds, image by image: strict majority vote "
        "of binarised masks, or mean of probabilities. Members are folders of <stem>.png (grey level = "
        "p * 255) or <stem>.npy (probabilities in [0, 1]); writes --out/<stem>.png, mode L, 0/255, "
        "atomically. Image-level members are prediction CSVs (image,prob,<member>...), joined on image; "
        "writes the CSV --out (image,prob,<one column per input CSV>), atomically. Members are all folders "
        "or all .csv files.",
    )
    parser.add_argument(
        "members", nargs="+", type=Path, help="prediction folders, or prediction CSVs, one per model/fold"
    )
    parser.add_argument(
        "--out", type=Path, required=True,
        help="output folder (written only when complete), or output .csv for CSV members",
    )
    parser.add_argument(
        "--method", choices=list(dict.fromkeys(METHODS + GRADING_METHODS)), default=None,
        help="vote or mean (default: vote for folders, mean for CSVs); grading CSVs: mean, label-average or "
        "scaled-average",
    )
    parser.add_argument(
        "--member-cuts", nargs="+", type=Path, metavar="JSON",
        help="grading CSVs: one cut_points.json (from stas evaluate on that member's out-of-fold predictions) per "
        "member, in member order, for label-average and scaled-average (default: 0.5/1.5/2.5/3.5 for each)",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one weight per member: a weighted vote (strict majority of the total weight) or weighted mean",
    )
    parser.add_argument(
        "--tie",
        choices=TIES,
        default="background",
        help="vote: the answer where exactly half of the (weighted) votes say foreground, which can happen "
        "only with an even number of members or with weights (default: background)",
    )
    parser.add_argument(
        "--binarize-threshold",
        type=probability_threshold,
        default=None,
        metavar="T",
        help="folders, vote: a member pixel is foreground where its probability (PNG value / 255, .npy value) "
        "is > T (default: 0, i.e. any PNG value > 0)",
    )
    parser.add_argument(
        "--threshold",
        type=probability_threshold,
        default=None,
        metavar="T",
        help="folders, mean: foreground where the mean probability is > T; CSVs, vote: a member votes positive "
        "where its prob >= T (default: 0.5)",
    )
    parser.add_argument(
        "--save-probs",
        type=Path,
        metavar="DIR",
        help="folders, mean: also write the mean probability as PNG (p * 255)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out (and --save-probs)"
    )
    return parser


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when every image was ensembled, 1 when any was skipped (or all), 2 for unusable input."""
    args = build_parser(prog).parse_args(argv)
    return task_of_predictions(args.members).ensemble(args).finish()


if __name__ == "__main__":
    sys.exit(main())
