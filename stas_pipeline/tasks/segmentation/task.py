"""Segmentation (the STAS recipe): a mask per image; Dice; vote or mean of probability maps; PNG submission.

The hooks import their modules when called: every stage asks the registry, and importing every task's inference
and demo (torch, MONAI) at registration made ``stas make-datalist --help`` take 8.5 s instead of 0.2 s.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.base import Predictor, Task

MODES = ("resize", "sliding_window")  # stas predict --mode: see tasks/segmentation/inference.py
# the demo's (tasks/segmentation/demo.py) defaults per kind of data: the synthetic set is small and easy, the real
# images are 1716 x 942
SYNTHETIC_DEFAULTS = {"image_size": 160, "epochs": 20, "batch_size": 4, "lr": 2e-3}
REAL_DEFAULTS = {"image_size": 256, "epochs": 16, "batch_size": 4, "lr": 2e-3}
# the crop recipe (deeplab_lite0_crops: aspect-keeping scale, crops, Gaussian windows); image_size is the longer side
CROP_BUNDLE = "deeplab_lite0_crops"
CROP_SYNTHETIC_DEFAULTS = {"image_size": 320, "epochs": 12, "batch_size": 2, "lr": 2e-3, "crop_size": 128}
CROP_REAL_DEFAULTS = {"image_size": 858, "epochs": 12, "batch_size": 2, "lr": 2e-3, "crop_size": 256}


class SegmentationTask(Task):
    name = "segmentation"
    description = "a binary mask per image (LabelMe polygons -> masks; Dice; vote or mean ensembles)"
    label_kind = "mask"
    datalist_options = ("masks",)
    evaluate_options = ("pred",)
    demo_outputs = ("data", "masks", "split", "datalist.json", "runs", "predictions", "evaluation", "overlays",
                    "submission.zip")

    def make_datalist(self, args: argparse.Namespace, problems: Problems) -> dict:
        from stas_pipeline.tasks.segmentation.datalist import mask_datalist_from_args

        return mask_datalist_from_args(args, problems)

    def predictor(self, args: argparse.Namespace, infos: list[dict]) -> tuple[list[Path], Predictor]:
        from stas_pipeline.tasks.segmentation.inference import predictor

        return predictor(args, infos)

    def merge_predictions(self, out: Path, header: list[str], rows: list[list[str]], overwrite: bool) -> None:
        """Nothing to merge: each part wrote its masks into the shared folders."""

    def reads_predictions(self, path: Path) -> bool:
        from stas_pipeline.tasks.segmentation.ensemble import is_prediction_folder

        return is_prediction_folder(path)

    def ensemble(self, args: argparse.Namespace) -> Problems:
        from stas_pipeline.tasks.segmentation.ensemble import ensemble_command

        return ensemble_command(args)

    def evaluate(self, args: argparse.Namespace) -> Problems:
        from stas_pipeline.tasks.segmentation.evaluation import evaluate_command

        return evaluate_command(args)

    def demo(self, args: argparse.Namespace) -> Any:
        from stas_pipeline.tasks.segmentation.demo import SegmentationDemo

        return SegmentationDemo(args)
