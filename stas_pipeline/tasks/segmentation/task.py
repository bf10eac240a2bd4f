"""Segmentation (the STAS recipe): a mask per image; Dice; vote or mean of probability maps; PNG submission."""

from __future__ import annotations

from stas_pipeline.tasks.base import Task


class SegmentationTask(Task):
    name = "segmentation"
    description = "a binary mask per image (LabelMe polygons -> masks; Dice; vote or mean ensembles)"
    label_kind = "mask"
    datalist_options = ("masks",)
    evaluate_options = ("pred",)
