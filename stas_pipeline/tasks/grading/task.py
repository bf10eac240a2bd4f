"""Ordinal grading (the diabetic-retinopathy recipe): a score and a grade per image; quadratic kappa."""

from __future__ import annotations

from stas_pipeline.tasks.classification.task import ClassificationTask


class GradingTask(ClassificationTask):
    name = "grading"
    description = "a grade 0-4 per image from three heads (quadratic kappa; cut points; ensembles of heads)"
    refines = ("classification",)
    datalist_options = ()  # the labels of classification (--labels-csv, --class-folders) with --task grading
    csv_columns = ("score", "grade")
