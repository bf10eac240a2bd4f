"""Tasks: what one kind of challenge adds to the shared stages, one folder each, registered by name.

The seam is :mod:`stas_pipeline.tasks.base` (the :class:`~stas_pipeline.tasks.base.Task` hooks and the registry);
importing this package registers the four built-in tasks. docs/architecture.md shows which module holds each
stage's part of each task, and how to add a task.
"""

from __future__ import annotations

from stas_pipeline.tasks.base import Task, TaskError, all_tasks, choose, get_task, register
from stas_pipeline.tasks.classification.task import ClassificationTask
from stas_pipeline.tasks.grading.task import GradingTask
from stas_pipeline.tasks.segmentation.task import SegmentationTask
from stas_pipeline.tasks.slide.task import SlideTask

for _task in (SegmentationTask, ClassificationTask, GradingTask, SlideTask):
    register(_task)

__all__ = ["Task", "TaskError", "all_tasks", "choose", "get_task", "register"]
