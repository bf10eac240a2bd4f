"""Tasks: what one kind of challenge adds to the shared stages, one folder each, registered by name.

A bundle names its task (``task#name``, declared in ``bundles/tasks/<name>.json`` with the task's network, loss,
metric, chains and inference entry), and every run records it in ``best.json``; ``stas predict`` looks it up here
to know what the run writes: a mask per image (``segmentation/``) or one score per image in a CSV
(``classification/``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    image_level: bool  # one score per image (a CSV) rather than a mask per image (PNGs)


TASKS = {task.name: task for task in (Task("segmentation", image_level=False),
                                      Task("classification", image_level=True))}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]
