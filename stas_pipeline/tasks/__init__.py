"""Tasks: what one kind of challenge adds to the shared stages, one folder each, registered by name.

A bundle names its task (``task#name``, declared in ``bundles/tasks/<name>.json`` with the task's network, loss,
metric, chains and inference entry), and every run records it in ``best.json``; ``stas predict`` looks it up here
to know what the run writes: a mask per image (``segmentation/``) or one score per image in a CSV
(``classification/``, ``grading/``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    image_level: bool  # one score per image (a CSV) rather than a mask per image (PNGs)
    csv_columns: tuple[str, ...] = ()  # image-level: the CSV's columns after ``image``, before the members'
    scorer: str = ""  # image-level: "module:function" (run info) -> logits-to-scores function; "" = probability

    def scorer_for(self, info: dict) -> Callable | None:
        """The function turning a run's logits into one score per image, or None for the default (probability)."""
        if not self.scorer:
            return None
        module, name = self.scorer.split(":")
        return getattr(importlib.import_module(module), name)(info)


TASKS = {task.name: task for task in (
    Task("segmentation", image_level=False),
    Task("classification", image_level=True, csv_columns=("prob",)),
    Task("grading", image_level=True, csv_columns=("score", "grade"),
         scorer="stas_pipeline.tasks.grading.heads:scorer_for_run"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]
