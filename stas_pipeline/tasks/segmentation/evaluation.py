"""Segmentation's evaluation: predicted masks scored against reference masks, image by image.

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

from stas_pipeline.core.fileio import OutputExistsError, atomic_path, write_png
from stas_pipeline.core.images import IMAGE_SUFFIXES, InputFolderError, read_rgb
from stas_pipeline.core.mask_io import prediction_files, read_grey_png, size_text
from stas_pipeline.core.problems import Problems

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
    image = read_rgb(found[0])
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
    reference is reported as a warning; :class:`InputFolderError` when no prediction is named like a reference
    or none could be scored. With ``csv_path`` the rows are written as CSV; with ``overlays`` (and
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
    if not pred_files.keys() & ref_files.keys():
        example = f" (e.g. {next(iter(pred_files))}.png)" if pred_files else ""
        raise InputFolderError(f"{pred}: no prediction is named like a reference mask of {ref}{example}; "
                               "nothing to score")

    problems = Problems(STAGE, done=("scored",))
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
    if not rows:
        raise InputFolderError(f"{pred}: no prediction could be scored (each named above); nothing written")
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
    """The line ``stas evaluate --pred`` prints: the mean of each metric over the images."""
    if not summary["count"]:
        return "no image scored"
    means = "  ".join(f"{m} {summary[m]:.4f}" for m in METRICS)
    return f"mean over {summary['count']} images: {means}"


def evaluate_command(args: argparse.Namespace) -> Problems:
    """``stas evaluate --pred``: score the folders, print the mean per image, return the problems."""
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
    print(format_summary(summarize(rows)))
    return problems
