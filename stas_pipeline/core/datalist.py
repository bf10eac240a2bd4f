"""The datalist: the one reader and writer of the file that ``make-datalist`` and ``tile`` write and every later
stage reads.

Layout (a MONAI decathlon datalist, paths relative to the file)::

    {"task": "segmentation",                       # the task that wrote it (tasks/base.py); its label kind
     "label_kind": "mask",                         # "mask": label is a mask path; "number": a number; "": none
     "training": [{"image": rel, "label": rel-or-number, "fold": k, ...}, ...],
     "test": [{"image": rel[, "label": ...]}, ...],
     ...}                                          # what the task adds: "tiles" settings, "classes", ...

An entry may also name a window of its image (``"tile": {"y", "x", "size", "scale"}``: a tile of a slide, its
scale a float when tiled by microns per pixel);
entries without ``fold`` (pseudo labels) train in every fold. :func:`read_datalist` checks the layout and
resolves paths against the file's folder; :func:`entries` gives one section; :func:`load_fold` one fold's
training and validation parts; :func:`mask_of` and :func:`number_of` read an entry's label as its kind says.

Datalists written before ``task`` was recorded are read as the task their labels show (a ``tiles`` block:
slide; numbers: classification; mask paths or no labels: segmentation); write them again with
``make-datalist`` (or ``tile``) to record it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stas_pipeline.core.errors import StasError
from stas_pipeline.core.fileio import write_json
from stas_pipeline.core.problems import Problems

SECTIONS = ("training", "test")
LABEL_KINDS = ("mask", "number", "")


class DatalistError(StasError, ValueError):
    """A datalist that is missing, malformed, or cannot give what a stage asks of it."""


@dataclass
class Datalist:
    """A datalist as written (``raw``, paths relative to ``path``'s folder) with its declared task."""

    path: Path
    task: str
    label_kind: str
    raw: dict = field(repr=False)

    @property
    def base(self) -> Path:
        return self.path.parent

    def entries(self, section: str = "training") -> list[dict]:
        """The entries of ``section`` with their ``image`` (and mask ``label``) paths made absolute."""
        return [resolve_entry(e, self.base, self.label_kind) for e in self.raw.get(section) or []]

    def get(self, key: str, default: Any = None) -> Any:
        """A block the task added (``tiles``, ``classes``, ``pseudo_rounds``, ...)."""
        return self.raw.get(key, default)


def resolve_entry(entry: dict, base: Path, label_kind: str) -> dict:
    """``entry`` with its image path (and its label, when the label is a mask path) joined to ``base``."""
    out = dict(entry)
    out["image"] = os.path.normpath(base / entry["image"])
    if label_kind == "mask" and isinstance(entry.get("label"), str):
        out["label"] = os.path.normpath(base / entry["label"])
    return out


def _legacy_task(raw: dict) -> tuple[str, str]:
    """(task, label kind) of a datalist written before they were recorded, from what its labels are."""
    if "tiles" in raw:
        return "slide", "mask"
    labels = [e.get("label") for s in SECTIONS for e in raw.get(s) or [] if e.get("label") is not None]
    if any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels):
        return "classification", "number"
    return "segmentation", "mask" if labels else ""


def read_datalist(path: str | Path) -> Datalist:
    """The datalist at ``path``, its layout checked; DatalistError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DatalistError(f"datalist {path}: no such file (make one with: stas make-datalist)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as err:
        raise DatalistError(f"{path}: cannot read the datalist: {err}") from None
    except json.JSONDecodeError as err:
        raise DatalistError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("training", []), list):
        raise DatalistError(f"{path}: not a datalist (a JSON object with a 'training' list)")
    for section in SECTIONS:
        entries = raw.get(section, [])
        if not (isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("image"), str)
                                                  for e in entries)):
            raise DatalistError(f"{path}: every '{section}' entry must be an object with an 'image' path")
    if "task" in raw:
        task, kind = raw["task"], raw.get("label_kind", "")
        if not isinstance(task, str) or kind not in LABEL_KINDS:
            raise DatalistError(f"{path}: 'task' must be a task name and 'label_kind' one of {LABEL_KINDS}")
    else:
        task, kind = _legacy_task(raw)
    return Datalist(path, task, kind, raw)


def entries(path: str | Path, section: str = "training") -> list[dict]:
    """The entries of one section of the datalist at ``path``, paths absolute."""
    return read_datalist(path).entries(section)


def write_datalist(path: str | Path, datalist: dict, task: str, label_kind: str, overwrite: bool = False) -> None:
    """Write ``datalist`` (paths relative to ``path``'s folder) declaring ``task`` and ``label_kind``, atomically;
    an existing file raises OutputExistsError unless ``overwrite``."""
    if label_kind not in LABEL_KINDS:
        raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {label_kind!r}")
    write_json(path, {"task": task, "label_kind": label_kind, **datalist}, overwrite=overwrite)


def load_fold(datalist: str | Path, fold: int, section: str = "training") -> tuple[list[dict], list[dict]]:
    """``(train, val)`` entries of ``section``: validation is ``fold``, training every other fold.

    ``fold = -1`` trains on every entry and validates on none. Entries without a fold (pseudo-labelled ones)
    are in the training part of every fold. Raises DatalistError naming the bad value.
    """
    items = entries(datalist, section)
    folds = sorted({e.get("fold") for e in items if e.get("fold") is not None})
    if not isinstance(fold, int) or (fold != -1 and fold not in folds):
        raise DatalistError(f"fold {fold!r} is out of range: {datalist} has folds {folds} (or -1 for all data)")
    if fold == -1:
        return items, []
    return [e for e in items if e.get("fold") != fold], [e for e in items if e.get("fold") == fold]


def test_images(path: str | Path) -> list[Path]:
    """The ``image`` paths of the datalist's ``test`` list (each once, in order); DatalistError when empty."""
    images = list(dict.fromkeys(Path(e["image"]) for e in entries(path, "test")))
    if not images:
        raise DatalistError(f"{path}: the 'test' list is empty")
    return images


def mask_of(entry: dict, key: str = "label") -> str | None:
    """The mask path of an entry whose label is a mask, else None."""
    value = entry.get(key)
    return value if isinstance(value, (str, os.PathLike)) else None


def number_of(entry: dict, key: str = "label") -> float | None:
    """The numeric label of an entry, or None (no label, or a mask path)."""
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass
class SectionLabels:
    """The ground truth of one datalist section, by image key."""

    labels: dict[str, int]
    pseudo: set[str]  # pseudo-labelled entries: not ground truth
    unlabelled: set[str]
    folds: dict[str, int]  # the fold of each labelled entry that has one


def _label(value: object, classes: Sequence[int]) -> int | None:
    """One of ``classes`` from a JSON label (0, 1, 1.0, ...); None for anything else (bools, mask paths)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in classes:
        return None
    return int(value)


def read_section_labels(datalist: str | Path, section: str, problems: Problems,
                        classes: Sequence[int] = (0, 1)) -> SectionLabels:
    """The labels (0/1, or any of ``classes``, e.g. grades 0-4) of ``datalist``'s ``section`` (read with
    :func:`entries`), and the folds of those entries.

    Entries with ``pseudo_round`` and entries without ``label`` are set apart; an entry with a label not in
    ``classes`` or repeating an image is reported and left out. Raises :class:`DatalistError` for an unreadable
    datalist or labels that are all paths (a segmentation datalist).
    """
    datalist = Path(datalist)
    try:
        items = entries(datalist, section)
    except DatalistError as e:
        reason = str(e).removeprefix(f"{datalist}: ")
        raise DatalistError(f"{datalist}: cannot read the datalist: {reason}") from None
    labels: dict[str, int] = {}
    folds: dict[str, int] = {}
    pseudo: set[str] = set()
    unlabelled: set[str] = set()
    bad: list[tuple[str, str]] = []
    for i, entry in enumerate(items):
        where = f"{datalist} {section}[{i}]"
        key = str(Path(entry["image"]).resolve())  # joined to the datalist's folder by the reader already
        if "pseudo_round" in entry:
            pseudo.add(key)
            continue
        if "label" not in entry:
            unlabelled.add(key)
            continue
        label = _label(entry["label"], classes)
        if label is None:
            names = " or ".join(map(str, classes)) if len(classes) == 2 else f"one of {list(classes)}"
            bad.append((key, f"label {entry['label']!r} is not {names} ({where})"))
        elif key in labels:
            bad.append((key, f"listed twice in the {section!r} section of {datalist}; the first entry is used"))
        else:
            labels[key] = label
            if isinstance(entry.get("fold"), int):
                folds[key] = entry["fold"]
    if not labels and any(isinstance(e.get("label"), str) for e in items):
        raise DatalistError(f"{datalist}: the {section!r} labels are paths, not 0/1 (a segmentation datalist? "
                               "masks are scored with --pred/--ref)")
    for where, reason in bad:
        problems.skip(where, reason)
    return SectionLabels(labels, pseudo, unlabelled, folds)
