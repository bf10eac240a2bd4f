"""Image-level classification (the glaucoma fundus recipe): one probability per image in a CSV; ROC AUC.

The hooks import their modules when called (see tasks/segmentation/task.py: start-up time of every stage).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stas_pipeline.core.options import TTA_VIEWS
from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.base import Predictor, Task

TTA_MODES = (*TTA_VIEWS, "two-crop", "ten-crop")  # stas predict --tta of image-level runs: see inference.py
DEMO_DEFAULTS = {"image_size": 64, "epochs": 6, "batch_size": 8, "lr": 2e-3, "folds": 3}  # its demo's, and grading's


class ClassificationTask(Task):
    name = "classification"
    description = "one probability per image (labels CSV or class folders; ROC AUC; fold means; pseudo labels)"
    label_kind = "number"
    image_level = True
    datalist_options = ("labels_csv", "class_folders")
    evaluate_options = ("predictions",)
    csv_columns: tuple[str, ...] = ("prob",)  # the predictions CSV's columns after ``image``, before the members'
    demo_outputs = ("data", "datalist.json", "datalist_round1.json", "runs", "predictions", "experiments.md",
                    "experiments.csv")

    def grade_of(self) -> Callable[[float], int] | None:
        """The grade of a mean score (a column of the CSV), or None: classification writes no grade."""
        return None

    def make_datalist(self, args: argparse.Namespace, problems: Problems) -> dict:
        from stas_pipeline.tasks.classification.label_sources import label_datalist_from_args

        return label_datalist_from_args(args, problems)

    def predictor(self, args: argparse.Namespace, infos: list[dict]) -> tuple[list[Path], Predictor]:
        from stas_pipeline.tasks.classification.inference import predictor

        return predictor(args, infos, self.scorer_for, self.csv_columns[0], self.grade_of())

    def merge_predictions(self, out: Path, header: list[str], rows: list[list[str]], overwrite: bool) -> None:
        from stas_pipeline.tasks.classification.scores_csv import write_scores_csv

        members = header[1 + len(self.csv_columns):]
        write_scores_csv(out, [dict(zip(header, r, strict=True)) for r in rows], members, overwrite, self.csv_columns)

    def pseudo_label(self, args: argparse.Namespace) -> Problems:
        from stas_pipeline.tasks.classification.pseudo_labels import pseudo_label_images

        return pseudo_label_images(args)

    def reads_predictions(self, path: Path) -> bool:
        from stas_pipeline.tasks.classification.scores_csv import is_probability_csv

        return is_probability_csv(path)

    def ensemble(self, args: argparse.Namespace) -> Problems:
        from stas_pipeline.tasks.classification.ensemble import ensemble_command

        return ensemble_command(args)

    def evaluate(self, args: argparse.Namespace) -> Problems:
        from stas_pipeline.tasks.classification.evaluation import evaluate_command

        return evaluate_command(args)

    def demo(self, args: argparse.Namespace) -> Any:
        from stas_pipeline.tasks.classification.demo import ClassificationDemo

        return ClassificationDemo(args)
