"""Score predictions: masks against reference masks (per-image Dice, IoU, precision, recall, and their means),
or image-level probabilities against datalist labels.

Two modes, chosen by ``--pred`` (masks, below) or ``--predictions`` (image-level: a predictions CSV against the
labels of a datalist: for classification, AUC, sensitivity/specificity, ROC curve and worst images, see
:mod:`stas_pipeline.tasks.classification.evaluation`; for a grading CSV (``image,score,grade,...``), quadratic
kappa, accuracy, confusion matrix and guarded cut points, see :mod:`stas_pipeline.tasks.grading.evaluation`; this
module only dispatches to them).

``stas evaluate --pred DIR --ref DIR [--csv FILE] [--overlays DIR --images DIR --worst N]`` scores every
``ref/<stem>.png`` against ``pred/<stem>.png``; both are binarised with ``value / 255 > --threshold``
(default 0: any value > 0). Both-empty and zero-division cases are defined so that a correct empty
prediction scores 1:

- Dice ``2|P&R| / (|P| + |R|)`` and IoU ``|P&R| / |P|R|`` are 1.0 when both masks are empty;
- precision ``|P&R| / |P|`` with nothing predicted is 1.0 if the reference is empty, else 0.0;
- recall ``|P&R| / |R|`` with an empty reference is 1.0 if nothing is predicted, else 0.0.

The summary is the mean over images: each image counts once, whatever its foreground area.
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from stas_pipeline.core.cli_types import non_negative_int, probability_threshold
from stas_pipeline.core.fileio import OutputExistsError, atomic_path, write_json, write_png
from stas_pipeline.core.mask_io import IMAGE_SUFFIXES, InputFolderError, prediction_files, read_grey_png, size_text
from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.classification.evaluation import (
    SECTIONS,
    PredictionsError,
    evaluate_predictions,
    format_metrics,
)

STAGE = "evaluate"
METRICS = ("dice", "iou", "precision", "recall")
CSV_COLUMNS = ("image", *METRICS, "pred_pixels", "ref_pixels")
REF_COLOUR, PRED_COLOUR, BOTH_COLOUR = (0, 255, 0), (255, 0, 0), (255, 255, 0)
CAPTION = 16  # height in pixels of the overlay's caption band


def dice_iou_precision_recall(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Dice, IoU, precision, recall and both pixel counts of two binary arrays of one shape (nonzero = fg)."""
    pred, ref = np.asarray(pred).astype(bool), np.asarray(ref).astype(bool)
    if pred.shape != ref.shape:
        raise ValueError(f"shapes differ: pred {pred.shape}, ref {ref.shape}")
    p, r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    tp = int(np.count_nonzero(pred & ref))
    return {
        "dice": 2 * tp / (p + r) if p + r else 1.0,
        "iou": tp / (p + r - tp) if p + r else 1.0,
        "precision": tp / p if p else float(r == 0),
        "recall": tp / r if r else float(p == 0),
        "pred_pixels": p,
        "ref_pixels": r,
    }


def summarize(rows: Sequence[dict]) -> dict:
    """Mean of each metric over ``rows`` (NaN when empty) and the count."""
    means = {m: float(np.mean([row[m] for row in rows])) if rows else math.nan for m in METRICS}
    return {**means, "count": len(rows)}


def contour(mask: np.ndarray, thickness: int = 2) -> np.ndarray:
    """Pixels within ``thickness`` of the mask's boundary, inside or outside (dilation xor erosion)."""
    outer = ndimage.binary_dilation(mask, iterations=thickness)
    return outer ^ ndimage.binary_erosion(mask, iterations=thickness)


def overlay(image: np.ndarray, pred: np.ndarray, ref: np.ndarray, title: str = "") -> np.ndarray:
    """The RGB image with the reference contour in green, the prediction's in red (yellow where both).

    With a ``title``, a black caption band of :data:`CAPTION` pixels is added above the image.
    """
    out = image.copy()
    pred_c, ref_c = contour(pred), contour(ref)
    out[ref_c] = REF_COLOUR
    out[pred_c] = PRED_COLOUR
    out[ref_c & pred_c] = BOTH_COLOUR
    if not title:
        return out
    canvas = Image.new("RGB", (out.shape[1], out.shape[0] + CAPTION))
    canvas.paste(Image.fromarray(out), (0, CAPTION))
    ImageDraw.Draw(canvas).text((4, 2), title, fill=(255, 255, 255))
    return np.asarray(canvas)


def _read_binary(path: Path, threshold: float, problems: Problems) -> np.ndarray:
    try:
        return read_grey_png(path, problems) > threshold * 255
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _score(pred: Path, ref: Path, threshold: float, problems: Problems) -> dict:
    pred_mask, ref_mask = _read_binary(pred, threshold, problems), _read_binary(ref, threshold, problems)
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(
            f"size mismatch: prediction {pred} is {size_text(pred_mask.shape)}, "
            f"reference {size_text(ref_mask.shape)} (width x height)"
        )
    return {"image": ref.stem, **dice_iou_precision_recall(pred_mask, ref_mask)}


def write_csv(path: str | Path, rows: Sequence[dict], overwrite: bool = False) -> None:
    """Write the per-image rows (:data:`CSV_COLUMNS`, metrics with 6 decimals) atomically."""
    with atomic_path(path, overwrite) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6f}" if k in METRICS else v for k, v in row.items()})


def _write_overlay(
    stem: str,
    row: dict,
    pred: Path,
    ref: Path,
    images: Path,
    out: Path,
    threshold: float,
    problems: Problems,
    overwrite: bool,
) -> None:
    found = [p for p in sorted(images.glob(glob.escape(stem) + ".*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise ValueError(f"no image {stem}.* ({' '.join(IMAGE_SUFFIXES)}) in {images}")
    with Image.open(found[0]) as img:
        image = np.asarray(img.convert("RGB"))
    pred_mask, ref_mask = _read_binary(pred, threshold, problems), _read_binary(ref, threshold, problems)
    if image.shape[:2] != ref_mask.shape:
        raise ValueError(
            f"image {found[0]} is {size_text(image.shape[:2])}, masks {size_text(ref_mask.shape)}"
        )
    title = f"{stem}  dice {row['dice']:.3f}  green: reference  red: prediction  yellow: both"
    write_png(out / f"{stem}_overlay.png", overlay(image, pred_mask, ref_mask, title), overwrite=overwrite)


def _png_files(folder: Path) -> dict[str, Path]:
    """stem -> ``<stem>.png`` (any case of the suffix; of two, the first by name) in ``folder``."""
    return {stem: paths[0] for stem, paths in prediction_files(folder).items()}


def evaluate_folders(
    pred: str | Path,
    ref: str | Path,
    csv_path: str | Path | None = None,
    overlays: str | Path | None = None,
    images: str | Path | None = None,
    worst: int = 10,
    threshold: float = 0.0,
    overwrite: bool = False,
) -> tuple[list[dict], Problems]:
    """Score every ``ref/<stem>.png`` against ``pred/<stem>.png``; return the per-image rows and the problems.

    A missing, unreadable or differently sized prediction is reported and skipped; a prediction without a
    reference is reported as a warning. With ``csv_path`` the rows are written as CSV; with ``overlays`` (and
    ``images``) an overlay PNG ``<stem>_overlay.png`` for each of the ``worst`` lowest-Dice images. Existing
    outputs raise :class:`OutputExistsError` (CSV, checked first) or are reported (overlays) unless
    ``overwrite``.
    """
    pred, ref = Path(pred), Path(ref)
    if overlays is not None and images is None:
        raise InputFolderError("overlays need the image folder (--images)")
    if images is not None and not Path(images).is_dir():
        raise InputFolderError(f"{images}: image folder not found")
    if csv_path is not None and Path(csv_path).exists() and not overwrite:
        raise OutputExistsError(csv_path)
    pred_files, ref_files = _png_files(pred), _png_files(ref)
    if not ref_files:
        raise InputFolderError(f"{ref}: no reference *.png masks")

    problems = Problems(STAGE)
    for stem in sorted(pred_files.keys() - ref_files.keys()):
        problems.warn(pred_files[stem], "no reference mask with this name; not scored")
    rows = []
    for stem in tqdm(sorted(ref_files), desc=STAGE, unit="image", file=sys.stderr):
        try:
            if stem not in pred_files:
                raise ValueError(f"no prediction {stem}.png in {pred}")
            rows.append(_score(pred_files[stem], ref_files[stem], threshold, problems))
        except ValueError as e:
            with tqdm.external_write_mode(file=sys.stderr):
                problems.skip(f"{stem}.png", str(e))
    problems.count("scored", len(rows))
    if csv_path is not None:
        write_csv(csv_path, rows, overwrite)
    if overlays is not None:
        for row in sorted(rows, key=lambda r: (r["dice"], r["image"]))[:worst]:
            stem = row["image"]
            try:
                _write_overlay(
                    stem,
                    row,
                    pred_files[stem],
                    ref_files[stem],
                    Path(images),
                    Path(overlays),
                    threshold,
                    problems,
                    overwrite,
                )
            except (
                OSError,
                ValueError,
                Image.DecompressionBombError,
            ) as e:  # OutputExistsError is an OSError
                problems.skip(f"{stem}_overlay.png", str(e))
                continue
            problems.count("overlays")
    return rows, problems


def format_summary(summary: dict) -> str:
    if not summary["count"]:
        return "no image scored"
    means = "  ".join(f"{m} {summary[m]:.4f}" for m in METRICS)
    return f"mean over {summary['count']} images: {means}"


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


def _main_slides(args: argparse.Namespace) -> int:
    from stas_pipeline.stages.tile import mask_sources
    from stas_pipeline.tasks.slide.evaluation import (
        open_prediction,
        plot_curve,
        predicted_slides,
        probability_histograms,
        threshold_curve,
    )
    from stas_pipeline.tasks.slide.reader import SlideError
    from stas_pipeline.tasks.slide.tiling import open_mask

    problems = Problems("evaluate")
    try:
        if (args.out / "metrics.json").exists() and not args.overwrite:
            raise OutputExistsError(args.out / "metrics.json")
        sources, histograms = mask_sources(args.masks), {}
        for ident, prob_path in tqdm(predicted_slides(args.slides).items(), desc="slides", unit="slide"):
            try:
                if ident not in sources:
                    raise ValueError(f"no mask for {ident} in {args.masks}")
                prob, shape, scale = open_prediction(prob_path)
                mask = open_mask(sources[ident][0], sources[ident][1], shape)
                histograms[ident] = probability_histograms(prob, mask, shape, scale)
            except (SlideError, ValueError, OSError) as err:
                problems.skip(prob_path, str(err))
        if not histograms:
            raise InputFolderError(f"{args.slides}: no predicted slide could be scored")
        result = threshold_curve(histograms)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "metrics.json", {"slides": str(args.slides), "masks": str(args.masks), **result},
                   overwrite=args.overwrite)
        plot_curve(result, args.out / "threshold_dice.png")
    except (InputFolderError, OutputExistsError, OSError, ValueError) as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 2
    print(f"mean Dice over {len(histograms)} slides: {result['mean_dice_at_0.5']:.4f} at 0.5, "
          f"{result['mean_dice_at_best']:.4f} at the best threshold {result['best_threshold']:.2f}")
    return problems.finish()


def _main_image_level(args: argparse.Namespace) -> int:
    from stas_pipeline.tasks.grading.evaluation import evaluate_grading, format_grading, is_grading_csv

    try:
        if is_grading_csv(args.predictions):
            metrics, problems = evaluate_grading(args.predictions, args.datalist, args.out,
                                                 section=args.section or "test", overwrite=args.overwrite,
                                                 cuts_file=args.cuts)
            print(format_grading(metrics))
            return problems.finish()
        if args.cuts is not None:
            raise PredictionsError(f"--cuts: for grading CSVs (image,score,grade,...); {args.predictions} is not one")
        metrics, problems = evaluate_predictions(
            args.predictions,
            args.datalist,
            args.out,
            section=args.section or "test",
            threshold=0.5 if args.threshold is None else args.threshold,
            worst=8 if args.worst is None else args.worst,
            overwrite=args.overwrite,
        )
    except (PredictionsError, OutputExistsError, OSError, ValueError) as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 2
    print(format_metrics(metrics))
    return problems.finish()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when every image was scored, 1 when any was skipped, 2 for bad input (or, image-level,
    nothing that can be scored)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.slides is not None:
        if args.masks is None or args.out is None:
            parser.error("--slides needs --masks and --out")
        return _main_slides(args)
    if args.masks is not None:
        parser.error("--masks belongs to the slides mode (--slides)")
    image_level = args.predictions is not None
    own, other = (IMAGE_LEVEL_ONLY, MASK_ONLY) if image_level else (MASK_ONLY, IMAGE_LEVEL_ONLY)
    given = [f"--{name}" for name in other if getattr(args, name) is not None]
    if given:
        parser.error(f"{', '.join(given)} belong to the {'masks' if image_level else 'image-level'} mode, not "
                     f"to {'--predictions' if image_level else '--pred'}")
    if image_level:
        missing = [f"--{name}" for name in ("datalist", "out") if getattr(args, name) is None]
        if missing:
            parser.error(f"--predictions needs {' and '.join(missing)}")
        return _main_image_level(args)
    if args.ref is None:
        parser.error("--pred needs --ref")
    if args.overlays is not None and args.images is None:
        parser.error("--overlays needs --images")
    try:
        rows, problems = evaluate_folders(
            args.pred,
            args.ref,
            csv_path=args.csv,
            overlays=args.overlays,
            images=args.images,
            worst=10 if args.worst is None else args.worst,
            threshold=0.0 if args.threshold is None else args.threshold,
            overwrite=args.overwrite,
        )
    except (InputFolderError, OutputExistsError) as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 2
    print(format_summary(summarize(rows)))
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
