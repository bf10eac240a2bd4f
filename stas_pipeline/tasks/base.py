"""The task seam: what one kind of challenge adds to the shared stages, behind one small interface.

A task is a :class:`Task` registered by name (:func:`register`). The four built-in tasks register themselves
when :mod:`stas_pipeline.tasks` is imported; another package registers its own through the entry-point group
``stas_pipeline.tasks`` (``name = "module:TaskClass"``) or by calling :func:`register` before a stage runs (the
test task in ``tests/regression_task.py`` does).

A stage parses its arguments, asks :func:`choose` for the task (from the options the user gave, the datalist's
declared ``task`` and the runs' recorded ``task``) and calls that task's hook. A hook a task does not have
raises :class:`TaskError` naming the task and the stage.

``refines``: a task that is a special case of another (``slide``: segmentation runs over tiles of whole slides;
``grading``: image-level numbers like ``classification``). When the user's options, the datalist and the runs
name different tasks, the one that refines all the others is chosen: segmentation runs with a datalist of tiles
predict slides; a grading run with a datalist of numeric labels predicts grades.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from stas_pipeline.core.bundles import add_bundle_dir
from stas_pipeline.core.datalist import read_datalist
from stas_pipeline.core.errors import StasError
from stas_pipeline.core.images import read_rgb
from stas_pipeline.core.problems import Problems

if TYPE_CHECKING:
    from stas_pipeline.core.sharding import Journal


class Predictor(Protocol):
    """``(inputs, estimating, journal=None) -> problems``: estimating writes nothing; with a ``journal`` (a sharded
    or resumable run, ``core/sharding.py``) each finished input is recorded and no merged output is written."""

    def __call__(self, inputs: Sequence[Path], estimating: bool, journal: Journal | None = None) -> Problems: ...

ENTRY_POINT_GROUP = "stas_pipeline.tasks"


class TaskError(StasError, ValueError):
    """A task that is not registered, a hook a task does not have, or inputs of tasks that do not fit together."""


class Task:
    """One task's hooks into the stages. Subclasses set the class attributes and override the hooks they have."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    refines: ClassVar[tuple[str, ...]] = ()  # tasks this one is a special case of (see the module's docstring)
    label_kind: ClassVar[str] = ""  # what a datalist entry's label is: "mask" (a path), "number", "" (none)
    image_level: ClassVar[bool] = False  # predictions are one row per image in a CSV, not a file per image
    datalist_options: ClassVar[tuple[str, ...]] = ()  # make-datalist options (dests) whose use selects this task
    predict_options: ClassVar[tuple[str, ...]] = ()  # predict options (dests) whose use selects this task
    evaluate_options: ClassVar[tuple[str, ...]] = ()  # evaluate options (dests) whose use selects this task
    bundle_dir: ClassVar[Path | None] = None  # a folder of the task's own bundles (a task outside the package)

    def _missing(self, stage: str) -> TaskError:
        return TaskError(f"task {self.name!r} has no {stage} step")

    # --- make-datalist ------------------------------------------------------------------------------------
    def make_datalist(self, args: argparse.Namespace, problems: Problems) -> dict:
        """The datalist (``core/datalist.py``'s layout, without ``task``) from make-datalist's arguments."""
        raise self._missing("make-datalist")

    # --- build-lmdb -----------------------------------------------------------------------------------------
    def entry_loader(self) -> Callable[[dict, Any, Sequence[str]], dict] | None:
        """``(entry, preprocessing, keys) -> loaded arrays`` for entries that are not plain files (tiles of a
        slide), or None: the chain's own loader on the entry's files."""
        return None

    def read_entry(self, entry: dict) -> dict:
        """An entry's ``image`` as an (H, W, 3) uint8 array by the image policy (its paths resolved); tasks whose
        entries are not image files (tiles of a slide) override it."""
        return {"image": read_rgb(entry["image"])}

    # --- predict ---------------------------------------------------------------------------------------------
    def predictor(self, args: argparse.Namespace, infos: list[dict]) -> tuple[list[Path], Predictor]:
        """The inputs to predict and the function predicting them, from predict's arguments and the runs'
        records (``best.json``)."""
        raise self._missing("predict")

    def merge_predictions(self, out: Path, header: list[str], rows: list[list[str]], overwrite: bool) -> None:
        """A sharded prediction's merged output at ``out`` from the parts' recorded ``rows`` (cells under
        ``header``, in the order of one process). Tasks without it predict in one process only."""
        raise self._missing("sharded or resumable predict (--num-parts, torchrun, --continue)")

    def shards(self) -> bool:
        """Whether the task predicts in parts: its predictor takes a journal and it merges the parts."""
        return type(self).merge_predictions is not Task.merge_predictions

    def scorer_for(self, info: dict) -> Callable | None:
        """Image-level: the function turning a run's logits into one score per image, None for a probability."""
        return None

    # --- ensemble ----------------------------------------------------------------------------------------------
    def reads_predictions(self, path: Path) -> bool:
        """Whether ``path`` is a prediction of this task (a folder of masks, a scores CSV, ...)."""
        return False

    def ensemble(self, args: argparse.Namespace) -> Problems:
        raise self._missing("ensemble")

    # --- evaluate ------------------------------------------------------------------------------------------------
    def evaluate(self, args: argparse.Namespace) -> Problems:
        raise self._missing("evaluate")

    # --- pseudo-label ------------------------------------------------------------------------------------------
    def pseudo_label(self, args: argparse.Namespace) -> Problems:
        raise self._missing("pseudo-label")

    # --- demo ----------------------------------------------------------------------------------------------------
    def demo(self, args: argparse.Namespace) -> Any:
        """The demo of this task: an object with ``STAGE_NAMES``, ``stage_<name>()``, ``seconds``, ``summary()``,
        ``print_summary(summary)`` and ``out`` (``stages/demo.py`` runs it)."""
        raise self._missing("demo")

    demo_outputs: ClassVar[tuple[str, ...]] = ()  # what the demo writes into its folder (removed by --overwrite)


_REGISTRY: dict[str, Task] = {}
_LOADED_ENTRY_POINTS = False


def register(task: Task | type[Task]) -> Task:
    """Register ``task`` (an instance or a class) under its name; a later registration of a name replaces it."""
    instance = task() if isinstance(task, type) else task
    if not instance.name:
        raise TaskError(f"{type(instance).__name__}: a task needs a name")
    _REGISTRY[instance.name] = instance
    if instance.bundle_dir is not None:
        add_bundle_dir(instance.bundle_dir)
    return instance


def _load_entry_points() -> None:
    global _LOADED_ENTRY_POINTS
    if not _LOADED_ENTRY_POINTS:
        _LOADED_ENTRY_POINTS = True
        for point in entry_points(group=ENTRY_POINT_GROUP):
            register(point.load())


def all_tasks() -> dict[str, Task]:
    """Every registered task by name, in registration order."""
    _load_entry_points()
    return dict(_REGISTRY)


def get_task(name: str) -> Task:
    tasks = all_tasks()
    if name not in tasks:
        raise TaskError(f"unknown task {name!r}; registered tasks: {', '.join(tasks)}")
    return tasks[name]


def _refines(task: Task, other: Task) -> bool:
    """``task`` is ``other`` or, through its ``refines``, a special case of it."""
    if task.name == other.name:
        return True
    return any(_refines(get_task(name), other) for name in task.refines)


def most_specific(names: Iterable[str], what: str = "the inputs") -> Task:
    """The task among ``names`` that refines every other one; a TaskError when they do not fit together."""
    tasks = [get_task(n) for n in dict.fromkeys(names)]
    for task in tasks:
        if all(_refines(task, other) for other in tasks):
            return task
    raise TaskError(f"{what} are of tasks that do not fit together: {', '.join(t.name for t in tasks)}")


def claimed_by_options(args: argparse.Namespace, attribute: str) -> list[str]:
    """The tasks whose ``attribute`` (e.g. ``predict_options``) names an option the user gave."""
    return [t.name for t in all_tasks().values()
            if any(getattr(args, dest, None) not in (None, False, []) for dest in getattr(t, attribute))]


def choose(*names: str | None, what: str = "the inputs") -> Task:
    """The task of a stage: the most specific of the tasks named by the options, the datalist and the runs."""
    given = [n for n in names if n]
    if not given:
        raise TaskError(f"{what}: no task is declared (a datalist's or run record's 'task')")
    return most_specific(given, what)


def load_entry(datalist: str | Path, entry: dict) -> dict:
    """``entry`` of ``datalist`` read by its task's :meth:`Task.read_entry` (what a bundle fits a stain target to)."""
    return get_task(read_datalist(datalist).task).read_entry(entry)


def task_of_predictions(paths: Sequence[Path], explicit: str | None = None) -> Task:
    """The task whose prediction files ``paths`` are (asked of every registered task), or ``explicit``."""
    if explicit:
        return get_task(explicit)
    names = []
    for path in paths:
        readers = [t.name for t in all_tasks().values() if t.reads_predictions(Path(path))]
        if not readers:
            raise TaskError(f"{path}: not a prediction any task reads (a folder of masks or a predictions CSV)")
        names.append(most_specific(readers, str(path)).name if len(readers) > 1 else readers[0])
    if len(set(names)) > 1:
        raise TaskError(f"the members are predictions of different tasks: {', '.join(dict.fromkeys(names))}; "
                        "ensemble either prediction CSVs or folders")
    return get_task(names[0])
