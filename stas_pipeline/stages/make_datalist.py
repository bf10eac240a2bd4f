"""Collect labelled images, hold out an inner test split, assign k folds, write a decathlon-style datalist.

Two kinds of label, one layout. Segmentation (``--images DIR --masks DIR``): images and single-channel PNG masks
paired by file stem; the label is the mask's path. Image-level tasks (classification, grading, regression):
``--labels-csv [NAME=]FILE`` (columns ``image,label``, optional ``group`` and ``source``; ``--image-column`` and
``--label-column`` pick other names) and/or ``--class-folders [NAME=]DIR`` (``DIR/<class>/<image>``), each
repeatable and merged; the label is a number: an int when integral, else a float.

Output (paths relative to the datalist's folder, entries sorted by image path)::

    {"description": ..., "folds": k, "seed": s[, "classes": [name, ...]][, "test_fraction": f]
     [, "label_counts": {"fold0": {"0": n, ...}, ..., "fold<k-1>": {...}[, "test": {...}]}],
     "training": [{"image": rel, "label": rel-or-number, "fold": f[, "foreground": fraction]
                   [, "group": id][, "source": name]}, ...],
     "test": [{"image": rel[, "label": ..., ...]}, ...]}

``foreground`` (fraction of mask pixels > 0) is written for masks only. ``classes`` lists the class names of
``--class-folders`` (or ``--classes``): the label of a class is its position in that list, or the class name
itself when every class name is an integer (``--classes 0 1 2 3 4`` makes a CSV label outside 0-4 an error, the
way to say the grades of a grading task). ``label_counts`` (integer labels only: classes, grades) counts each
label per fold and in the inner test split, every part with the same keys (the labels as strings, in numeric
order); it describes the split as written here (a later pseudo-label round adds entries it does not count).
``group`` is written for entries that have one; ``source`` when
sources are named, several are merged, a CSV has a ``source`` column, or ``--subsample`` is used.
``test`` holds the ``--test-fraction`` inner test split (entries keep their label, so they can be scored) and
the unlabelled ``--test-images`` (image only). Read it with
``monai.data.load_decathlon_datalist(path, is_segmentation=True, data_list_key="training")``: numeric labels
pass through unchanged (MONAI turns any other string value that names an existing path beside the datalist
into that path, so avoid group or source names that are also file names there).

Folds (and the inner test split) are stratified, by the label (ints as they are, floats in ``--bins`` quantile
bins) or by the mask's foreground area (empty + ``--bins`` quantile bins), and grouped when groups exist
(``--group-regex``, ``--group-csv``, ``--group-by image-size``, else a labels CSV's ``group`` column): a group
never spans two folds nor the test split. ``--group-by image-size`` makes the pixel size ``"WxH"`` of each image
its group (the grading recipe's stand-in for the clinic a fundus photograph came from, whose class mix differs
widely); the command then also prints the label counts per size group, largest first. :func:`split_weighted` is a
seeded greedy placement followed by a local search (moves and swaps of groups) on the squared deviation of per-fold
stratum counts and fold sizes from their targets; docs/folds.md measures it against scikit-learn's
StratifiedGroupKFold.

Edge cases: every image is decoded in full (a truncated JPEG, or a non-image named ``.jpg``, is reported as
``ERROR <file>: cannot decode image: <reason>`` and left out); a CSV row with an empty cell, a label that is not a
finite number (with ``--classes``: not a class index), or an image that cannot be found is reported with the CSV's
name and line and left out; an image in ``--images`` that no CSV row names (a row rejected for its label still
names its image) is reported as ``ERROR <image>: in --images but named by no row of <csv>``; an image listed twice
(in one source or across sources) and a stem held by two files are left out, each file named; any file left out
makes the exit status 1. A missing column, an unreadable CSV, a source or ``--subsample`` that names nothing, no
usable entry or too few groups for the folds stop the whole run with a one-line error and exit status 2, and
nothing is written. Folders are listed flat (no recursion); hidden files and other extensions are ignored. The
same inputs and seed give the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import re
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from stas_pipeline.core.cli_types import int_at_least, open_fraction
from stas_pipeline.core.fileio import OutputExistsError, write_json
from stas_pipeline.core.problems import Problems

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MASK_EXTENSIONS = (".png",)
STAGE = "make-datalist"
GROUP_COLUMN, SOURCE_COLUMN = "group", "source"

Label = int | float
_T = TypeVar("_T")
_R = TypeVar("_R")


class DatalistError(ValueError):
    """A problem that stops the whole datalist (no pairs, bad group table, too few groups, ...)."""


# --- files and images -------------------------------------------------------------------------------------


def list_files(folder: str | Path, extensions: Iterable[str]) -> list[Path]:
    """Non-hidden files directly in ``folder`` whose extension (any case) is in ``extensions``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatalistError(f"{folder}: not a folder")
    exts = {e.lower() for e in extensions}
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
    )


def index_by_stem(files: Iterable[Path], problems: Problems) -> dict[str, Path]:
    """Map stem -> file; a stem held by several files is skipped (each file named) and left out."""
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path)
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            names = ", ".join(str(p) for p in paths)
            for path in paths:
                problems.skip(path, f"duplicate stem {stem!r} ({names}); stem left out")
    return {stem: paths[0] for stem, paths in by_stem.items() if len(paths) == 1}


def pair_by_stem(
    images: Iterable[Path], masks: Iterable[Path], problems: Problems
) -> list[tuple[Path, Path]]:
    """Pair images and masks with the same stem, sorted by stem; unpaired or ambiguous files are skipped."""
    image_files, mask_files = list(images), list(masks)
    by_image, by_mask = index_by_stem(image_files, problems), index_by_stem(mask_files, problems)
    image_dups = {p.stem for p in image_files} - by_image.keys()
    mask_dups = {p.stem for p in mask_files} - by_mask.keys()
    for stem, path in by_image.items():
        if stem not in by_mask:
            problems.skip(path, f"no {'unique ' if stem in mask_dups else ''}mask with stem {stem!r}")
    for stem, path in by_mask.items():
        if stem not in by_image:
            problems.skip(path, f"no {'unique ' if stem in image_dups else ''}image with stem {stem!r}")
    return [(by_image[s], by_mask[s]) for s in sorted(by_image.keys() & by_mask.keys())]


def decode_image(path: str | Path) -> tuple[int, int]:
    """Decode the whole image (not only its header) and return its (width, height).

    Raises whatever PIL raises for a file it cannot decode: ``UnidentifiedImageError`` for a non-image,
    ``OSError("image file is truncated ...")`` for a truncated JPEG (``ImageFile.LOAD_TRUNCATED_IMAGES`` is
    left False on purpose), and others for broken streams.
    """
    with Image.open(path) as img:
        img.load()
        return img.size


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _map_threads(fn: Callable[[_T], _R], items: Sequence[_T], desc: str, unit: str) -> list[_R]:
    """``[fn(x) for x in items]`` on a few threads (PIL decodes without the GIL), with a progress bar."""
    workers = max(1, min(8, os.cpu_count() or 1, len(items)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit=unit, disable=None))


def decode_sizes(paths: Sequence[Path], desc: str = "decoding images") -> list[tuple[int, int] | str]:
    """Per path: its (width, height) when the image decodes in full, else the reason (a str) it does not."""

    def check(path: Path) -> tuple[int, int] | str:
        try:
            return decode_image(path)
        except Exception as exc:  # noqa: BLE001 - any failure to decode means the image cannot be used
            return _reason(exc)

    return _map_threads(check, paths, desc, "image")


def decode_errors(paths: Sequence[Path], desc: str = "decoding images") -> list[str | None]:
    """Per path: None when the image decodes in full, else the reason it does not."""
    return [r if isinstance(r, str) else None for r in decode_sizes(paths, desc)]


def size_group(size: tuple[int, int]) -> str:
    """The ``--group-by image-size`` group of an image of ``size`` (width, height): ``"WIDTHxHEIGHT"``."""
    return f"{size[0]}x{size[1]}"


def _key(path: Path) -> str:
    """A path as a key for "the same file": normalised and absolute."""
    return os.path.normcase(os.path.abspath(path))


def _relpath(path: Path, base_dir: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base_dir)).replace(os.sep, "/")


# --- masks ------------------------------------------------------------------------------------------------


def foreground_fraction(mask: str | Path, size: tuple[int, int] | None = None) -> float:
    """Fraction of pixels > 0 in a single-channel mask; ``size`` (width, height), when given, must match.

    Raises ``OSError``/``ValueError`` (and PIL's errors) with the reason when the mask cannot be used.
    """
    with Image.open(mask) as img:
        if size is not None and img.size != size:
            raise ValueError(f"mask is {img.size[0]}x{img.size[1]}, image is {size[0]}x{size[1]}")
        array = np.asarray(img)
    if array.ndim != 2:
        raise ValueError(f"not a single-channel mask (mode {img.mode})")
    return float(np.count_nonzero(array)) / array.size if array.size else 0.0


def area_strata(fractions: Sequence[float], n_bins: int = 4) -> list[int]:
    """Stratum per sample: 0 for an empty mask, 1..n_bins for quantile bins of the non-empty fractions."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    values = np.asarray(fractions, dtype=float)
    nonzero = values[values > 0]
    if nonzero.size == 0:
        return [0] * len(values)
    edges = np.quantile(nonzero, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.where(values > 0, np.searchsorted(edges, values, side="right") + 1, 0).tolist()


# --- numeric labels ---------------------------------------------------------------------------------------


def parse_label(text: str) -> Label:
    """A label cell as a number: int when integral (``"1"``, ``"1.0"``), else float; ValueError otherwise."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    value = float(text)  # ValueError for non-numbers
    if not math.isfinite(value):
        raise ValueError(f"not finite: {text!r}")
    return int(value) if value.is_integer() else value


def label_strata(labels: Sequence[Label], n_bins: int = 4) -> list[Hashable]:
    """Stratum per sample: the label itself when every label is an int, else ``n_bins`` quantile bins."""
    if all(isinstance(v, int) for v in labels):
        return list(labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    values = np.asarray(labels, dtype=float)
    edges = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(edges, values, side="right").tolist()


_NAME = re.compile(r"[\w.-]+")


@dataclass(frozen=True)
class Source:
    """One input of image-level labels: a labels CSV (``kind="csv"``) or a class-folder tree (``"folders"``).

    ``name`` defaults to the file's or folder's stem; it is the entries' ``source`` and what ``--subsample``
    refers to.
    """

    path: Path
    kind: str = "csv"
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem

    @classmethod
    def parse(cls, text: str, kind: str) -> Source:
        """``[NAME=]PATH``: the part before the first ``=`` is the name when it is a plain word."""
        name, sep, path = text.partition("=")
        if sep and path and _NAME.fullmatch(name):
            return cls(Path(path), kind, name)
        return cls(Path(text), kind)


@dataclass(frozen=True)
class Subsample:
    """Keep ``fraction`` of the entries of ``source`` whose label is ``label`` (a number or a class name)."""

    source: str
    label: str
    fraction: float

    def __str__(self) -> str:
        return f"{self.source}:{self.label}:{self.fraction:g}"

    @classmethod
    def parse(cls, text: str) -> Subsample:
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise ValueError(f"expected SOURCE:LABEL:FRACTION, got {text!r}")
        fraction = float(parts[2])
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {parts[2]}")
        return cls(parts[0], parts[1], fraction)


@dataclass
class _Row:
    """One labelled image found in a source, before groups, duplicates, subsampling and decoding."""

    image: Path
    label: Label
    source: str
    group: str | None
    where: str  # "a.csv line 5" or the class folder, for messages


class _ImageFinder:
    """Resolve a CSV's image cell: a path under one of the base folders, else a file with that stem."""

    def __init__(self) -> None:
        self._stems: dict[Path, dict[str, list[Path]]] = {}
        self.named: set[str] = set()  # normalised absolute paths of every file a cell resolved to or matched

    def _name(self, *paths: Path) -> None:
        self.named.update(_key(p) for p in paths)

    def _by_stem(self, folder: Path) -> dict[str, list[Path]]:
        if folder not in self._stems:
            table: dict[str, list[Path]] = {}
            if folder.is_dir():
                for path in list_files(folder, IMAGE_EXTENSIONS):
                    table.setdefault(path.stem, []).append(path)
            self._stems[folder] = table
        return self._stems[folder]

    def find(self, value: str, bases: Sequence[Path]) -> Path:
        rel = Path(value)
        for base in bases:
            if (base / rel).is_file():
                self._name(base / rel)
                return base / rel
        if rel.suffix.lower() not in IMAGE_EXTENSIONS:  # an id without extension (APTOS id_code)
            for base in bases:
                matches = self._by_stem((base / rel).parent).get(rel.name, [])
                self._name(*matches)
                if len(matches) > 1:
                    raise LookupError(f"image {value!r} is ambiguous: {', '.join(p.name for p in matches)}")
                if matches:
                    return matches[0]
        raise LookupError(f"image {value!r} not found in {' or '.join(str(b) for b in bases)}")


def read_labels_csv(
    source: Source,
    problems: Problems,
    *,
    images: Path | None = None,
    image_column: str = "image",
    label_column: str = "label",
    n_classes: int | None = None,
    finder: _ImageFinder | None = None,
) -> tuple[list[_Row], bool]:
    """Rows of one labels CSV, and whether it has a ``source`` column.

    A row with an empty cell, a label that is not a finite number (or, with ``n_classes``, not a class
    index), or an image that cannot be found is skipped with the CSV's name and line. A missing image or
    label column, or an unreadable file, raises :class:`DatalistError`.
    """
    path, finder = Path(source.path), finder or _ImageFinder()
    bases = [path.parent] + ([Path(images)] if images is not None else [])
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or ()]
            reader.fieldnames = columns
            for column, option in ((image_column, "--image-column"), (label_column, "--label-column")):
                if column not in columns:
                    raise DatalistError(
                        f"{path}: no column {column!r} (columns: {', '.join(columns) or 'none'}); "
                        f"name the right one with {option}"
                    )
            records = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatalistError(f"{path}: cannot read labels CSV: {exc}") from exc

    rows = []
    for line, record in records:
        value = (record.get(image_column) or "").strip()
        label_text = (record.get(label_column) or "").strip()
        where = f"line {line}"
        if not value:
            problems.skip(path, f"{where}: empty {image_column!r}")
            continue
        where += f" ({value})"
        try:  # looked up first: the image of a row rejected for its label is still named by a row
            image: Path | LookupError = finder.find(value, bases)
        except LookupError as exc:
            image = exc
        try:
            label = parse_label(label_text)
        except ValueError:
            problems.skip(path, f"{where}: label {label_text!r} in column {label_column!r} is not a number")
            continue
        if n_classes is not None and not (isinstance(label, int) and 0 <= label < n_classes):
            problems.skip(path, f"{where}: label {label_text!r} is not a class index 0..{n_classes - 1}")
            continue
        if isinstance(image, LookupError):
            problems.skip(path, f"{where}: {image}")
            continue
        group = (record.get(GROUP_COLUMN) or "").strip() or None
        name = (record.get(SOURCE_COLUMN) or "").strip() or source.label
        rows.append(_Row(image, label, name, group, f"{path.name} line {line}"))
    if not records:
        problems.warn(path, "no rows")
    return rows, SOURCE_COLUMN in columns


def class_folders(path: str | Path) -> dict[str, Path]:
    """Class name -> folder: the non-hidden subfolders of ``path``; raises DatalistError when there are none."""
    path = Path(path)
    if not path.is_dir():
        raise DatalistError(f"{path}: not a folder")
    found = {p.name: p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if not found:
        raise DatalistError(f"{path}: no class folders (expected {path}/<class name>/<image>)")
    return found


def class_labels(names: Iterable[str], classes: Sequence[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """(class name -> label, class list): ``classes``' order when given, else the integer value when every
    name is an integer, else the position in sorted order."""
    names = set(names)
    if classes:
        unknown = sorted(names - set(classes))
        if unknown:
            raise DatalistError(f"class folder(s) {', '.join(unknown)} not in --classes {' '.join(classes)}")
        return {c: i for i, c in enumerate(classes)}, list(classes)
    if all(re.fullmatch(r"[+-]?\d+", n) for n in names):
        ordered = sorted(names, key=int)
        return {n: int(n) for n in ordered}, ordered
    ordered = sorted(names)
    return {n: i for i, n in enumerate(ordered)}, ordered


# --- folds ------------------------------------------------------------------------------------------------


def split_weighted(
    strata: Sequence[Hashable],
    weights: Sequence[float],
    seed: int = 0,
    groups: Sequence[Hashable] | None = None,
) -> list[int]:
    """Stratified group split into ``len(weights)`` parts of relative sizes ``weights``: a part per sample.

    Samples of one group share a part. Objective: the sum over parts of the squared deviations of the
    per-stratum counts and of the part size from their targets (``weight * total``). Groups are placed
    largest first (ties: by main stratum, then a seeded shuffle), each into the part where it least increases
    the objective (remaining ties: the part least filled relative to its weight, then the lower index). Then
    a local search moves single groups and swaps pairs of groups between parts while that lowers the
    objective (the best such step each time, ties broken by the seeded order), which repairs what the greedy
    pass could not foresee. Without groups every sample is its own group, and with equal weights the per-
    stratum counts and part sizes then differ by at most one between parts (the search has nothing to do).
    """
    n = len(strata)
    groups = list(range(n)) if groups is None else list(groups)
    if len(groups) != n:
        raise ValueError(f"{n} strata but {len(groups)} group ids")
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or len(w) < 2 or not np.all(w > 0):
        raise ValueError(f"need at least 2 positive weights, got {list(weights)}")
    w, k = w / w.sum(), len(w)
    stratum_index = {s: i for i, s in enumerate(dict.fromkeys(strata))}
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    if k > len(members):
        raise ValueError(f"cannot make {k} parts from {len(members)} groups")

    counts = np.zeros((len(members), len(stratum_index)), dtype=np.int64)  # per group: counts over strata
    for g, idx in enumerate(members.values()):
        for i in idx:
            counts[g, stratum_index[strata[i]]] += 1
    order = list(range(len(members)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: (-int(counts[g].sum()), int(np.argmax(counts[g]))))

    totals = counts.sum(axis=0)
    targets = np.outer(w, totals)  # k x strata
    size_targets = w * totals.sum()
    fold_counts = np.zeros((k, len(stratum_index)), dtype=np.int64)
    part_of_group = np.zeros(len(members), dtype=np.int64)
    for g in order:
        row = counts[g]
        sizes = fold_counts.sum(axis=1)
        # increase of the objective, up to terms equal for every part, halved
        cost = (fold_counts - targets) @ row + int(row.sum()) * (sizes - size_targets)
        best = min(range(k), key=lambda f: (cost[f], sizes[f] / w[f], f))
        fold_counts[best] += row
        part_of_group[g] = best
    _local_search(counts, part_of_group, fold_counts, np.hstack([targets, size_targets[:, None]]), order)

    parts = [0] * n
    for g, idx in enumerate(members.values()):
        for i in idx:
            parts[i] = int(part_of_group[g])
    return parts


def _local_search(
    counts: np.ndarray, part_of: np.ndarray, part_counts: np.ndarray, targets: np.ndarray, order: list[int]
) -> None:
    """Move or swap groups between parts while the squared deviation from ``targets`` drops (in place).

    Vectors are the strata counts plus the size; groups with equal vectors are interchangeable, so only the
    first of each (in the seeded ``order``) per part is tried.
    """
    k = len(part_counts)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    vectors = np.hstack([counts, counts.sum(axis=1, keepdims=True)]).astype(float)
    for _ in range(10 * len(order) + 100):  # every step lowers the objective; the cap is only a guard
        dev = np.hstack([part_counts, part_counts.sum(axis=1, keepdims=True)]) - targets
        reps, sizes = [], np.bincount(part_of, minlength=k)
        for f in range(k):
            members = np.flatnonzero(part_of == f)
            members = members[np.argsort(rank[members], kind="stable")]
            _, first = np.unique(counts[members], axis=0, return_index=True)
            reps.append(members[np.sort(first)])
        best, step = -1e-9, None
        for a in range(k):
            u = vectors[reps[a]]
            for b in range(k):
                if a == b or not len(reps[a]):
                    continue
                if sizes[a] > 1:  # move a group from a to b; a part never empties
                    gain = 2 * u @ (dev[b] - dev[a]) + 2 * (u * u).sum(axis=1)
                    i = int(np.argmin(gain))
                    if gain[i] < best:
                        best, step = gain[i], (reps[a][i], None, a, b)
                if b > a and len(reps[b]):  # swap a group of a with a group of b
                    delta = vectors[reps[b]][None, :, :] - u[:, None, :]
                    gain = 2 * delta @ (dev[a] - dev[b]) + 2 * (delta * delta).sum(axis=2)
                    i, j = np.unravel_index(int(np.argmin(gain)), gain.shape)
                    if gain[i, j] < best:
                        best, step = gain[i, j], (reps[a][i], reps[b][j], a, b)
        if step is None:
            return
        g, h, a, b = step
        part_counts[a] -= counts[g]
        part_counts[b] += counts[g]
        part_of[g] = b
        if h is not None:
            part_counts[b] -= counts[h]
            part_counts[a] += counts[h]
            part_of[h] = a


def assign_folds(
    strata: Sequence[Hashable], k: int, seed: int = 0, groups: Sequence[Hashable] | None = None
) -> list[int]:
    """Stratified group k-fold: a fold (0..k-1) per sample; samples of one group share a fold.

    :func:`split_weighted` with ``k`` equal weights. Without groups, per-stratum counts and fold sizes differ
    by at most one between folds; with groups the local search brings them close (docs/folds.md).
    """
    n = len(strata)
    groups = list(range(n)) if groups is None else list(groups)
    if len(groups) != n:
        raise ValueError(f"{n} strata but {len(groups)} group ids")
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    n_groups = len(set(groups))
    if k > n_groups:
        raise ValueError(f"cannot make {k} folds from {n_groups} groups")
    return split_weighted(strata, [1.0] * k, seed, groups)


def _test_and_folds(
    strata: Sequence[Hashable],
    groups: Sequence[Hashable] | None,
    folds: int,
    seed: int,
    test_fraction: float | None,
    what: str,
) -> list[int | None]:
    """Per sample: its fold, or None when it falls in the inner test split."""
    n = len(strata)
    in_test = [False] * n
    try:
        if test_fraction is not None:
            parts = split_weighted(strata, [1 - test_fraction, test_fraction], seed, groups)
            in_test = [p == 1 for p in parts]
            if not any(in_test):
                raise ValueError(f"--test-fraction {test_fraction:g} leaves the inner test split empty (every "
                                 "group is larger than the split's share); raise it")
        train = [i for i in range(n) if not in_test[i]]
        assigned = assign_folds(
            [strata[i] for i in train], folds, seed, None if groups is None else [groups[i] for i in train]
        )
    except ValueError as exc:
        split = f" after a test split of {sum(in_test)} of {n}" if any(in_test) else ""
        raise DatalistError(f"{what}: {exc}{split}") from exc
    fold_of: list[int | None] = [None] * n
    for i, fold in zip(train, assigned, strict=True):
        fold_of[i] = fold
    return fold_of


# --- groups -----------------------------------------------------------------------------------------------


def read_group_csv(path: str | Path) -> dict[str, str]:
    """Read a CSV with columns ``image`` (file name or stem) and ``group``; returns image -> group."""
    table: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = {"image", "group"} - set(reader.fieldnames or ())
            if missing:
                raise DatalistError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
            for line, row in enumerate(reader, start=2):
                image, group = (row["image"] or "").strip(), (row["group"] or "").strip()
                if not image or not group:
                    raise DatalistError(f"{path}: line {line}: empty image or group")
                if table.setdefault(image, group) != group:
                    raise DatalistError(
                        f"{path}: line {line}: {image!r} has groups {table[image]!r} and {group!r}"
                    )
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatalistError(f"{path}: cannot read group CSV: {exc}") from exc
    return table


def group_of(image: Path, regex: re.Pattern[str] | None, table: dict[str, str] | None) -> str | None:
    """Group id of ``image`` from the regex (first group, else whole match) or the table; None if none."""
    if regex is not None:
        match = regex.search(image.name)
        return None if match is None else match.group(1 if regex.groups else 0)
    if table is not None:
        return table.get(image.name, table.get(image.stem))
    return None


GROUP_BY = ("image-size",)


def _grouping(
    group_regex: str | re.Pattern[str] | None, group_csv: str | Path | None, group_by: str | None = None
):
    if group_by is not None and group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r}")
    if sum(x is not None for x in (group_regex, group_csv, group_by)) > 1:
        raise ValueError("give one of group_regex, group_csv and group_by")
    regex = re.compile(group_regex) if isinstance(group_regex, str) else group_regex
    table = read_group_csv(group_csv) if group_csv is not None else None
    return regex, table


def _no_group(regex: re.Pattern[str] | None, group_csv: str | Path | None) -> str:
    how = f"group regex {regex.pattern!r} does not match" if regex is not None else f"not in {group_csv}"
    return f"no group: {how}"


def _unlabelled_test(test_images: str | Path, base_dir: Path, problems: Problems) -> list[dict]:
    by_stem = index_by_stem(list_files(test_images, IMAGE_EXTENSIONS), problems)
    paths = sorted(by_stem.values())
    test = []
    for path, reason in zip(paths, decode_errors(paths, "decoding test images"), strict=True):
        if reason is None:
            test.append({"image": _relpath(path, base_dir)})
        else:
            problems.skip(path, f"cannot decode image: {reason}")
    problems.count("test images", len(test))
    return test


def _describe_split(test_fraction: float | None, grouping: str, seed: int) -> str:
    test = f", {test_fraction:g} held out as the inner test split" if test_fraction is not None else ""
    return f"{grouping}{test}, seed {seed}"


# --- the datalist -----------------------------------------------------------------------------------------


def make_datalist(
    images: str | Path,
    masks: str | Path,
    base_dir: str | Path,
    *,
    test_images: str | Path | None = None,
    test_fraction: float | None = None,
    folds: int = 5,
    seed: int = 0,
    group_regex: str | re.Pattern[str] | None = None,
    group_csv: str | Path | None = None,
    group_by: str | None = None,
    n_bins: int = 4,
    problems: Problems | None = None,
) -> dict:
    """Build the segmentation datalist dict (paths relative to ``base_dir``, the datalist's folder).

    ``group_by="image-size"`` groups the images by their pixel size (``"WxH"``). Problem files are reported to
    ``problems`` and left out; raises :class:`DatalistError` when no usable pair is left or the folds cannot be
    made.
    """
    problems = problems if problems is not None else Problems(STAGE)
    regex, table = _grouping(group_regex, group_csv, group_by)
    base_dir = Path(base_dir)

    grouped = regex is not None or table is not None or group_by is not None
    image_files, mask_files = list_files(images, IMAGE_EXTENSIONS), list_files(masks, MASK_EXTENSIONS)
    pairs = pair_by_stem(image_files, mask_files, problems)

    def read_pair(pair: tuple[Path, Path]) -> tuple[float, tuple[int, int]] | tuple[Path, str]:
        """(foreground fraction, image size), or (the file at fault, the reason) when the pair is unusable."""
        image, mask = pair
        try:
            size = decode_image(image)
        except Exception as exc:  # noqa: BLE001 - any failure to decode means the image cannot be used
            return image, f"cannot decode image: {_reason(exc)}"
        try:
            return foreground_fraction(mask, size), size
        except (OSError, SyntaxError, ValueError) as exc:
            return mask, f"cannot use mask: {exc}"

    found: list[tuple[str, str, float, str | None]] = []  # image, label, foreground fraction, group
    for (image, mask), result in zip(
        pairs, _map_threads(read_pair, pairs, "reading images and masks", "pair"), strict=True
    ):
        if isinstance(result[1], str):
            problems.skip(*result)
            continue
        fraction, size = result
        group = size_group(size) if group_by is not None else group_of(image, regex, table)
        if grouped and group is None:
            problems.skip(image, _no_group(regex, group_csv))
            continue
        found.append((_relpath(image, base_dir), _relpath(mask, base_dir), round(fraction, 6), group))
    if not found:
        raise DatalistError(
            f"{images}: no usable image/mask pairs "
            f"({len(image_files)} images, {len(mask_files)} masks in {masks})"
        )
    found.sort()

    strata = area_strata([fraction for _, _, fraction, _ in found], n_bins)
    groups = [group for *_, group in found] if grouped else None
    fold_of = _test_and_folds(strata, groups, folds, seed, test_fraction, str(images))
    training, test = [], []
    for (image, label, fraction, group), fold in zip(found, fold_of, strict=True):
        entry = {"image": image, "label": label} | ({} if fold is None else {"fold": fold})
        entry["foreground"] = fraction
        if grouped:
            entry["group"] = group
        (training if fold is not None else test).append(entry)
    problems.count("pairs", len(training))
    if test_fraction is not None:
        problems.count("inner test pairs", len(test))

    if test_images is not None:
        test = sorted(test + _unlabelled_test(test_images, base_dir, problems), key=lambda e: e["image"])

    grouping = f", grouped by regex {regex.pattern!r}" if regex is not None else ""
    grouping = f", grouped by {Path(group_csv).name}" if table is not None else grouping
    grouping = ", grouped by image size" if group_by is not None else grouping
    datalist = {
        "description": f"STAS image/mask pairs in {folds} folds stratified by foreground area "
        f"(empty + {n_bins} quantile bins){_describe_split(test_fraction, grouping, seed)}",
        "folds": folds,
        "seed": seed,
    }
    if test_fraction is not None:
        datalist["test_fraction"] = test_fraction
    return datalist | {"training": training, "test": test}


def make_label_datalist(
    sources: Sequence[Source | str | Path],
    base_dir: str | Path,
    *,
    images: str | Path | None = None,
    image_column: str = "image",
    label_column: str = "label",
    classes: Sequence[str] | None = None,
    subsample: Sequence[Subsample | str] = (),
    test_images: str | Path | None = None,
    test_fraction: float | None = None,
    folds: int = 5,
    seed: int = 0,
    group_regex: str | re.Pattern[str] | None = None,
    group_csv: str | Path | None = None,
    group_by: str | None = None,
    n_bins: int = 4,
    problems: Problems | None = None,
) -> dict:
    """Build an image-level datalist dict (numeric labels) from labels CSVs and class-folder trees.

    ``sources``: :class:`Source` objects (a plain path is a labels CSV). ``images``: a folder where a CSV's image
    cells are also looked up (after the CSV's own folder), by name or, for cells without an image extension, by
    stem; an image there that no CSV row names is reported as skipped. ``classes``: with CSVs alone, the labels
    must be indices 0..len(classes)-1 (``["0", "1", "2", "3", "4"]`` for grades 0-4). Groups come from
    ``group_regex``/``group_csv`` (an image they do not cover is left out) or ``group_by="image-size"`` (the
    decoded pixel size, ``"WxH"``), else from a CSV's ``group`` column (an empty cell: a group of its own).
    ``subsample``: keep a seeded fraction of one source's entries of one label (before decoding, so a broken
    file elsewhere does not change the sample). Problem rows and files are reported to ``problems`` and left
    out; raises :class:`DatalistError` for what stops the whole run.
    """
    problems = problems if problems is not None else Problems(STAGE)
    regex, table = _grouping(group_regex, group_csv, group_by)
    base_dir = Path(base_dir)
    sources = [s if isinstance(s, Source) else Source(Path(s)) for s in sources]
    specs = [s if isinstance(s, Subsample) else Subsample.parse(s) for s in subsample]
    if not sources:
        raise DatalistError("no labels CSV or class folders given")
    names: dict[str, Source] = {}
    for source in sources:
        other = names.setdefault(source.label, source)
        if other is not source:
            raise DatalistError(
                f"source name {source.label!r} is used by {other.path} and {source.path}; "
                "name them apart with NAME=PATH"
            )

    # read every source
    trees = {s: class_folders(s.path) for s in sources if s.kind == "folders"}
    class_map, class_list = (
        class_labels({c for tree in trees.values() for c in tree}, classes) if trees else ({}, list(classes or []))
    )
    if trees and not classes and any(s.kind == "csv" for s in sources):
        order = ", ".join(f"{c}={class_map[c]}" for c in class_list)
        for source in trees:
            problems.warn(source.path, f"class folders labelled {order}; the labels of the CSVs are taken as "
                          "they are (pass --classes to fix the order)")
    finder, rows, source_column = _ImageFinder(), [], False
    for source in sources:
        if source.kind == "csv":
            found, has_column = read_labels_csv(
                source, problems, images=Path(images) if images is not None else None,
                image_column=image_column, label_column=label_column,
                n_classes=len(classes) if classes else None, finder=finder,
            )
            rows += found
            source_column |= has_column
            continue
        for name, folder in trees[source].items():
            files = list_files(folder, IMAGE_EXTENSIONS)
            if not files:
                problems.warn(folder, "no images in this class folder")
            rows += [_Row(p, class_map[name], source.label, None, str(folder)) for p in files]
    if images is not None:
        _report_unnamed(Path(images), finder, [s for s in sources if s.kind == "csv"], problems)

    # groups from the options (replacing a CSV's group column)
    if regex is not None or table is not None:
        kept = []
        for row in rows:
            row.group = group_of(row.image, regex, table)
            if row.group is None:
                problems.skip(row.image, _no_group(regex, group_csv))
            else:
                kept.append(row)
        rows = kept

    # an image listed more than once: every listing left out
    listed: dict[str, list[_Row]] = {}
    for row in rows:
        listed.setdefault(os.path.normcase(os.path.abspath(row.image)), []).append(row)
    for same in listed.values():
        if len(same) > 1:
            problems.skip(same[0].image, f"listed {len(same)} times ({'; '.join(r.where for r in same)}); left out")
    rows = [same[0] for same in listed.values() if len(same) == 1]

    rows = _subsample(rows, specs, class_map, seed, problems)

    # decode every image (its size is its group with group_by="image-size")
    decodable = []
    for row, size in zip(rows, decode_sizes([r.image for r in rows]), strict=True):
        if isinstance(size, str):
            problems.skip(row.image, f"cannot decode image: {size}")
            continue
        if group_by is not None:
            row.group = size_group(size)
        decodable.append(row)
    rows = decodable
    if not rows:
        raise DatalistError(f"no usable labelled image in {', '.join(str(s.path) for s in sources)}")

    with_source = len(sources) > 1 or any(s.name for s in sources) or source_column or bool(specs)
    rows.sort(key=lambda r: _relpath(r.image, base_dir))
    strata = label_strata([r.label for r in rows], n_bins)
    grouped = any(r.group is not None for r in rows)
    groups = [r.group if r.group is not None else (None, i) for i, r in enumerate(rows)] if grouped else None
    fold_of = _test_and_folds(strata, groups, folds, seed, test_fraction, "labelled images")
    training, test = [], []
    for row, fold in zip(rows, fold_of, strict=True):
        entry = {"image": _relpath(row.image, base_dir), "label": row.label}
        entry |= ({} if fold is None else {"fold": fold})
        entry |= ({} if row.group is None else {"group": row.group})
        entry |= ({"source": row.source} if with_source else {})
        (training if fold is not None else test).append(entry)
    problems.count("entries", len(training))
    if test_fraction is not None:
        problems.count("inner test entries", len(test))
    if test_images is not None:
        test = sorted(test + _unlabelled_test(test_images, base_dir, problems), key=lambda e: e["image"])

    if regex is not None:
        grouping = f", grouped by regex {regex.pattern!r}"
    elif table is not None:
        grouping = f", grouped by {Path(group_csv).name}"
    elif group_by is not None:
        grouping = ", grouped by image size"
    else:
        grouping = f", grouped by the {GROUP_COLUMN!r} column" if grouped else ""
    by = "the label" if all(isinstance(r.label, int) for r in rows) else f"the label in {n_bins} quantile bins"
    named = ", ".join(sorted({r.source for r in rows}))
    datalist = {
        "description": f"image-level labels from {named}: {len(training)} images in {folds} folds stratified by "
        f"{by}{_describe_split(test_fraction, grouping, seed)}",
        "folds": folds,
        "seed": seed,
    }
    if class_list:
        datalist["classes"] = class_list
    if test_fraction is not None:
        datalist["test_fraction"] = test_fraction
    counts = label_counts(training, [e for e in test if "label" in e], folds)
    if counts is not None:
        datalist["label_counts"] = counts
    return datalist | {"training": training, "test": test}


def _report_unnamed(images: Path, finder: _ImageFinder, csvs: Sequence[Source], problems: Problems) -> None:
    """Report each image directly in ``images`` that no CSV row resolved to (it is in no entry)."""
    if not images.is_dir():
        return  # nothing to compare with; every cell looked up there was reported as not found
    where = ", ".join(Path(s.path).name for s in csvs)
    for path in list_files(images, IMAGE_EXTENSIONS):
        if _key(path) not in finder.named:
            problems.skip(path, f"in --images but named by no row of {where}; left out")


def label_counts(training: Sequence[dict], test: Sequence[dict], folds: int) -> dict[str, dict[str, int]] | None:
    """``{"fold0": {"0": n, ...}, ..., "test": {...}}``: how many entries of each label every part holds.

    Only for integer labels (classes, grades; None otherwise); every part lists every label seen (0 when
    absent), in numeric order; ``test`` (the labelled inner test entries) only when there are any.
    """
    labels = [e["label"] for e in [*training, *test]]
    if not labels or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        return None
    values = sorted(set(labels))
    parts = {f"fold{f}": [e for e in training if e["fold"] == f] for f in range(folds)}
    if test:
        parts["test"] = list(test)
    counts = {name: Counter(e["label"] for e in entries) for name, entries in parts.items()}
    return {name: {str(v): c[v] for v in values} for name, c in counts.items()}


def _subsample(
    rows: list[_Row], specs: Sequence[Subsample], class_map: dict[str, int], seed: int, problems: Problems
) -> list[_Row]:
    """Keep a seeded ``round(fraction * n)`` of each (source, label) named by ``specs``."""
    drop: set[int] = set()
    seen = set()
    for spec in specs:
        try:
            label: Label = parse_label(spec.label)
        except ValueError:
            if spec.label not in class_map:
                raise DatalistError(f"--subsample {spec}: {spec.label!r} is not a number nor a class name") from None
            label = class_map[spec.label]
        if (spec.source, label) in seen:
            raise DatalistError(f"--subsample {spec}: source {spec.source!r} label {label} given twice")
        seen.add((spec.source, label))
        in_source = [i for i, r in enumerate(rows) if r.source == spec.source]
        if not in_source:
            known = ", ".join(sorted({r.source for r in rows})) or "none"
            raise DatalistError(f"--subsample {spec}: no source {spec.source!r} (sources: {known})")
        pool = sorted((i for i in in_source if rows[i].label == label), key=lambda i: os.path.abspath(rows[i].image))
        if not pool:
            raise DatalistError(f"--subsample {spec}: source {spec.source!r} has no label {label}")
        keep = set(random.Random(f"{seed}:{spec.source}:{label}").sample(pool, round(spec.fraction * len(pool))))
        drop |= set(pool) - keep
        problems.count(f"subsampled out of {spec.source}:{label}", len(pool) - len(keep))
    return [r for i, r in enumerate(rows) if i not in drop]


def write_datalist(path: str | Path, datalist: dict, overwrite: bool = False) -> None:
    """Write ``datalist`` as JSON atomically; an existing file raises OutputExistsError unless overwrite."""
    write_json(path, datalist, overwrite=overwrite)


# --- tables -----------------------------------------------------------------------------------------------


GROUP_ROWS = 15  # the group table shows this many groups, largest first, and sums the rest as "other"


def fold_table(datalist: dict, by_group: bool = False) -> str:
    """Per-fold table of a datalist: for masks, count, empty-mask count and mean foreground fraction; for
    numeric labels, the count per label (or the mean of non-integer labels). A labelled inner test split adds
    a ``test`` row; entries with a ``source`` add a table per source. ``by_group`` (for ``--group-by
    image-size``) adds the same table per group with the fold each group is in (``test``: the inner test
    split), largest groups first, the groups beyond the first ``GROUP_ROWS`` summed as ``other``."""
    training = datalist["training"]
    labelled_test = [e for e in datalist.get("test", []) if "label" in e]
    rows = [(str(f), [e for e in training if e["fold"] == f]) for f in range(datalist["folds"])]
    rows.append(("all", training))
    if labelled_test:
        rows.append(("test", labelled_test))
    everything = training + labelled_test
    masks = bool(training) and "foreground" in training[0]
    lines = _mask_table("fold", rows) if masks else _label_table("fold", rows, everything)
    sources = sorted({e["source"] for e in everything if "source" in e})
    if sources and not masks:
        lines.append("")
        by_source = [(s, [e for e in everything if e.get("source") == s]) for s in sources]
        test_counts = {s: sum(1 for e in labelled_test if e.get("source") == s) for s in sources}
        lines += _label_table("source", by_source, everything, ("test", test_counts) if labelled_test else None)
    if by_group and any("group" in e for e in everything):
        group_rows, part = _group_rows(everything)
        lines.append("")
        lines += (
            _mask_table("group", group_rows, ("fold", part))
            if masks
            else _label_table("group", group_rows, everything, ("fold", part))
        )
    if datalist.get("classes"):
        lines.append("classes: " + ", ".join(f"{i}={c}" for i, c in enumerate(datalist["classes"])))
    return "\n".join(lines)


def _group_rows(entries: list[dict]) -> tuple[list[tuple[str, list[dict]]], dict[str, str]]:
    """Rows of the group table (largest first, then by name; beyond ``GROUP_ROWS`` one ``other`` row) and
    the part each row is in (a fold number or ``test``; ``-`` when its entries are in several)."""
    members: dict[str, list[dict]] = {}
    for e in entries:
        if "group" in e:
            members.setdefault(str(e["group"]), []).append(e)
    ordered = sorted(members.items(), key=lambda item: (-len(item[1]), item[0]))
    rows = ordered[:GROUP_ROWS]
    if len(ordered) > GROUP_ROWS:
        rows.append(("other", [e for _, group in ordered[GROUP_ROWS:] for e in group]))
    part = {}
    for name, group in rows:
        places = {str(e["fold"]) if "fold" in e else "test" for e in group}
        part[name] = places.pop() if len(places) == 1 else "-"
    return rows, part


def _mask_table(
    title: str, rows: list[tuple[str, list[dict]]], extra: tuple[str, dict[str, object]] | None = None
) -> list[str]:
    """Count, empty-mask count and mean foreground fraction per row; ``extra`` as in :func:`_label_table`."""
    width = max([len(title), 5] + [len(name) for name, _ in rows])
    lines = [f"{title:>{width}} {'count':>6}" + (f" {extra[0]:>6}" if extra else "") + f" {'empty':>6} {'mean fg':>8}"]
    for name, entries in rows:
        fg = [e["foreground"] for e in entries]
        empty = sum(1 for v in fg if v == 0)
        line = f"{name:>{width}} {len(fg):>6}" + (f" {extra[1][name]!s:>6}" if extra else "")
        lines.append(line + f" {empty:>6} {np.mean(fg) if fg else 0.0:>8.4f}")
    return lines


def _label_table(
    title: str,
    rows: list[tuple[str, list[dict]]],
    everything: list[dict],
    extra: tuple[str, dict[str, object]] | None = None,
) -> list[str]:
    """Count and per-label counts (or the mean label) per row; ``extra``: (heading, value per row name), a
    column after the count."""
    labels = [e["label"] for e in everything]
    discrete = all(isinstance(v, int) for v in labels) and len(set(labels)) <= 20
    values = sorted(set(labels)) if discrete else []
    width = max([len(title), 5] + [len(name) for name, _ in rows])
    head = f"{title:>{width}} {'count':>6}" + (f" {extra[0]:>6}" if extra else "")
    head += "".join(f" {v:>6}" for v in values) if discrete else f" {'mean':>8}"
    lines = [head]
    for name, entries in rows:
        line = f"{name:>{width}} {len(entries):>6}" + (f" {extra[1][name]!s:>6}" if extra else "")
        if discrete:
            counts = Counter(e["label"] for e in entries)
            line += "".join(f" {counts[v]:>6}" for v in values)
        else:
            line += f" {np.mean([e['label'] for e in entries]) if entries else 0.0:>8.4f}"
        lines.append(line)
    return lines


# --- command line -----------------------------------------------------------------------------------------




def _regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regex {text!r}: {exc}") from exc


def _source(kind: str) -> Callable[[str], Source]:
    def parse(text: str) -> Source:
        return Source.parse(text, kind)

    return parse


def _subsample_spec(text: str) -> Subsample:
    try:
        return Subsample.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _wrap(text: str, indent: str = "") -> str:
    """Wrap a paragraph for help output that keeps the epilog's line breaks (RawDescriptionHelpFormatter)."""
    return textwrap.fill(text, width=100, initial_indent=indent, subsequent_indent=indent)


class _AppendSource(argparse.Action):
    """Append to the shared ``sources`` list, so that CSVs and class folders keep their command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), values])


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=_wrap(
            "Collect labelled images - images paired with masks by file stem (segmentation), or numeric "
        "labels from labels CSVs and class folders (classification, grading) - optionally hold out a stratified "
        "inner test split, assign k folds stratified by the label (masks: by foreground area) and keeping "
        "groups together, and write a MONAI decathlon-style datalist.json. Every image is decoded in full; "
        "files and rows that cannot be used are reported (ERROR <file>: <reason>) and left out (exit status "
        "1); a problem with the whole run is one line and exit status 2."
        ),
        epilog="examples:\n"
        "  %(prog)s --images Train_Images --masks masks --out datalist.json --folds 5\n"
        "  %(prog)s --labels-csv tiles/labels.csv --label-column stas --test-fraction 0.2 --out datalist.json\n"
        "  %(prog)s --labels-csv train.csv --image-column id_code --label-column diagnosis "
        "--images train_images \\\n      --classes 0 1 2 3 4 --group-by image-size --out datalist.json\n"
        "  %(prog)s --class-folders refuge=REFUGE --class-folders origa=ORIGA --classes normal glaucoma \\\n"
        "      --subsample origa:normal:0.5 --test-fraction 0.3 --folds 4 --out datalist.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="FILE",
        help="datalist JSON to write; its paths are relative to this file's folder",
    )
    seg = parser.add_argument_group("images and masks (segmentation: label = mask path)")
    seg.add_argument(
        "--images",
        type=Path,
        metavar="DIR",
        help=f"folder of training images ({' '.join(IMAGE_EXTENSIONS)}, any case); with --labels-csv: a folder "
        "where the CSV's image cells are also looked up (after the CSV's own folder), by file name or, for a "
        "cell without an image extension (APTOS id_code), by stem; an image there that no CSV row names is "
        "reported (ERROR, exit status 1) and left out",
    )
    seg.add_argument(
        "--masks",
        type=Path,
        metavar="DIR",
        help="folder of single-channel PNG masks named like the images (background 0)",
    )
    num = parser.add_argument_group(
        "image-level labels (label = number)",
        _wrap(
            "Give any number of --labels-csv and --class-folders; their entries are merged. NAME= names the source "
        "(default: the file's or folder's stem); entries carry it as 'source' when sources are named, several "
        "are given, a CSV has a 'source' column (its cell wins), or --subsample is used.",
            indent="  ",
        ),
    )
    num.add_argument(
        "--labels-csv",
        dest="sources",
        action=_AppendSource,
        type=_source("csv"),
        metavar="[NAME=]FILE",
        help="CSV with an image column (a path relative to the CSV's folder, or a name looked up in --images) "
        "and a label column (a number: int when integral, else float; a row with anything else is skipped); "
        "optional columns 'group' (images of a group stay in one fold; an empty cell is a group of its own) and "
        "'source'. Repeatable",
    )
    num.add_argument(
        "--class-folders",
        dest="sources",
        action=_AppendSource,
        type=_source("folders"),
        metavar="[NAME=]DIR",
        help="DIR/<class name>/<image>: the label is the class's position in sorted class names (or in "
        "--classes), or the class name itself when every name is an integer; the names are written as "
        "'classes'. Repeatable (class names are merged over every DIR)",
    )
    num.add_argument(
        "--image-column",
        default="image",
        metavar="NAME",
        help="column of the labels CSVs holding the image (default: image)",
    )
    num.add_argument(
        "--label-column",
        default="label",
        metavar="NAME",
        help="column of the labels CSVs holding the label, e.g. stas or grade in a CSV with several "
        "(default: label); a CSV without it stops the run",
    )
    num.add_argument(
        "--classes",
        nargs="+",
        metavar="NAME",
        help="class names in label order (label = position): fixes the labels of --class-folders (a folder "
        "not named here stops the run) and requires the labels of --labels-csv to be indices 0..n-1 (a row "
        "with another label is reported and left out); for grading 0-4 give --classes 0 1 2 3 4",
    )
    num.add_argument(
        "--subsample",
        action="extend",
        nargs="+",
        type=_subsample_spec,
        default=[],
        metavar="SOURCE:LABEL:FRACTION",
        help="keep FRACTION (0 < FRACTION <= 1) of the entries of SOURCE whose label is LABEL (a number or a "
        "class name), chosen with --seed, e.g. origa:0:0.5 to halve one large source's normal class; "
        "repeatable",
    )
    common = parser.add_argument_group("splits")
    common.add_argument(
        "--test-images",
        type=Path,
        metavar="DIR",
        help="folder of unlabelled test images, listed under 'test' without a label",
    )
    common.add_argument(
        "--test-fraction",
        type=open_fraction,
        metavar="F",
        help="hold out about F (0 < F < 1) of the labelled images as an inner test split, stratified like the "
        "folds and keeping groups whole; listed under 'test' with their labels, the rest gets the folds",
    )
    common.add_argument("--folds", type=int_at_least(2), default=5, metavar="K", help="number of folds (default: 5)")
    common.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of the test split, folds and --subsample (default: 0)"
    )
    group = common.add_mutually_exclusive_group()
    group.add_argument(
        "--group-regex",
        type=_regex,
        metavar="REGEX",
        help="regex searched in each image file name; its first capture group (or the whole "
        "match) is the group id, and a group never spans two folds (an image it does not match is left "
        "out); replaces a labels CSV's group column",
    )
    group.add_argument(
        "--group-csv",
        type=Path,
        metavar="FILE",
        help="CSV with columns image,group (image: file name or stem); a group never spans two folds (an "
        "image not in it is left out); replaces a labels CSV's group column",
    )
    group.add_argument(
        "--group-by",
        choices=GROUP_BY,
        help="image-size: the group of an image is its pixel size WIDTHxHEIGHT (e.g. 1050x1050; the grading "
        "recipe's stand-in for the clinic a photograph came from), so a size never spans two folds; also "
        "prints the label counts per size, largest first; replaces a labels CSV's group column",
    )
    common.add_argument(
        "--bins",
        type=int_at_least(1),
        default=4,
        metavar="N",
        help="quantile bins for the strata: of the foreground fraction of non-empty masks (empty masks are a "
        "bin of their own), or of non-integer labels (integer labels are strata as they are) (default: 4)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser


def _check_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit status 2) for options that do not fit together."""
    if args.sources:
        if args.masks is not None:
            parser.error("--masks is for segmentation; it does not go with --labels-csv/--class-folders")
        if args.images is not None and not any(s.kind == "csv" for s in args.sources):
            parser.error("--images with --class-folders alone: the class folders hold the images")
        return
    if args.images is None or args.masks is None:
        parser.error("give --images and --masks (segmentation), or --labels-csv / --class-folders (image-level)")
    used = [
        opt
        for opt, value in (
            ("--classes", args.classes),
            ("--subsample", args.subsample),
            ("--image-column", args.image_column != "image"),
            ("--label-column", args.label_column != "label"),
        )
        if value
    ]
    if used:
        parser.error(f"{', '.join(used)}: only with --labels-csv / --class-folders")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    _check_mode(parser, args)
    if args.out.is_dir():
        print(f"ERROR {args.out}: is a folder; --out names the datalist JSON file", file=sys.stderr)
        return 2
    if args.out.exists() and not args.overwrite:
        print(f"ERROR {OutputExistsError(args.out)}", file=sys.stderr)
        return 2
    problems = Problems(STAGE)
    common = {
        "test_images": args.test_images,
        "test_fraction": args.test_fraction,
        "folds": args.folds,
        "seed": args.seed,
        "group_regex": args.group_regex,
        "group_csv": args.group_csv,
        "group_by": args.group_by,
        "n_bins": args.bins,
        "problems": problems,
    }
    try:
        if args.sources:
            datalist = make_label_datalist(
                args.sources,
                args.out.parent,
                images=args.images,
                image_column=args.image_column,
                label_column=args.label_column,
                classes=args.classes,
                subsample=args.subsample,
                **common,
            )
        else:
            datalist = make_datalist(args.images, args.masks, args.out.parent, **common)
        write_datalist(args.out, datalist, overwrite=args.overwrite)
    except (DatalistError, OutputExistsError) as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    print(fold_table(datalist, by_group=args.group_by is not None))
    print(f"wrote {args.out}")
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
