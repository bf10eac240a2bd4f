"""Pixel-level pseudo labels for unlabelled slides: the classification task's rounds, with tiles.

From a folder of ``stas predict`` on slides (``<id>_prob.npy``, ``<id>.tif``): each predicted slide's pseudo mask
is its level-0 probability at or above ``high`` (an RLE row of ``<out stem>_pseudo_masks.csv`` beside the new
datalist). A tile of the datalist's test list on such a slide becomes a pseudo-labelled training tile when it is
confident: at most ``max_uncertain`` of its pixels lie strictly between ``low`` and ``high``; the rest are
counted as uncertain. Pseudo tiles carry ``source: "pseudo"`` and their ``pseudo_round`` and no fold (they train
every fold and validate none), and their ``mask_fraction`` (for balanced draws) is the pseudo mask's share.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.slide.evaluation import open_prediction, predicted_slides
from stas_pipeline.tasks.slide.inference import slide_rle
from stas_pipeline.tasks.slide.rle import file_id


def pseudo_tiles(test: list[dict], predictions: Path, high: float, low: float, max_uncertain: float,
                 problems: Problems) -> tuple[dict[str, str], list[dict], dict]:
    """(slide id -> pseudo-mask RLE, the confident tiles (the test entries with ``label_id`` and
    ``mask_fraction``; no label path yet), counts). Tiles of slides without a prediction are left alone."""
    probs = predicted_slides(predictions)
    lo, hi = math.floor(255 * low), math.ceil(255 * high)  # uncertain: lo < v < hi; positive: v >= hi
    rles: dict[str, str] = {}
    opened: dict[str, tuple[np.ndarray, int]] = {}  # slide id -> its map and scale, opened once
    kept: list[dict] = []
    counts = {"slides": 0, "tiles_added": 0, "tiles_uncertain": 0, "positive_tiles": 0}
    for entry in test:
        if "tile" not in entry:
            continue
        ident = file_id(entry["image"])
        if ident not in probs:
            continue
        if ident not in opened:
            prob, shape, scale = open_prediction(probs[ident])
            opened[ident] = prob, scale
            rles[ident] = slide_rle(prob, shape, scale, hi - 1)  # v >= hi
            counts["slides"] += 1
        prob, scale = opened[ident]
        t = entry["tile"]
        window = np.asarray(prob[t["y"] // scale:(t["y"] + t["size"]) // scale,
                                 t["x"] // scale:(t["x"] + t["size"]) // scale])
        if window.size == 0 or np.mean((window > lo) & (window < hi)) > max_uncertain:
            counts["tiles_uncertain"] += 1
            continue
        fraction = float(np.mean(window >= hi))
        kept.append({**entry, "label_id": ident, "mask_fraction": round(fraction, 5)})
        counts["tiles_added"] += 1
        counts["positive_tiles"] += int(fraction > 0)
    if not rles:
        problems.warn(predictions, "no predicted slide has tiles in the datalist's test list")
    return rles, kept, counts
