"""Tasks: what one kind of challenge adds to the shared stages, registered by name.

A bundle names its task (``task#name``, declared in ``bundles/tasks/<name>.json`` with the task's network, loss,
metric, transforms and inference entry), and every run records it in ``best.json``; the stages look the task
up here to find what they need in Python: the key metric and how predictions are made and written.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    key_metric: str  # what the run recorder checkpoints on (bundle: task#metric_name)
    image_level: bool  # one score per image (a CSV) rather than a mask per image (PNGs)
    predictor: str  # "module:function" that predicts a list of images with trained runs

    def predict_function(self) -> Callable:
        module, name = self.predictor.split(":")
        return getattr(importlib.import_module(module), name)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


register(Task("segmentation", "val_dice", image_level=False, predictor="stas_pipeline.stages.predict:predict_images"))
register(Task("classification", "val_auc", image_level=True,
              predictor="stas_pipeline.tasks.classification.inference:predict_scores"))
