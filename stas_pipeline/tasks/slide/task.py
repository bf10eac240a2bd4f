"""Whole-slide tiled segmentation (the kidney-glomeruli recipe): tiles over tissue, stitched windows, RLE.

The hooks import their modules when called (see tasks/segmentation/task.py: start-up time of every stage).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.base import Predictor, Task
from stas_pipeline.tasks.segmentation.task import SegmentationTask

STITCH_MODES = ("gaussian", "centre")  # stas predict --stitch: see tasks/slide/inference.py
TISSUE_METHODS = ("saturation", "otsu")  # stas tile/predict --tissue-method: see tasks/slide/tissue.py
# the demo's (tasks/slide/demo.py): tiles of 512 level-0 pixels cached at 128, 4 epochs a fold (under 3 minutes on
# a 2-core CPU: docs/benchmarks.md)
DEMO_TILE = {"size": 512, "stride": 256, "scale": 4}
DEMO_DEFAULTS = {"image_size": DEMO_TILE["size"] // DEMO_TILE["scale"], "epochs": 4, "batch_size": 8, "lr": 2e-3,
                 "folds": 2}


class SlideTask(SegmentationTask):
    name = "slide"
    description = "masks of whole slides (tiles over tissue; stitched windows; Dice at every threshold; RLE)"
    refines = ("segmentation",)
    datalist_options = ()
    predict_options = ("slides",)
    evaluate_options = ("slides",)
    demo_outputs = ("data", "tiles", "runs", "predictions", "evaluation")
    make_datalist = Task.make_datalist  # its datalist is written by stas tile

    def entry_loader(self) -> Callable:
        from stas_pipeline.core.lmdb_cache import array_loader
        from stas_pipeline.tasks.slide.tiling import load_tile

        return array_loader(load_tile)

    def read_entry(self, entry: dict) -> dict:
        from stas_pipeline.tasks.slide.tiling import load_tile

        return load_tile(entry)

    def predictor(self, args: argparse.Namespace, infos: list[dict]) -> tuple[list[Path], Predictor]:
        from stas_pipeline.tasks.slide.inference import predictor

        return predictor(args, infos)

    def merge_predictions(self, out: Path, header: list[str], rows: list[list[str]], overwrite: bool) -> None:
        """``predictions.csv`` (``id,encoding``) from the parts' rows; the slides' files are in place."""
        from stas_pipeline.tasks.slide.rle import write_rle_csv

        write_rle_csv([(ident, rle) for ident, rle in rows], Path(out) / "predictions.csv", overwrite)

    def pseudo_label(self, args: argparse.Namespace) -> Problems:
        from stas_pipeline.tasks.slide.pseudo_labels import pseudo_label_tiles

        return pseudo_label_tiles(args)

    def reads_predictions(self, path: Path) -> bool:  # ensembled as segmentation's folders (its ensemble)
        from stas_pipeline.tasks.slide.evaluation import is_slide_prediction_folder

        return is_slide_prediction_folder(path)

    def evaluate(self, args: argparse.Namespace) -> Problems:
        from stas_pipeline.tasks.slide.evaluation import evaluate_command

        return evaluate_command(args)

    def demo(self, args: argparse.Namespace) -> Any:
        from stas_pipeline.tasks.slide.demo import SlideDemo

        return SlideDemo(args)
