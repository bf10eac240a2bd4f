"""Ordinal grading (the diabetic-retinopathy recipe): a score and a grade per image; quadratic kappa.

The hooks import their modules when called (see tasks/segmentation/task.py: start-up time of every stage).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.classification.task import ClassificationTask


class GradingTask(ClassificationTask):
    name = "grading"
    description = "a grade 0-4 per image from three heads (quadratic kappa; cut points; ensembles of heads)"
    refines = ("classification",)
    datalist_options = ()  # the labels of classification (--labels-csv, --class-folders) with --task grading
    csv_columns = ("score", "grade")
    demo_outputs = ("data", "datalist.json", "runs", "predictions")

    def grade_of(self) -> Callable[[float], int]:
        from stas_pipeline.tasks.grading.metrics import grade_of

        return grade_of

    def scorer_for(self, info: dict) -> Callable:
        from stas_pipeline.tasks.grading.heads import scorer_for_run

        return scorer_for_run(info)

    def reads_predictions(self, path: Path) -> bool:
        from stas_pipeline.tasks.grading.evaluation import is_grading_csv

        return is_grading_csv(path)

    def ensemble(self, args: argparse.Namespace) -> Problems:
        from stas_pipeline.tasks.grading.ensembles import ensemble_command

        return ensemble_command(args)

    def evaluate(self, args: argparse.Namespace) -> Problems:
        from stas_pipeline.tasks.grading.evaluation import evaluate_command

        return evaluate_command(args)

    def demo(self, args: argparse.Namespace) -> Any:
        from stas_pipeline.tasks.grading.demo import GradingDemo

        return GradingDemo(args)
