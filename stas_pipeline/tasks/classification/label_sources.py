"""Image-level labels (classification, grading, regression) for the datalist: labels CSVs and class folders.

``--labels-csv [NAME=]FILE`` (columns ``image,label``, optional ``group`` and ``source``; ``--image-column`` and
``--label-column`` pick other names) and/or ``--class-folders [NAME=]DIR`` (``DIR/<class>/<image>``), each
repeatable and merged; the label is a number: an int when integral, else a float. ``classes`` lists the class
names of ``--class-folders`` (or ``--classes``): the label of a class is its position in that list, or the
class name itself when every class name is an integer (``--classes 0 1 2 3 4`` makes a CSV label outside 0-4 an
error, the way to say the grades of a grading task). ``label_counts`` (integer labels only: classes, grades)
counts each label per fold and in the inner test split. ``group`` is written for entries that have one;
``source`` when sources are named, several are merged, a CSV has a ``source`` column, or ``--subsample`` is used.

Edge cases: every image is decoded in full (an undecodable one is reported and left out); a CSV row with an
empty cell, a label that is not a finite number (with ``--classes``: not a class index), or an image that cannot
be found is reported with the CSV's name and line and left out; an image in ``--images`` that no CSV row names
(a row rejected for its label still names its image) is reported as ``ERROR <image>: in --images but named by
no row of <csv>``; an image listed twice (in one source or across sources) is left out, each listing named. A
missing column, an unreadable CSV, a source or ``--subsample`` that names nothing, no usable entry or too few
groups for the folds raise :class:`~stas_pipeline.core.datalist.DatalistError`.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stas_pipeline.core.datalist import DatalistError
from stas_pipeline.core.images import IMAGE_SUFFIXES, decode_sizes, list_files, relpath, unlabelled_test
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.splits import (
    DEFAULT_SPLIT,
    Label,
    Split,
    describe_grouping,
    describe_split,
    folds_and_test,
    group_of,
    grouping,
    label_counts,
    label_strata,
    no_group,
    size_group,
)

GROUP_COLUMN, SOURCE_COLUMN = "group", "source"


def _key(path: Path) -> str:
    """A path as a key for "the same file": normalised and absolute."""
    return os.path.normcase(os.path.abspath(path))


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
                for path in list_files(folder, IMAGE_SUFFIXES):
                    table.setdefault(path.stem, []).append(path)
            self._stems[folder] = table
        return self._stems[folder]

    def find(self, value: str, bases: Sequence[Path]) -> Path:
        rel = Path(value)
        for base in bases:
            if (base / rel).is_file():
                self._name(base / rel)
                return base / rel
        if rel.suffix.lower() not in IMAGE_SUFFIXES:  # an id without extension (APTOS id_code)
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
    _warn_unused_columns(path, columns, records, (image_column, label_column, GROUP_COLUMN, SOURCE_COLUMN), problems)

    rows, kept_lines = [], {}  # the cells of each kept row -> its line: an exact repeat is kept once
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
        cells = tuple((k, str(v)) for k, v in record.items())
        if cells in kept_lines:
            problems.warn(path, f"{where}: repeats line {kept_lines[cells]} exactly; the image is kept once")
            continue
        kept_lines[cells] = line
        group = (record.get(GROUP_COLUMN) or "").strip() or None
        name = (record.get(SOURCE_COLUMN) or "").strip() or source.label
        rows.append(_Row(image, label, name, group, f"{path.name} line {line}"))
    if not records:
        problems.warn(path, "no rows")
    return rows, SOURCE_COLUMN in columns


def _warn_unused_columns(path: Path, columns: Sequence[str], records: Sequence[tuple[int, dict]],
                         used: Sequence[str], problems: Problems) -> None:
    """One warning per labels CSV for its columns that are not read, and one for rows with more cells than the
    header has columns."""
    unused = [c for c in columns if c not in used]
    if unused:
        problems.warn(path, f"column(s) {', '.join(repr(c) for c in unused)} not used (read: "
                            f"{', '.join(c for c in used if c in columns)})")
    longer = next((line for line, record in records if record.get(None)), None)
    if longer is not None:
        problems.warn(path, f"line {longer} (and maybe others) has more cells than the header's columns; the extra "
                            "cells are not used")


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


def make_label_datalist(
    sources: Sequence[Source | str | Path],
    base_dir: str | Path,
    *,
    images: str | Path | None = None,
    image_column: str = "image",
    label_column: str = "label",
    classes: Sequence[str] | None = None,
    subsample: Sequence[Subsample | str] = (),
    split: Split = DEFAULT_SPLIT,
    problems: Problems | None = None,
) -> dict:
    """Build an image-level datalist dict (numeric labels) from labels CSVs and class-folder trees.

    ``sources``: :class:`Source` objects (a plain path is a labels CSV). ``images``: a folder where a CSV's image
    cells are also looked up (after the CSV's own folder), by name or, for cells without an image extension, by
    stem; an image there that no CSV row names is reported as skipped. ``classes``: with CSVs alone, the labels
    must be indices 0..len(classes)-1 (``["0", "1", "2", "3", "4"]`` for grades 0-4). Groups come from
    ``split.group_regex``/``split.group_csv`` (an image they do not cover is left out) or
    ``split.group_by="image-size"`` (the decoded pixel size, ``"WxH"``), else from a CSV's ``group`` column (an
    empty cell: a group of its own).
    ``subsample``: keep a seeded fraction of one source's entries of one label (before decoding, so a broken
    file elsewhere does not change the sample). Problem rows and files are reported to ``problems`` and left
    out; raises :class:`DatalistError` for what stops the whole run.
    """
    problems = problems if problems is not None else Problems("make-datalist")
    regex, table = grouping(split.group_regex, split.group_csv, split.group_by)
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
            files = list_files(folder, IMAGE_SUFFIXES)
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
                problems.skip(row.image, no_group(regex, split.group_csv))
            else:
                kept.append(row)
        rows = kept

    # an image listed more than once: every listing left out
    listed: dict[str, list[_Row]] = {}
    for row in rows:
        listed.setdefault(_key(row.image), []).append(row)
    for same in listed.values():
        if len(same) > 1:
            problems.skip(same[0].image, f"listed {len(same)} times ({'; '.join(r.where for r in same)}); left out")
    rows = [same[0] for same in listed.values() if len(same) == 1]

    rows = _subsample(rows, specs, class_map, split.seed, problems)

    # decode every image (its size is its group with group_by="image-size")
    decodable = []
    for row, size in zip(rows, decode_sizes([r.image for r in rows]), strict=True):
        if isinstance(size, str):
            problems.skip(row.image, f"cannot decode image: {size}")
            continue
        if split.group_by is not None:
            row.group = size_group(size)
        decodable.append(row)
    rows = decodable
    if not rows:
        raise DatalistError(f"no usable labelled image in {', '.join(str(s.path) for s in sources)}")

    with_source = len(sources) > 1 or any(s.name for s in sources) or source_column or bool(specs)
    rows.sort(key=lambda r: relpath(r.image, base_dir))
    strata = label_strata([r.label for r in rows], split.n_bins)
    grouped = any(r.group is not None for r in rows)
    groups = [r.group if r.group is not None else (None, i) for i, r in enumerate(rows)] if grouped else None
    fold_of = folds_and_test(strata, groups, split.folds, split.seed, split.test_fraction, "labelled images")
    training, test = [], []
    for row, fold in zip(rows, fold_of, strict=True):
        entry = {"image": relpath(row.image, base_dir), "label": row.label}
        entry |= ({} if fold is None else {"fold": fold})
        entry |= ({} if row.group is None else {"group": row.group})
        entry |= ({"source": row.source} if with_source else {})
        (training if fold is not None else test).append(entry)
    problems.count("entries", len(training))
    if split.test_fraction is not None:
        problems.count("inner test entries", len(test))
    if split.test_images is not None:
        test = sorted(test + unlabelled_test(split.test_images, base_dir, problems), key=lambda e: e["image"])

    grouped_by = describe_grouping(regex, split.group_csv, split.group_by)
    grouped_by = grouped_by or (f", grouped by the {GROUP_COLUMN!r} column" if grouped else "")
    by = "the label" if all(isinstance(r.label, int) for r in rows) else f"the label in {split.n_bins} quantile bins"
    named = ", ".join(sorted({r.source for r in rows}))
    datalist = {
        "description": f"image-level labels from {named}: {len(training)} images in {split.folds} folds stratified by "
        f"{by}{describe_split(split.test_fraction, grouped_by, split.seed)}",
        "folds": split.folds,
        "seed": split.seed,
    }
    if class_list:
        datalist["classes"] = class_list
    if split.test_fraction is not None:
        datalist["test_fraction"] = split.test_fraction
    counts = label_counts(training, [e for e in test if "label" in e], split.folds)
    if counts is not None:
        datalist["label_counts"] = counts
    return datalist | {"training": training, "test": test}


def _report_unnamed(images: Path, finder: _ImageFinder, csvs: Sequence[Source], problems: Problems) -> None:
    """Report each image directly in ``images`` that no CSV row resolved to (it is in no entry)."""
    if not images.is_dir():
        return  # nothing to compare with; every cell looked up there was reported as not found
    where = ", ".join(Path(s.path).name for s in csvs)
    for path in list_files(images, IMAGE_SUFFIXES):
        if _key(path) not in finder.named:
            problems.skip(path, f"in --images but named by no row of {where}; left out")


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



def label_datalist_from_args(args: argparse.Namespace, problems: Problems) -> dict:
    """:func:`make_label_datalist` from ``stas make-datalist``'s arguments (the sources, their options, the
    splits)."""
    return make_label_datalist(
        args.sources, args.out.parent, images=args.images, image_column=args.image_column,
        label_column=args.label_column, classes=args.classes, subsample=args.subsample,
        split=Split.from_args(args), problems=problems,
    )
