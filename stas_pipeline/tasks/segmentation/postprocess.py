"""Segmentation's post-processing of predicted masks: remove small or faint connected components, fill holes.

``stas postprocess --pred DIR --out DIR [--min-size N] [--seed-threshold S] [--fill-holes]`` binarises every
``DIR/<stem>.png`` (``value / 255 > --threshold``, default any value > 0), removes the foreground components
(8-connected) of fewer than N pixels and, on probability maps, those whose peak ``value / 255`` stays below S
(a double threshold: a low cut traces the outline, a component must reach S somewhere to be kept), then fills
the holes (background regions not connected to the image border), and writes ``OUT/<stem>.png`` (mode L,
0/255). Every step is off by default. ``OUT`` is written atomically, as by
``stas ensemble``. See docs/postprocess.md for what each step does to Dice on the STAS sample.

``stas postprocess --pred PROBS --ref MASKS --study study.csv`` chooses the settings instead of applying them:
every combination of ``--thresholds``, ``--min-sizes``, ``--seed-thresholds`` and hole filling is scored on the
images of both folders (mean per-image Dice, images better / worse than the plain 0.5 cut), written to the CSV
best first, and the best one printed as the command that applies it. Run it on out-of-fold probability maps
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

from stas_pipeline.core.errors import NothingWrittenError
from stas_pipeline.core.fileio import atomic_folder, atomic_path, write_png
from stas_pipeline.core.images import InputFolderError
from stas_pipeline.core.mask_io import prediction_files, read_grey_png
from stas_pipeline.core.problems import Problems

STAGE = "postprocess"


def component_filter(mask: np.ndarray, value: np.ndarray | None = None) -> Callable[..., np.ndarray]:
    """A function of ``min_size`` and ``seed`` that returns ``mask`` without its foreground components (full
    connectivity, any dimension) of fewer than ``min_size`` pixels or whose peak ``value`` (the map the mask was
    cut from; the mask itself when None) is below ``seed``. The mask is labelled once, at the first call that
    removes anything, and the peaks measured once, at the first call with a seed."""
    mask = np.asarray(mask).astype(bool)
    parts: dict[str, np.ndarray] = {}

    def kept(min_size: int, seed: float = 0.0) -> np.ndarray:
        if (min_size <= 1 and seed <= 0) or not mask.any():
            return mask
        if "labels" not in parts:
            parts["labels"] = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))[0]
            parts["sizes"] = np.bincount(parts["labels"].ravel())
        labels = parts["labels"]
        keep = parts["sizes"] >= min_size
        if seed > 0:
            if "peaks" not in parts:
                parts["peaks"] = ndimage.maximum(mask if value is None else value, labels, np.arange(len(keep)))
            keep &= parts["peaks"] >= seed
        keep[0] = False
        return keep[labels]

    return kept


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop the foreground components of fewer than ``min_size`` pixels (full connectivity, any dimension)."""
    return component_filter(mask)(min_size)


def postprocess_mask(mask: np.ndarray, min_size: int = 0, fill_holes: bool = False,
                     value: np.ndarray | None = None, seed: float = 0.0) -> np.ndarray:
    """Binary mask (nonzero = foreground) without components under ``min_size`` pixels or whose peak ``value``
    is below ``seed``, holes filled if ``fill_holes``."""
    out = component_filter(mask, value)(min_size, seed)
    return ndimage.binary_fill_holes(out) if fill_holes else out


def postprocess_folder(
    pred: str | Path,
    out: str | Path,
    min_size: int = 0,
    fill_holes: bool = False,
    threshold: float = 0.0,
    overwrite: bool = False,
    seed_threshold: float = 0.0,
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
                value = read_grey_png(paths[0], problems)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                with tqdm.external_write_mode(file=sys.stderr):
                    problems.skip(paths[0], str(e))
                continue
            mask = value > threshold * 255
            result = postprocess_mask(mask, min_size, fill_holes, value, seed_threshold * 255)
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
          problems: Problems | None = None, seeds: Sequence[float] = (0.0,)) -> list[dict]:
    """Mean per-image Dice of every (threshold, min_size, seed_threshold, fill_holes) on the stems of both folders,
    best first (a seed threshold at or below the cut changes nothing and is left out, but 0);
    ``better`` / ``worse``: images whose Dice went up / down against threshold 0.5 alone. Unreadable or
    mismatched pairs are reported to ``problems`` and left out; InputFolderError when none is left."""
    problems = problems or Problems(STAGE)
    preds, refs = prediction_files(pred), prediction_files(ref)
    stems = sorted(set(preds) & set(refs))
    if not stems:
        raise InputFolderError(f"{pred} and {ref}: no <stem>.png in both")
    settings = [(t, n, s, f) for t in thresholds for n in min_sizes for s in sorted({0.0, *seeds})
                for f in (False, True) if not 0 < s <= t]
    scores: dict[tuple, list[float]] = {k: [] for k in [*settings, (0.5, 0, 0.0, False)]}
    for stem in tqdm(stems, desc=f"{STAGE} study", unit="image", file=sys.stderr):
        try:
            value, truth = read_grey_png(preds[stem][0], problems), read_grey_png(refs[stem][0], problems) > 0
            if value.shape != truth.shape:
                raise ValueError(f"prediction is {value.shape[::-1]}, reference {truth.shape[::-1]} (width, height)")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            problems.skip(preds[stem][0], str(e))
            continue
        for t in sorted({k[0] for k in scores}):
            kept = component_filter(value > t * 255, value)  # labelled once per threshold
            for n, s in sorted({k[1:3] for k in scores if k[0] == t}):
                mask = kept(n, s * 255)
                for fill in sorted({k[3] for k in scores if k[:3] == (t, n, s)}):
                    scores[(t, n, s, fill)].append(_dice(ndimage.binary_fill_holes(mask) if fill else mask, truth))
    if not scores[settings[0]]:
        raise InputFolderError(f"{pred}: no image could be scored")
    base = np.asarray(scores[(0.5, 0, 0.0, False)])
    rows = [{"threshold": t, "min_size": n, "seed_threshold": s, "fill_holes": f, "dice": round(float(np.mean(v)), 4),
             "better": int(np.sum(np.asarray(v) > base + 1e-9)), "worse": int(np.sum(np.asarray(v) < base - 1e-9)),
             "images": len(v)} for (t, n, s, f), v in ((k, scores[k]) for k in settings)]
    return sorted(rows, key=lambda r: -r["dice"])


def study_command(args: argparse.Namespace) -> Problems:
    """``stas postprocess --study``: the table of :func:`study` into the CSV ``--study``; prints the plain 0.5 cut,
    the best setting and the command that applies it."""
    problems = Problems(STAGE)
    rows = study(args.pred, args.ref, args.thresholds, args.min_sizes, problems, args.seed_thresholds)
    with atomic_path(args.study, args.overwrite) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plain = next((r for r in rows if (r["threshold"], r["min_size"], r["seed_threshold"], r["fill_holes"])
                  == (0.5, 0, 0.0, False)), None)
    best = rows[0]
    for row in ([plain] if plain else []) + [best]:
        print(f"threshold {row['threshold']}, min size {row['min_size']}, seed threshold {row['seed_threshold']}, "
              f"fill holes {row['fill_holes']}: mean Dice {row['dice']:.4f} ({row['better']} better, "
              f"{row['worse']} worse, {row['images']} images)")
    print(f"best: stas postprocess --pred PRED --out OUT --threshold {best['threshold']} --min-size "
          f"{best['min_size']}" + (f" --seed-threshold {best['seed_threshold']}" if best["seed_threshold"] else "")
          + (" --fill-holes" if best["fill_holes"] else ""))
    problems.count("scored", best["images"])
    return problems
