"""Clean predicted masks: remove small connected components, fill holes.

``stas postprocess --pred DIR --out DIR [--min-size N] [--fill-holes]`` binarises every ``DIR/<stem>.png``
(``value / 255 > --threshold``, default any value > 0), removes the foreground components (8-connected) of
fewer than N pixels, then fills the holes (background regions not connected to the image border), and writes
``OUT/<stem>.png`` (mode L, 0/255). Both steps are off by default. ``OUT`` is written atomically, as by
``stas ensemble``. See docs/postprocess.md for what each step does to Dice on the STAS sample.

``stas postprocess --pred PROBS --ref MASKS --study study.csv`` chooses the settings instead of applying them:
every combination of ``--thresholds``, ``--min-sizes`` and hole filling is scored on the images of both folders
(mean per-image Dice, images better / worse than the plain 0.5 cut), written to the CSV best first, and the
best one printed as the command that applies it. Run it on out-of-fold probability maps
(``stas predict --datalist D --out-of-fold --save-probs PROBS``), never on the test images.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from stas_pipeline.core.cli_types import non_negative_int, probability_threshold
from stas_pipeline.core.fileio import OutputExistsError, atomic_folder, atomic_path, write_png
from stas_pipeline.core.mask_io import InputFolderError, NothingWrittenError, prediction_files, read_grey_png
from stas_pipeline.core.problems import Problems

STAGE = "postprocess"


def small_component_remover(mask: np.ndarray) -> Callable[[int], np.ndarray]:
    """``mask`` labelled once (full connectivity, any dimension): a function of ``min_size`` that returns the
    mask without its foreground components of fewer than ``min_size`` pixels."""
    mask = np.asarray(mask).astype(bool)
    if not mask.any():
        return lambda _: mask
    labels, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    sizes = np.bincount(labels.ravel())

    def without_small(min_size: int) -> np.ndarray:
        if min_size <= 1:
            return mask
        keep = sizes >= min_size
        keep[0] = False
        return keep[labels]

    return without_small


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop the foreground components of fewer than ``min_size`` pixels (full connectivity, any dimension)."""
    if min_size <= 1:
        return np.asarray(mask).astype(bool)
    return small_component_remover(mask)(min_size)


def postprocess_mask(mask: np.ndarray, min_size: int = 0, fill_holes: bool = False) -> np.ndarray:
    """Binary mask (nonzero = foreground) without components under ``min_size`` pixels, holes filled if
    ``fill_holes``."""
    out = remove_small_components(mask, min_size)
    return ndimage.binary_fill_holes(out) if fill_holes else out


def postprocess_folder(
    pred: str | Path,
    out: str | Path,
    min_size: int = 0,
    fill_holes: bool = False,
    threshold: float = 0.0,
    overwrite: bool = False,
) -> Problems:
    """Post-process every ``pred/<stem>.png`` into ``out/<stem>.png``; ``out`` is written atomically.

    Unreadable masks are reported and skipped. Raises :class:`InputFolderError` when ``pred`` holds no PNG,
    :class:`OutputExistsError` for a non-empty ``out`` without ``overwrite``, :class:`NothingWrittenError`
    when every mask was skipped.
    """
    files = prediction_files(pred)
    if not files:
        raise InputFolderError(f"{pred}: no *.png masks")
    problems = Problems(STAGE)
    for counter in ("written", "pixels removed", "pixels filled"):
        problems.count(counter, 0)
    with atomic_folder(out, overwrite) as tmp:
        for stem, paths in tqdm(sorted(files.items()), desc=STAGE, unit="image", file=sys.stderr):
            try:
                if len(paths) > 1:
                    raise ValueError(f"more than one file for this image: {', '.join(map(str, paths))}")
                mask = read_grey_png(paths[0], problems) > threshold * 255
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                with tqdm.external_write_mode(file=sys.stderr):
                    problems.skip(paths[0], str(e))
                continue
            result = postprocess_mask(mask, min_size, fill_holes)
            write_png(tmp / f"{stem}.png", result.astype(np.uint8) * 255)
            problems.count("written")
            problems.count("pixels removed", int(np.count_nonzero(mask & ~result)))
            problems.count("pixels filled", int(np.count_nonzero(result & ~mask)))
        if not problems.counts["written"]:
            raise NothingWrittenError(
                f"{out}: every mask was skipped; nothing written, the folder left as it was"
            )
    return problems


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    return 2 * int(np.count_nonzero(pred & ref)) / total if total else 1.0


def study(pred: str | Path, ref: str | Path, thresholds: Sequence[float], min_sizes: Sequence[int],
          problems: Problems | None = None) -> list[dict]:
    """Mean per-image Dice of every (threshold, min_size, fill_holes) on the stems of both folders, best first;
    ``better`` / ``worse``: images whose Dice went up / down against threshold 0.5 alone. Unreadable or
    mismatched pairs are reported to ``problems`` and left out."""
    problems = problems or Problems(STAGE)
    preds, refs = prediction_files(pred), prediction_files(ref)
    stems = sorted(set(preds) & set(refs))
    if not stems:
        raise InputFolderError(f"{pred} and {ref}: no <stem>.png in both")
    settings = [(t, n, f) for t in thresholds for n in min_sizes for f in (False, True)]
    scores: dict[tuple, list[float]] = {k: [] for k in [*settings, (0.5, 0, False)]}
    for stem in tqdm(stems, desc=f"{STAGE} study", unit="image", file=sys.stderr):
        try:
            value, truth = read_grey_png(preds[stem][0], problems), read_grey_png(refs[stem][0], problems) > 0
            if value.shape != truth.shape:
                raise ValueError(f"prediction is {value.shape[::-1]}, reference {truth.shape[::-1]} (width, height)")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            problems.skip(preds[stem][0], str(e))
            continue
        for t in sorted({t for t, _, _ in scores}):
            without_small = small_component_remover(value > t * 255)  # labelled once per threshold
            for n in sorted({n for k, n, _ in scores if k == t}):
                kept = without_small(n)
                for fill in sorted({f for k, m, f in scores if (k, m) == (t, n)}):
                    mask = ndimage.binary_fill_holes(kept) if fill else kept
                    scores[(t, n, fill)].append(_dice(mask, truth))
    if not scores[settings[0]]:
        raise NothingWrittenError(f"{pred}: no image could be scored")
    base = np.asarray(scores[(0.5, 0, False)])
    rows = [{"threshold": t, "min_size": n, "fill_holes": f, "dice": round(float(np.mean(v)), 4),
             "better": int(np.sum(np.asarray(v) > base + 1e-9)), "worse": int(np.sum(np.asarray(v) < base - 1e-9)),
             "images": len(v)} for (t, n, f), v in ((k, scores[k]) for k in settings)]
    return sorted(rows, key=lambda r: -r["dice"])


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Post-process predicted masks: remove connected components smaller than --min-size "
        "pixels, fill holes. Writes --out/<stem>.png (mode L, 0/255) atomically; both steps are off by "
        "default.",
    )
    parser.add_argument("--pred", type=Path, required=True,
                        help="folder of predicted <stem>.png masks (or probability maps, p * 255)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path, help="output folder (written only when complete)")
    mode.add_argument("--study", type=Path, metavar="CSV",
                      help="score every combination of --thresholds, --min-sizes and hole filling against --ref "
                      "instead (use out-of-fold probability maps): the table, best first, goes to CSV")
    parser.add_argument("--ref", type=Path, help="--study: folder of reference <stem>.png masks (nonzero = fg)")
    parser.add_argument("--thresholds", type=probability_threshold, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7],
                        metavar="T", help="--study: cuts of value / 255 (default: 0.3 0.4 0.5 0.6 0.7)")
    parser.add_argument("--min-sizes", type=non_negative_int, nargs="+", default=[0, 100, 500, 2000, 5000],
                        metavar="N", help="--study: smallest kept components (default: 0 100 500 2000 5000)")
    parser.add_argument(
        "--min-size",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="remove 8-connected foreground components of fewer than N pixels (default: 0, keep all)",
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


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when every mask was written, 1 when any was skipped, 2 for unusable input."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.study is not None:
        if args.ref is None:
            parser.error("--study needs --ref")
        return _main_study(args)
    try:
        problems = postprocess_folder(
            args.pred,
            args.out,
            min_size=args.min_size,
            fill_holes=args.fill_holes,
            threshold=args.threshold,
            overwrite=args.overwrite,
        )
    except NothingWrittenError as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 1
    except (InputFolderError, OutputExistsError) as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 2
    return problems.finish()


def _main_study(args: argparse.Namespace) -> int:
    problems = Problems(STAGE)
    try:
        rows = study(args.pred, args.ref, args.thresholds, args.min_sizes, problems)
        with atomic_path(args.study, args.overwrite) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    except (InputFolderError, OutputExistsError, NothingWrittenError) as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 2
    plain = next((r for r in rows if (r["threshold"], r["min_size"], r["fill_holes"]) == (0.5, 0, False)), None)
    best = rows[0]
    for row in ([plain] if plain else []) + [best]:
        print(f"threshold {row['threshold']}, min size {row['min_size']}, fill holes {row['fill_holes']}: "
              f"mean Dice {row['dice']:.4f} ({row['better']} better, {row['worse']} worse, {row['images']} images)")
    print(f"best: stas postprocess --pred PRED --out OUT --threshold {best['threshold']} --min-size "
          f"{best['min_size']}" + (" --fill-holes" if best["fill_holes"] else ""))
    problems.count("scored", best["images"])
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
