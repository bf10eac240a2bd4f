"""Slides scored against their masks at level 0, and the threshold searched on them (out-of-fold slides).

For each predicted slide (``<id>_prob.npy`` of ``stas predict``, uint8 p x 255 at the prediction scale) and its
mask (an RLE CSV row, a mask image or polygons, as ``stas tile`` takes them), two 256-bin histograms of the
level-0 probability (each scaled pixel repeated) are counted by column strips, over all pixels and over mask
pixels; from them the Dice of ``p > t`` at every threshold t follows exactly, without predicting again. The
summary is the mean Dice over slides (each slide once, as the challenges score); the threshold with the best
mean is reported beside the default 0.5, with the curve as ``threshold_dice.png``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from stas_pipeline.core.errors import refused
from stas_pipeline.core.fileio import OutputExistsError, atomic_path, write_json
from stas_pipeline.core.images import InputFolderError
from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.slide.inference import RLE_STRIP, upsampled
from stas_pipeline.tasks.slide.reader import Slide, SlideError
from stas_pipeline.tasks.slide.tiling import MaskWindow, mask_sources, open_mask

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))


def probability_histograms(prob: np.ndarray, mask: MaskWindow, shape: tuple[int, int], scale: int | float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(all pixels, mask pixels): counts of each level-0 probability value 0..255."""
    height, width = shape
    everything, inside = np.zeros(256, np.int64), np.zeros(256, np.int64)
    for x in range(0, width, RLE_STRIP):
        w = min(RLE_STRIP, width - x)
        up = upsampled(prob, scale, 0, x, height, w)
        truth = mask(0, x, height, w).astype(bool)
        everything += np.bincount(up.ravel(), minlength=256)
        inside += np.bincount(up[truth], minlength=256)
    return everything, inside


def dice_at(everything: np.ndarray, inside: np.ndarray, threshold: float) -> float:
    """Dice of ``p > threshold`` from the histograms (1.0 when both prediction and mask are empty)."""
    cut = int(np.floor(255 * threshold))
    predicted, hit, truth = everything[cut + 1:].sum(), inside[cut + 1:].sum(), inside.sum()
    return 1.0 if predicted + truth == 0 else float(2 * hit / (predicted + truth))


def threshold_curve(histograms: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Per-slide Dice at 0.5, the mean Dice at every threshold of :data:`THRESHOLDS`, and the best."""
    curve = {t: float(np.mean([dice_at(a, m, t) for a, m in histograms.values()])) for t in THRESHOLDS}
    best = max(curve, key=lambda t: (curve[t], -abs(t - 0.5)))
    return {"dice_at_0.5": {k: dice_at(a, m, 0.5) for k, (a, m) in histograms.items()},
            "mean_dice_at_0.5": curve[0.5], "best_threshold": best, "mean_dice_at_best": curve[best],
            "curve": {str(t): d for t, d in curve.items()}}


def plot_curve(result: dict, path: Path) -> None:
    """Mean Dice against the threshold, the best marked."""
    import matplotlib  # imported here: pyplot's start-up is paid only by the evaluation that plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [float(t) for t in result["curve"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ts, list(result["curve"].values()), marker="o", ms=3)
    ax.axvline(result["best_threshold"], color="tab:red", ls="--",
               label=f"best {result['best_threshold']:.2f}: {result['mean_dice_at_best']:.4f}")
    ax.set(xlabel="threshold", ylabel="mean Dice over slides", title="Threshold on out-of-fold slides")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def open_prediction(prob_path: Path) -> tuple[np.ndarray, tuple[int, int], int | float]:
    """A predicted slide's map (memory-mapped), its level-0 (height, width) read from the ``<id>.tif`` beside it,
    and the scale between them (recorded in that TIFF; a float for a slide predicted by mpp)."""
    mask_path = prob_path.with_name(prob_path.name.removesuffix("_prob.npy") + ".tif")
    with Slide(mask_path) as mask:
        shape = mask.level_shape(0)
    with tifffile.TiffFile(mask_path) as tif:
        recorded = (tif.shaped_metadata or [{}])[0].get("scale")
    prob = np.load(prob_path, mmap_mode="r")
    return prob, shape, recorded or round(shape[0] / prob.shape[0])  # written before the scale was recorded


def predicted_slides(folder: Path) -> dict[str, Path]:
    """Slide id -> its ``<id>_prob.npy`` in a folder written by ``stas predict`` on slides."""
    return {re.sub(r"_prob\.npy$", "", p.name): p for p in sorted(folder.glob("*_prob.npy"))}


def is_slide_prediction_folder(path: Path) -> bool:
    """Whether ``path`` is a folder of ``stas predict`` on slides (it holds ``<id>_prob.npy``)."""
    return path.is_dir() and bool(predicted_slides(path))


def evaluate_command(args: argparse.Namespace) -> Problems:
    """``stas evaluate --slides``: the threshold curve of the predicted slides against ``--masks`` into ``--out``
    (``metrics.json``, ``threshold_dice.png``); prints the mean Dice at 0.5 and at the best threshold."""
    problems = Problems("evaluate")
    with refused():  # an unreadable mask source or unwritable output: one line, a refusal
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
    print(f"mean Dice over {len(histograms)} slides: {result['mean_dice_at_0.5']:.4f} at 0.5, "
          f"{result['mean_dice_at_best']:.4f} at the best threshold {result['best_threshold']:.2f}")
    return problems
