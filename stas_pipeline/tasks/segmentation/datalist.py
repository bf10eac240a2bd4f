"""Segmentation's datalist: images and single-channel PNG masks paired by file stem; the label is the mask's path.

Each training entry also carries ``foreground``, the fraction of mask pixels > 0, by which the folds (and the
inner test split) are stratified (empty + ``--bins`` quantile bins; ``core/splits.py``). Every image is decoded
in full and every mask read; an unpaired file, a stem held by two files, an image that does not decode and a
mask that cannot be used (not single-channel, not the image's size) are reported and left out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from stas_pipeline.core.datalist import DatalistError
from stas_pipeline.core.images import (
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    decode_size,
    list_files,
    map_threads,
    pair_by_stem,
    relpath,
    unlabelled_test,
)
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.splits import (
    DEFAULT_SPLIT,
    Split,
    area_strata,
    describe_grouping,
    describe_split,
    folds_and_test,
    group_of,
    grouping,
    no_group,
    size_group,
)


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


def make_datalist(
    images: str | Path,
    masks: str | Path,
    base_dir: str | Path,
    split: Split = DEFAULT_SPLIT,
    problems: Problems | None = None,
) -> dict:
    """Build the segmentation datalist dict (paths relative to ``base_dir``, the datalist's folder).

    ``group_by="image-size"`` groups the images by their pixel size (``"WxH"``). Problem files are reported to
    ``problems`` and left out; raises :class:`DatalistError` when no usable pair is left or the folds cannot be
    made.
    """
    problems = problems if problems is not None else Problems("make-datalist")
    regex, table = grouping(split.group_regex, split.group_csv, split.group_by)
    base_dir = Path(base_dir)

    grouped = regex is not None or table is not None or split.group_by is not None
    image_files, mask_files = list_files(images, IMAGE_SUFFIXES), list_files(masks, MASK_SUFFIXES)
    pairs = pair_by_stem(image_files, mask_files, problems)

    def read_pair(pair: tuple[Path, Path]) -> tuple[float, tuple[int, int]] | tuple[Path, str]:
        """(foreground fraction, image size), or (the file at fault, the reason) when the pair is unusable."""
        image, mask = pair
        size = decode_size(image)
        if isinstance(size, str):
            return image, f"cannot decode image: {size}"
        try:
            return foreground_fraction(mask, size), size
        except (OSError, SyntaxError, ValueError) as exc:
            return mask, f"cannot use mask: {exc}"

    found: list[tuple[str, str, float, str | None]] = []  # image, label, foreground fraction, group
    for (image, mask), result in zip(
        pairs, map_threads(read_pair, pairs, "reading images and masks", "pair"), strict=True
    ):
        if isinstance(result[1], str):
            problems.skip(*result)
            continue
        fraction, size = result
        group = size_group(size) if split.group_by is not None else group_of(image, regex, table)
        if grouped and group is None:
            problems.skip(image, no_group(regex, split.group_csv))
            continue
        found.append((relpath(image, base_dir), relpath(mask, base_dir), round(fraction, 6), group))
    if not found:
        raise DatalistError(
            f"{images}: no usable image/mask pairs "
            f"({len(image_files)} images, {len(mask_files)} masks in {masks})"
        )
    found.sort()

    strata = area_strata([fraction for _, _, fraction, _ in found], split.n_bins)
    groups = [group for *_, group in found] if grouped else None
    fold_of = folds_and_test(strata, groups, split.folds, split.seed, split.test_fraction, str(images))
    training, test = [], []
    for (image, label, fraction, group), fold in zip(found, fold_of, strict=True):
        entry = {"image": image, "label": label} | ({} if fold is None else {"fold": fold})
        entry["foreground"] = fraction
        if grouped:
            entry["group"] = group
        (training if fold is not None else test).append(entry)
    problems.count("pairs", len(training))
    if split.test_fraction is not None:
        problems.count("inner test pairs", len(test))

    if split.test_images is not None:
        test = sorted(test + unlabelled_test(split.test_images, base_dir, problems), key=lambda e: e["image"])

    grouped_by = describe_grouping(regex, split.group_csv, split.group_by)
    datalist = {
        "description": f"STAS image/mask pairs in {split.folds} folds stratified by foreground area "
        f"(empty + {split.n_bins} quantile bins){describe_split(split.test_fraction, grouped_by, split.seed)}",
        "folds": split.folds,
        "seed": split.seed,
    }
    if split.test_fraction is not None:
        datalist["test_fraction"] = split.test_fraction
    return datalist | {"training": training, "test": test}



def mask_datalist_from_args(args: argparse.Namespace, problems: Problems) -> dict:
    """:func:`make_datalist` from ``stas make-datalist``'s arguments (``--images``, ``--masks``, the splits)."""
    return make_datalist(args.images, args.masks, args.out.parent, Split.from_args(args), problems)
