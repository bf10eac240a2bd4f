"""Labels a bundle cannot learn, refused when its fold is loaded (before the first step), in one line that names
the bundle to use.

A task's bundle file declares the labels its bundles learn, in its ``task`` block: ``"labels": {"kind": "mask"}``
(a mask path per entry) or ``{"kind": "number", "values": [0, 1]}`` (numbers; ``values`` omitted: any number).
The declarations are read from the repository's bundles (``bundles/*.json`` and the task files their ``task``
macro names), by the task name the running bundle declares (``@task#name``); a task that declares none (a task
from outside the package) is not checked.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from stas_pipeline.core.bundles import BUNDLES_DIR, MACRO_ROOT
from stas_pipeline.core.datalist import load_fold, mask_of, number_of
from stas_pipeline.core.errors import StasError


class LabelError(StasError, ValueError):
    """A datalist whose labels the bundle cannot learn."""


@dataclass(frozen=True)
class Labels:
    """What a task's bundles learn: mask paths, or numbers (any, or one of ``values``)."""

    kind: str
    values: tuple[float, ...] | None = None

    def fits(self, label: object) -> bool:
        if self.kind == "mask":
            return mask_of({"label": label}) is not None
        number = number_of({"label": label})
        return number is not None and (self.values is None or number in self.values)

    def __str__(self) -> str:
        if self.kind == "mask":
            return "masks (a mask path per image)"
        return "numbers" if self.values is None else f"labels {values_text(self.values)}"


@dataclass(frozen=True)
class TaskLabels:
    """A task's declaration and its repository bundles, the quickest to train first (those that draw by stas
    tile's mask shares last: they need a tile datalist)."""

    task: str
    labels: Labels
    bundles: tuple[str, ...]


def values_text(values: object) -> str:
    """``0/1``, ``0-4`` (consecutive whole numbers), or the first and last of many."""
    ordered = sorted(set(values))
    shown = [str(int(v)) if float(v).is_integer() else f"{v:g}" for v in ordered]
    whole = all(float(v).is_integer() for v in ordered)
    if whole and len(ordered) > 2 and ordered[-1] - ordered[0] == len(ordered) - 1:
        return f"{shown[0]}-{shown[-1]}"
    return "/".join(shown) if len(shown) <= 4 else f"{shown[0]}..{shown[-1]} ({len(shown)} values)"


def labels_text(labels: list[object]) -> str:
    """How a user would name ``labels``: ``mask paths``, ``labels 0-4``, or both."""
    numbers = [number_of({"label": v}) for v in labels]
    parts = ["mask paths"] if any(mask_of({"label": v}) is not None for v in labels) else []
    if any(n is not None for n in numbers):
        parts.append(f"labels {values_text(n for n in numbers if n is not None)}")
    if any(mask_of({"label": v}) is None and n is None for v, n in zip(labels, numbers, strict=True)):
        parts.append("other values")
    return " and ".join(parts)


@functools.cache
def declared() -> dict[str, TaskLabels]:
    """Task name -> its labels declaration and bundles, from the package's bundles."""
    blocks: dict[str, tuple[Labels, list[tuple[tuple[bool, float], str]]]] = {}
    for path in sorted(BUNDLES_DIR.glob("*.json")):
        bundle = json.loads(path.read_text(encoding="utf-8"))
        macro = bundle.get("task") if isinstance(bundle, dict) else None
        if not (isinstance(macro, str) and macro.startswith("%") and "#" in macro):
            continue
        file, *keys = macro[1:].split("#")
        block = json.loads((MACRO_ROOT / file).read_text(encoding="utf-8"))
        for key in keys:
            block = block[key]
        if "labels" not in block:
            continue
        spec = block["labels"]
        values = tuple(float(v) for v in spec["values"]) if "values" in spec else None
        cost = float(bundle.get("image_size", math.inf)) * float(bundle.get("epochs", math.inf))
        tiles_only = bundle.get("balanced_sampling") is True  # draws by stas tile's mask shares: last
        blocks.setdefault(block["name"], (Labels(spec["kind"], values), []))[1].append(((tiles_only, cost),
                                                                                        path.stem))
    return {task: TaskLabels(task, labels, tuple(name for _, name in sorted(bundles)))
            for task, (labels, bundles) in blocks.items()}


def check_labels(entries: list[dict], datalist: str | Path, task: str, bundle: str) -> None:
    """LabelError naming ``datalist``, what ``bundle`` (of ``task``) learns, what the entries hold, and a bundle
    that learns them, when a labelled entry does not fit the task's declaration."""
    wanted = declared().get(task)
    labelled = [e for e in entries if "label" in e]
    bad = [e for e in labelled if wanted is not None and not wanted.labels.fits(e["label"])]
    if not bad:
        return
    labels = [e["label"] for e in labelled]
    fitting = sorted((t for t in declared().values() if t.bundles and all(map(t.labels.fits, labels))),
                     key=lambda t: (t.labels.kind == "number" and t.labels.values is None,
                                    len(t.labels.values or ()), t.task))
    hint = (f"a {fitting[0].task} bundle (e.g. {fitting[0].bundles[0]}) learns {fitting[0].labels}" if fitting
            else "no bundle here learns them")
    example = bad[0]
    raise LabelError(f"{datalist}: {bundle} learns {wanted.labels}, not {labels_text(labels)} (e.g. "
                     f"{Path(example['image']).name}: label {example['label']!r}); {hint}")


def learnable_fold(datalist: str | Path, fold: int, task: str, bundle: str) -> tuple[list[dict], list[dict]]:
    """:func:`~stas_pipeline.core.datalist.load_fold`, its labels checked against what ``bundle`` learns."""
    train, val = load_fold(datalist, fold)
    check_labels(train + val, datalist, task, bundle)
    return train, val
