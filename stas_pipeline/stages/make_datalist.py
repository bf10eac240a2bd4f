"""Pair images with masks, assign stratified (optionally grouped) k folds, write a decathlon-style datalist.

Output (paths relative to the datalist's folder, entries sorted by image path)::

    {"description": ..., "folds": k, "seed": s,
     "training": [{"image": rel, "label": rel, "fold": f, "foreground": fraction[, "group": id]}, ...],
     "test": [{"image": rel}, ...]}

Read it with ``monai.data.load_decathlon_datalist(path, is_segmentation=True, data_list_key="training")``.
Folders are listed flat (no recursion); hidden files and other extensions are ignored.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re
import sys
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from stas_pipeline.core.fileio import OutputExistsError, write_json
from stas_pipeline.core.problems import Problems

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MASK_EXTENSIONS = (".png",)
STAGE = "make-datalist"


class DatalistError(ValueError):
    """A problem that stops the whole datalist (no pairs, bad group table, too few groups, ...)."""


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


def assign_folds(
    strata: Sequence[Hashable], k: int, seed: int = 0, groups: Sequence[Hashable] | None = None
) -> list[int]:
    """Stratified group k-fold: a fold (0..k-1) per sample; samples of one group share a fold.

    Groups are placed largest first (ties: by main stratum, then a seeded shuffle), each into the fold where
    it least increases the squared deviation of the per-stratum counts and of the fold size from their
    targets; remaining ties go to the smaller fold, then the lower index. Without groups every sample is its
    own group, and per-stratum counts and fold sizes then differ by at most one between folds.
    """
    n = len(strata)
    groups = list(range(n)) if groups is None else list(groups)
    if len(groups) != n:
        raise ValueError(f"{n} strata but {len(groups)} group ids")
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    stratum_index = {s: i for i, s in enumerate(dict.fromkeys(strata))}
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    if k > len(members):
        raise ValueError(f"cannot make {k} folds from {len(members)} groups")

    counts = []  # per group: counts over strata
    for idx in members.values():
        row = np.zeros(len(stratum_index), dtype=np.int64)
        for i in idx:
            row[stratum_index[strata[i]]] += 1
        counts.append(row)
    order = list(range(len(members)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: (-int(counts[g].sum()), int(np.argmax(counts[g]))))

    fold_counts = np.zeros((k, len(stratum_index)), dtype=np.int64)
    fold_of_group = [0] * len(members)
    for g in order:
        row = counts[g]
        sizes = fold_counts.sum(axis=1)
        # increase of sum((count - target)^2), up to terms equal for every fold, halved
        cost = fold_counts @ row + int(row.sum()) * sizes
        best = min(range(k), key=lambda f: (cost[f], sizes[f], f))
        fold_counts[best] += row
        fold_of_group[g] = best

    folds = [0] * n
    for g, idx in enumerate(members.values()):
        for i in idx:
            folds[i] = fold_of_group[g]
    return folds


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


def _relpath(path: Path, base_dir: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base_dir)).replace(os.sep, "/")


def make_datalist(
    images: str | Path,
    masks: str | Path,
    base_dir: str | Path,
    *,
    test_images: str | Path | None = None,
    folds: int = 5,
    seed: int = 0,
    group_regex: str | re.Pattern[str] | None = None,
    group_csv: str | Path | None = None,
    n_bins: int = 4,
    problems: Problems | None = None,
) -> dict:
    """Build the datalist dict (paths relative to ``base_dir``, the datalist's folder).

    Problem files are reported to ``problems`` and left out; raises :class:`DatalistError` when no usable
    pair is left or the folds cannot be made.
    """
    problems = problems if problems is not None else Problems(STAGE)
    if group_regex is not None and group_csv is not None:
        raise ValueError("give group_regex or group_csv, not both")
    regex = re.compile(group_regex) if isinstance(group_regex, str) else group_regex
    table = read_group_csv(group_csv) if group_csv is not None else None
    base_dir = Path(base_dir)

    grouped = regex is not None or table is not None
    image_files, mask_files = list_files(images, IMAGE_EXTENSIONS), list_files(masks, MASK_EXTENSIONS)
    pairs = pair_by_stem(image_files, mask_files, problems)
    found: list[tuple[str, str, float, str | None]] = []  # image, label, foreground fraction, group
    for image, mask in tqdm(pairs, desc="reading masks", unit="mask", disable=None):
        try:
            with Image.open(image) as img:
                size = img.size
        except (OSError, SyntaxError, ValueError) as exc:
            problems.skip(image, f"cannot read image: {exc}")
            continue
        try:
            fraction = foreground_fraction(mask, size)
        except (OSError, SyntaxError, ValueError) as exc:
            problems.skip(mask, f"cannot use mask: {exc}")
            continue
        group = group_of(image, regex, table)
        if grouped and group is None:
            how = (
                f"group regex {regex.pattern!r} does not match"
                if regex is not None
                else f"not in {group_csv}"
            )
            problems.skip(image, f"no group: {how}")
            continue
        found.append((_relpath(image, base_dir), _relpath(mask, base_dir), round(fraction, 6), group))
    if not found:
        raise DatalistError(
            f"{images}: no usable image/mask pairs "
            f"({len(image_files)} images, {len(mask_files)} masks in {masks})"
        )
    found.sort()

    strata = area_strata([fraction for _, _, fraction, _ in found], n_bins)
    try:
        assigned = assign_folds(strata, folds, seed, [group for *_, group in found] if grouped else None)
    except ValueError as exc:
        raise DatalistError(f"{images}: {exc}") from exc
    training = []
    for (image, label, fraction, group), fold in zip(found, assigned, strict=True):
        entry = {"image": image, "label": label, "fold": fold, "foreground": fraction}
        training.append({**entry, "group": group} if grouped else entry)
    problems.count("pairs", len(training))

    test: list[dict] = []
    if test_images is not None:
        by_stem = index_by_stem(list_files(test_images, IMAGE_EXTENSIONS), problems)
        test = sorted(({"image": _relpath(p, base_dir)} for p in by_stem.values()), key=lambda e: e["image"])
        problems.count("test images", len(test))

    grouping = f", grouped by regex {regex.pattern!r}" if regex is not None else ""
    grouping = f", grouped by {Path(group_csv).name}" if table is not None else grouping
    return {
        "description": f"STAS image/mask pairs in {folds} folds stratified by foreground area "
        f"(empty + {n_bins} quantile bins){grouping}, seed {seed}",
        "folds": folds,
        "seed": seed,
        "training": training,
        "test": test,
    }


def write_datalist(path: str | Path, datalist: dict, overwrite: bool = False) -> None:
    """Write ``datalist`` as JSON atomically; an existing file raises OutputExistsError unless overwrite."""
    write_json(path, datalist, overwrite=overwrite)


def fold_table(datalist: dict) -> str:
    """Per-fold count, empty-mask count and mean foreground fraction of a datalist's training entries."""
    lines = [f"{'fold':>5} {'count':>6} {'empty':>6} {'mean fg':>8}"]
    rows = [(str(f), [e for e in datalist["training"] if e["fold"] == f]) for f in range(datalist["folds"])]
    for name, entries in [*rows, ("all", datalist["training"])]:
        fg = [e["foreground"] for e in entries]
        empty = sum(1 for v in fg if v == 0)
        lines.append(f"{name:>5} {len(fg):>6} {empty:>6} {np.mean(fg) if fg else 0.0:>8.4f}")
    return "\n".join(lines)


def _positive_int(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regex {text!r}: {exc}") from exc


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Pair images with masks by file stem, assign k folds stratified by foreground area "
        "(optionally keeping groups together), and write a MONAI decathlon-style datalist.json.",
    )
    parser.add_argument(
        "--images",
        required=True,
        type=Path,
        help=f"folder of training images ({' '.join(IMAGE_EXTENSIONS)}, any case)",
    )
    parser.add_argument(
        "--masks",
        required=True,
        type=Path,
        help="folder of single-channel PNG masks named like the images (background 0)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="datalist JSON to write; its paths are relative to this file's folder",
    )
    parser.add_argument(
        "--test-images", type=Path, help="folder of unlabelled test images, listed under 'test'"
    )
    parser.add_argument("--folds", type=_positive_int(2), default=5, help="number of folds (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default: 0)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--group-regex",
        type=_regex,
        help="regex searched in each image file name; its first capture group (or the whole "
        "match) is the group id, and a group never spans two folds",
    )
    group.add_argument(
        "--group-csv",
        type=Path,
        help="CSV with columns image,group (image: file name or stem); a group never spans two folds",
    )
    parser.add_argument(
        "--bins",
        type=_positive_int(1),
        default=4,
        help="quantile bins of the foreground fraction of non-empty masks; empty masks are a "
        "bin of their own (default: 4)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.out.is_dir():
        print(f"ERROR {args.out}: is a folder; --out names the datalist JSON file", file=sys.stderr)
        return 2
    if args.out.exists() and not args.overwrite:
        print(f"ERROR {OutputExistsError(args.out)}", file=sys.stderr)
        return 2
    problems = Problems(STAGE)
    try:
        datalist = make_datalist(
            args.images,
            args.masks,
            args.out.parent,
            test_images=args.test_images,
            folds=args.folds,
            seed=args.seed,
            group_regex=args.group_regex,
            group_csv=args.group_csv,
            n_bins=args.bins,
            problems=problems,
        )
        write_datalist(args.out, datalist, overwrite=args.overwrite)
    except (DatalistError, OutputExistsError) as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    print(fold_table(datalist))
    print(f"wrote {args.out}")
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
