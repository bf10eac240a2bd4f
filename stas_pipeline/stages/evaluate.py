"""``stas evaluate``: score predictions against the truth, in the mode of the option given.

- ``--pred DIR --ref DIR``: masks against reference masks, per image (Dice, IoU, precision, recall and their
  means; :mod:`stas_pipeline.tasks.segmentation.evaluation`);
- ``--predictions CSV --datalist JSON --out DIR``: an image-level predictions CSV against the labels of a
  datalist section; the CSV says whose it is (:func:`~stas_pipeline.tasks.base.task_of_predictions`):
  probabilities (AUC, sensitivity/specificity, ROC curve and worst images;
  :mod:`stas_pipeline.tasks.classification.evaluation`) or grades (``image,score,grade,...``: quadratic kappa,
  accuracy, confusion matrix and guarded cut points; :mod:`stas_pipeline.tasks.grading.evaluation`);
- ``--slides DIR --masks SOURCE --out DIR``: predicted slides against their masks at every threshold
  (:mod:`stas_pipeline.tasks.slide.evaluation`).

The option selects the task (each task's ``evaluate_options``); the task scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.cli_types import non_negative_int, probability_threshold
from stas_pipeline.tasks.base import Task, TaskError, choose, claimed_by_options, task_of_predictions
from stas_pipeline.tasks.classification.evaluation import SECTIONS

USAGE = """%(prog)s --pred DIR --ref DIR [--csv FILE] [--overlays DIR --images DIR] [options]
       %(prog)s --predictions CSV --datalist JSON --out DIR [--section {test,training}] [options]
       %(prog)s --slides DIR --masks SOURCE --out DIR [options]"""
MASK_ONLY = ("ref", "csv", "overlays", "images")
IMAGE_LEVEL_ONLY = ("datalist", "section", "out", "cuts")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=USAGE,
        description="Two modes, chosen by --pred or --predictions. Masks (--pred): score predicted masks against "
        "reference masks (<stem>.png in both folders): mean per-image Dice, IoU, precision and recall (both empty "
        "= 1), an optional per-image CSV and overlays of the worst images by Dice. Image-level (--predictions): "
        "score a predictions CSV (image,prob,<member>...) against the 0/1 labels of a datalist section: AUC, "
        "sensitivity, specificity, accuracy, each member's AUC; writes metrics.json, per_image.csv, roc.png, "
        "worst.csv and worst.png into --out.",
    )
    mode = parser.add_argument_group("mode (exactly one)").add_mutually_exclusive_group(required=True)
    mode.add_argument("--pred", type=Path, metavar="DIR", help="masks mode: folder of predicted masks")
    mode.add_argument(
        "--predictions",
        type=Path,
        metavar="CSV",
        help="image-level mode: predictions CSV of stas predict (image,prob,<member>...)",
    )
    mode.add_argument("--slides", type=Path, metavar="DIR",
                      help="slides mode: a folder of stas predict on slides (<id>_prob.npy, <id>.tif): Dice of each "
                           "slide at level 0 against --masks at thresholds 0.05..0.95, the best threshold, the "
                           "curve (threshold_dice.png) and metrics.json in --out")
    masks = parser.add_argument_group("masks mode (--pred)")
    masks.add_argument("--ref", type=Path, metavar="DIR", help="folder of reference masks (required)")
    masks.add_argument(
        "--csv", type=Path, metavar="FILE",
        help="write image,dice,iou,precision,recall,pred_pixels,ref_pixels per image",
    )
    masks.add_argument(
        "--overlays",
        type=Path,
        metavar="DIR",
        help="write <stem>_overlay.png for the worst images: reference contour green, prediction red",
    )
    masks.add_argument("--images", type=Path, metavar="DIR", help="image folder, needed by --overlays")
    parser.add_argument_group("slides mode (--slides)").add_argument(
        "--masks", type=Path, metavar="SOURCE",
        help="the slides' masks: an RLE CSV (id,encoding) or a folder of <id> mask images or polygons (required)")
    image_level = parser.add_argument_group("image-level mode (--predictions)")
    image_level.add_argument(
        "--datalist", type=Path, metavar="JSON",
        help="datalist with 0/1 labels (required); pseudo-labelled entries (pseudo_round) are never scored",
    )
    image_level.add_argument(
        "--section", choices=SECTIONS, default=None,
        help="datalist section to score against: test (the inner test, default) or training (out-of-fold)",
    )
    image_level.add_argument(
        "--out", type=Path, metavar="DIR",
        help="output folder (required): metrics.json, per_image.csv, roc.png, worst.csv, worst.png (grading: "
        "metrics.json, per_image.csv, confusion.png, cut_points.json; slides mode: metrics.json, "
        "threshold_dice.png)",
    )
    image_level.add_argument(
        "--cuts", type=Path, metavar="JSON",
        help="grading CSVs: also score with these cut points, the cut_points.json of an out-of-fold evaluation "
        "(e.g. the inner test with the cuts searched on the out-of-fold scores)",
    )
    both = parser.add_argument_group("both modes")
    both.add_argument(
        "--threshold",
        type=probability_threshold,
        default=None,
        metavar="T",
        help="masks: foreground where value / 255 > T, in both folders (default: 0, any value > 0); "
        "image-level: positive where prob >= T (default: 0.5)",
    )
    both.add_argument(
        "--worst", type=non_negative_int, default=None, metavar="N",
        help="number of worst images shown: overlays (default: 10) or the contact sheet worst.png (default: 8)",
    )
    both.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def _check_mode_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse errors (exit 2) for the options of one mode given with another, or a mode's missing options."""
    if args.slides is not None:
        if args.masks is None or args.out is None:
            parser.error("--slides needs --masks and --out")
        return
    if args.masks is not None:
        parser.error("--masks belongs to the slides mode (--slides)")
    image_level = args.predictions is not None
    other = MASK_ONLY if image_level else IMAGE_LEVEL_ONLY
    given = [f"--{name}" for name in other if getattr(args, name) is not None]
    if given:
        parser.error(f"{', '.join(given)} belong to the {'masks' if image_level else 'image-level'} mode, not "
                     f"to {'--predictions' if image_level else '--pred'}")
    if image_level:
        missing = [f"--{name}" for name in ("datalist", "out") if getattr(args, name) is None]
        if missing:
            parser.error(f"--predictions needs {' and '.join(missing)}")
        return
    if args.ref is None:
        parser.error("--pred needs --ref")
    if args.overlays is not None and args.images is None:
        parser.error("--overlays needs --images")


def _task(args: argparse.Namespace) -> Task:
    """The task of the mode given; for --predictions, the task whose predictions CSV it is."""
    names = claimed_by_options(args, "evaluate_options")
    if args.predictions is not None:  # several tasks score a predictions CSV: the file says whose it is
        found = task_of_predictions([args.predictions]).name
        if found not in names:
            raise TaskError(f"{args.predictions}: not a predictions CSV (image,prob,... or image,score,grade,...)")
        names = [found]
    return choose(*names, what="the options")


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when every image was scored, 1 when any was skipped, 2 for bad input (or, image-level,
    nothing that can be scored)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    _check_mode_options(parser, args)
    return _task(args).evaluate(args).finish()


if __name__ == "__main__":
    sys.exit(main())
