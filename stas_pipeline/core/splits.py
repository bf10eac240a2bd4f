"""Splitting a datalist's entries: strata, groups, the inner test split and k folds, and the label counts.

Folds (and the inner test split) are stratified, by the label (ints as they are, floats in ``--bins`` quantile
bins: :func:`label_strata`) or by the mask's foreground area (empty + ``--bins`` quantile bins:
:func:`area_strata`), and grouped when groups exist (``--group-regex``, ``--group-csv``, ``--group-by
image-size``, else a labels CSV's ``group`` column): a group never spans two folds nor the test split.
``--group-by image-size`` makes the pixel size ``"WxH"`` of each image its group (:func:`size_group`; the grading
recipe's stand-in for the clinic a fundus photograph came from, whose class mix differs widely).
:func:`split_weighted` is a seeded greedy placement followed by a local search (moves and swaps of groups) on
the squared deviation of per-fold stratum counts and fold sizes from their targets; docs/folds.md measures it
against scikit-learn's StratifiedGroupKFold.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stas_pipeline.core.datalist import DatalistError

Label = int | float
GROUP_BY = ("image-size",)


@dataclass(frozen=True)
class Split:
    """How a datalist builder splits its entries: ``folds`` folds by ``seed``, an inner test split of
    ``test_fraction`` (None: none), unlabelled ``test_images`` (a folder), groups (``group_regex``,
    ``group_csv`` or ``group_by``) and ``n_bins`` strata."""

    folds: int = 5
    seed: int = 0
    test_fraction: float | None = None
    test_images: str | Path | None = None
    group_regex: str | re.Pattern[str] | None = None
    group_csv: str | Path | None = None
    group_by: str | None = None
    n_bins: int = 4

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Split:
        """The splitting options of ``stas make-datalist``."""
        return cls(args.folds, args.seed, args.test_fraction, args.test_images, args.group_regex, args.group_csv,
                   args.group_by, args.bins)


DEFAULT_SPLIT = Split()


# --- strata -----------------------------------------------------------------------------------------------


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


def label_strata(labels: Sequence[Label], n_bins: int = 4) -> list[Hashable]:
    """Stratum per sample: the label itself when every label is an int, else ``n_bins`` quantile bins."""
    if all(isinstance(v, int) for v in labels):
        return list(labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    values = np.asarray(labels, dtype=float)
    edges = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(edges, values, side="right").tolist()


def size_group(size: tuple[int, int]) -> str:
    """The ``--group-by image-size`` group of an image of ``size`` (width, height): ``"WIDTHxHEIGHT"``."""
    return f"{size[0]}x{size[1]}"


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


def folds_and_test(
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


def grouping(
    group_regex: str | re.Pattern[str] | None, group_csv: str | Path | None, group_by: str | None = None
) -> tuple[re.Pattern[str] | None, dict[str, str] | None]:
    """(regex, group table) of the grouping options, at most one of which is given; ValueError otherwise."""
    if group_by is not None and group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r}")
    if sum(x is not None for x in (group_regex, group_csv, group_by)) > 1:
        raise ValueError("give one of group_regex, group_csv and group_by")
    regex = re.compile(group_regex) if isinstance(group_regex, str) else group_regex
    table = read_group_csv(group_csv) if group_csv is not None else None
    return regex, table


def no_group(regex: re.Pattern[str] | None, group_csv: str | Path | None) -> str:
    """Why an image left out by ``--group-regex``/``--group-csv`` has no group."""
    how = f"group regex {regex.pattern!r} does not match" if regex is not None else f"not in {group_csv}"
    return f"no group: {how}"


def describe_grouping(
    regex: re.Pattern[str] | None, group_csv: str | Path | None, group_by: str | None
) -> str:
    """``, grouped by ...`` for a datalist's description when a grouping option was given, else ``""``."""
    if regex is not None:
        return f", grouped by regex {regex.pattern!r}"
    if group_csv is not None:
        return f", grouped by {Path(group_csv).name}"
    return ", grouped by image size" if group_by is not None else ""


def describe_split(test_fraction: float | None, grouped_by: str, seed: int) -> str:
    """The end of a datalist's description: how it is grouped, the inner test split, the seed."""
    test = f", {test_fraction:g} held out as the inner test split" if test_fraction is not None else ""
    return f"{grouped_by}{test}, seed {seed}"


# --- label counts -----------------------------------------------------------------------------------------


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

