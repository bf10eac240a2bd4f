"""Pixel-level pseudo labels for unlabelled slides: the classification task's rounds, with tiles.

From a folder of ``stas predict`` on slides (``<id>_prob.npy``, ``<id>.tif``): each predicted slide's pseudo mask
is its level-0 probability at or above ``high`` (an RLE row of ``<out stem>_pseudo_masks.csv`` beside the new
datalist). A tile of the datalist's test list on such a slide becomes a pseudo-labelled training tile when it is
confident: at most ``max_uncertain`` of its pixels lie strictly between ``low`` and ``high``; the rest are
counted as uncertain. Pseudo tiles carry ``source: "pseudo"`` and their ``pseudo_round`` and no fold (they train
every fold and validate none), and their ``mask_fraction`` (for balanced draws) is the pseudo mask's share.

Earlier rounds' pseudo tiles are kept (a tile already pseudo-labelled keeps its mask) unless
``--replace-previous``, which drops them first. ``--runs`` (the run behind the predictions) is recorded, and
alternating rounds (``--group``, ``--labelled-by``: two groups of runs labelling the test slides for each other,
each round relabelling from scratch) are checked and recorded as tasks/classification/pseudo_labels.py says. The
round's record: ``{"round", "predictions", "runs", "high", "low", "max_uncertain", "masks", "slides",
"tiles_added", "tiles_uncertain", "positive_tiles", ["tiles_already_pseudo",] "replaced_previous", "group",
"labelled_by", "runs_datalist"}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np

from stas_pipeline.core.errors import refused
from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.classification.pseudo_labels import (
    STAGE,
    PseudoLabelError,
    check_round_options,
    group_fields,
    group_text,
    is_pseudo,
    next_round,
    read_round_datalist,
    rebase,
    rebased_datalist,
    relative,
    write_round,
)
from stas_pipeline.tasks.slide.evaluation import open_prediction, predicted_slides
from stas_pipeline.tasks.slide.inference import slide_rle
from stas_pipeline.tasks.slide.rle import file_id, write_rle_csv
from stas_pipeline.tasks.slide.tiling import scaled


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
        window = np.asarray(prob[scaled(t["y"], scale):scaled(t["y"] + t["size"], scale),
                                 scaled(t["x"], scale):scaled(t["x"] + t["size"], scale)])
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


def pseudo_label_slides(datalist: dict, datalist_path: str | Path, predictions: Path, out: str | Path,
                        high: float, low: float, max_uncertain: float, problems: Problems,
                        replace_previous: bool = False, extra: dict | None = None
                        ) -> tuple[dict, Path, list[tuple[str, str]]]:
    """The next round's datalist from slide predictions (see the module doc), the pseudo-mask CSV
    it names, and that CSV's rows; ``extra``: the record's ``runs`` and group fields, paths relative to ``out``."""
    base, new_base = Path(os.path.abspath(datalist_path)).parent, Path(os.path.abspath(out)).parent
    round_no = next_round(datalist)
    masks_csv = new_base / f"{Path(out).stem}_pseudo_masks.csv"
    rles, tiles, counts = pseudo_tiles(datalist.get("test", []), predictions, high, low, max_uncertain, problems)
    training = rebase(datalist["training"], base, new_base)
    replaced = sum(map(is_pseudo, training)) if replace_previous else 0
    training = [e for e in training if not (replace_previous and is_pseudo(e))]
    earlier = {(e["image"], json.dumps(e["tile"], sort_keys=True)) for e in training if is_pseudo(e) and "tile" in e}
    added = []
    for entry in rebase(tiles, base, new_base):
        if (entry["image"], json.dumps(entry["tile"], sort_keys=True)) in earlier:
            counts["tiles_already_pseudo"] = counts.get("tiles_already_pseudo", 0) + 1
            continue
        entry = {k: v for k, v in entry.items() if k != "fold"}
        added.append({**entry, "label": relative(masks_csv, new_base), "source": "pseudo", "pseudo_round": round_no})
    record = {"round": round_no, "predictions": relative(predictions, new_base), "runs": None, "high": high,
              "low": low, "max_uncertain": max_uncertain, "masks": relative(masks_csv, new_base), **counts,
              "tiles_added": len(added), "replaced_previous": replaced, **(extra or {})}
    new = rebased_datalist(datalist, base, new_base)
    new["training"] = training + added
    new["pseudo_rounds"] = [*datalist.get("pseudo_rounds", []), record]
    return new, masks_csv, sorted(rles.items())


def pseudo_label_tiles(args: argparse.Namespace) -> Problems:
    """``stas pseudo-label`` of slide predictions (``--predictions``: a folder of ``stas predict --slides``): the
    next round's datalist and its pseudo-mask CSV written, the round reported."""
    problems = Problems(STAGE)
    check_round_options(args)
    datalist = read_round_datalist(args.datalist)
    new_base = Path(os.path.abspath(args.out)).parent
    extra = {"runs": relative(args.runs, new_base), **group_fields(args, datalist, new_base, problems)}
    replace = args.replace_previous or extra["group"] is not None
    with refused(as_error=PseudoLabelError):  # slides or masks that cannot be read or written stop the round
        new, masks_csv, rows = pseudo_label_slides(datalist.raw, args.datalist, args.predictions, args.out,
                                                   args.high, args.low, args.max_uncertain, problems, replace, extra)
        if rows:
            write_rle_csv(rows, masks_csv, overwrite=args.overwrite)
    write_round(args.out, new, datalist, args.overwrite)
    r = new["pseudo_rounds"][-1]
    print(f"round {r['round']}{group_text(r)}: {r['tiles_added']} confident tiles of {r['slides']} slides added as "
          f"pseudo labels ({r['positive_tiles']} with foreground); {r['tiles_uncertain']} tiles left out (more than "
          f"{args.max_uncertain:g} of their pixels between {args.low:g} and {args.high:g}); masks in {masks_csv}"
          + (f"; {r['replaced_previous']} pseudo tiles of earlier rounds replaced" if replace else ""))
    return problems
