"""Image-level classification (the glaucoma fundus recipe): one probability per image in a CSV; ROC AUC."""

from __future__ import annotations

from stas_pipeline.tasks.base import Task


class ClassificationTask(Task):
    name = "classification"
    description = "one probability per image (labels CSV or class folders; ROC AUC; fold means; pseudo labels)"
    label_kind = "number"
    image_level = True
    datalist_options = ("labels_csv", "class_folders")
    csv_columns: tuple[str, ...] = ("prob",)  # the predictions CSV's columns after ``image``, before the members'
