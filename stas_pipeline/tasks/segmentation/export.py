"""Segmentation's submission: predicted masks packed as a zip, one 0/255 PNG per test image, named as the image.

``stas export --pred DIR --out submission.zip (--test-images DIR | --datalist datalist.json)`` checks first,
from file headers only, that every test image has ``DIR/<image stem>.png``, that no prediction lacks a test
image and that each mask has its image's width and height; any problem refuses the whole submission (a missing
mask is only a warning with ``--allow-missing``). Then it writes ``<image stem>.png`` (mode L, every value > 0
made 255) for each test image into the zip, atomically; an existing zip is kept unless ``--overwrite``.
Only ``*.png`` files of ``DIR`` are considered (``.npy`` probabilities beside them are ignored).
"""

from __future__ import annotations

import io
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from stas_pipeline.core.fileio import OutputExistsError, atomic_path
from stas_pipeline.core.images import InputFolderError
from stas_pipeline.core.mask_io import CONVERTED_MODES, GREY_MODES, prediction_files, read_grey_png
from stas_pipeline.core.problems import Problems

STAGE = "export"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # a fixed entry date: the same masks give the same zip bytes


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and mode from the file header; the pixels are not decoded."""
    with Image.open(path) as img:
        return img.size, img.mode


def _check(
    pred_files: dict[str, list[Path]], test_images: Sequence[Path], allow_missing: bool, problems: Problems
) -> list[tuple[str, Path]]:
    """Check every test image against its mask; return the (stem, mask) pairs to write, sorted by stem."""
    by_stem: dict[str, list[Path]] = {}
    for image in test_images:
        by_stem.setdefault(image.stem, []).append(image)
    pairs = []
    for stem, images in tqdm(sorted(by_stem.items()), desc=f"{STAGE} check", unit="image", file=sys.stderr):
        image, masks = images[0], pred_files.get(stem, [])
        try:
            if len(images) > 1:
                raise ValueError(f"several test images with stem {stem!r}: {', '.join(map(str, images))}")
            if len(masks) > 1:
                raise ValueError(f"several masks for this image: {', '.join(map(str, masks))}")
            if not masks:
                if allow_missing:
                    problems.warn(image, f"no mask {stem}.png; left out of the submission (--allow-missing)")
                    continue
                raise ValueError(f"no mask {stem}.png (pass --allow-missing to export without it)")
            try:
                image_size, _ = _header(image)
            except (OSError, Image.DecompressionBombError) as e:
                raise ValueError(f"cannot read the test image: {e}") from None
            try:
                mask_size, mode = _header(masks[0])
            except (OSError, Image.DecompressionBombError) as e:
                raise ValueError(f"cannot read mask {masks[0]}: {e}") from None
            if mode not in GREY_MODES + CONVERTED_MODES:
                raise ValueError(f"mask {masks[0]} has unsupported mode {mode}")
            if mask_size != image_size:
                raise ValueError(
                    f"mask {masks[0]} is {mask_size[0]}x{mask_size[1]}, "
                    f"the image {image_size[0]}x{image_size[1]}"
                )
        except ValueError as e:
            with tqdm.external_write_mode(file=sys.stderr):
                problems.skip(image, str(e))
            continue
        pairs.append((stem, masks[0]))
    for stem in sorted(pred_files.keys() - by_stem.keys()):
        for mask in pred_files[stem]:
            problems.skip(mask, "no test image with this name; a submission holds test images only")
    return pairs


def _zip_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16  # rw-r--r-- when unzipped
    return info


def _png_bytes(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def export_submission(
    pred: str | Path,
    out: str | Path,
    test_images: Sequence[str | Path],
    allow_missing: bool = False,
    overwrite: bool = False,
) -> Problems:
    """Check ``pred`` against ``test_images``, then write the zip ``out``; nothing is written on any problem.

    Returns the run's :class:`Problems` (``written``: masks in the zip). Raises :class:`InputFolderError` when
    there are no test images or ``pred`` is not a folder, :class:`OutputExistsError` for an existing ``out``
    without ``overwrite`` (checked before anything is read).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    if not test_images:
        raise InputFolderError("no test images")
    problems = Problems(STAGE, done=("written",))  # a refused zip: nothing written, exit 2
    problems.count("written", 0)
    pairs = _check(prediction_files(pred), [Path(p) for p in test_images], allow_missing, problems)
    if problems.skipped:
        problems.skip(out, f"not written: {len(problems.skipped)} problem(s) above")
        return problems
    if not pairs:
        problems.skip(out, "not written: no test image has a mask")
        return problems
    try:
        with atomic_path(out, overwrite) as tmp, zipfile.ZipFile(tmp, "w") as zf:
            for stem, mask in tqdm(pairs, desc=STAGE, unit="image", file=sys.stderr):
                try:
                    binary = read_grey_png(mask, problems) > 0
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    raise ValueError(f"{mask}: cannot read: {e}") from None
                zf.writestr(_zip_entry(f"{stem}.png"), _png_bytes(binary))
    except (ValueError, OSError) as e:  # OutputExistsError included: a zip that appeared meanwhile
        problems.skip(out, f"not written: {e}")
        return problems
    problems.count("written", len(pairs))
    return problems
