"""Clean predicted masks: remove small connected components, fill holes.

``stas postprocess --pred DIR --out DIR [--min-size N] [--fill-holes]`` binarises every ``DIR/<stem>.png``
(``value / 255 > --threshold``, default any value > 0), removes the foreground components (8-connected) of
fewer than N pixels, then fills the holes (background regions not connected to the image border), and writes
``OUT/<stem>.png`` (mode L, 0/255). Both steps are off by default. ``OUT`` is written atomically, as by
``stas ensemble``. See docs/postprocess.md for what each step does to Dice on the STAS sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from stas_pipeline.core.cli_types import non_negative_int, probability_threshold
from stas_pipeline.core.fileio import OutputExistsError, atomic_folder, write_png
from stas_pipeline.core.mask_io import InputFolderError, NothingWrittenError, prediction_files, read_grey_png
from stas_pipeline.core.problems import Problems

STAGE = "postprocess"


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop the foreground components of fewer than ``min_size`` pixels (full connectivity, any dimension)."""
    mask = np.asarray(mask).astype(bool)
    if min_size <= 1 or not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    keep = np.bincount(labels.ravel()) >= min_size
    keep[0] = False
    return keep[labels]


def postprocess_mask(mask: np.ndarray, min_size: int = 0, fill_holes: bool = False) -> np.ndarray:
    """Binary mask (nonzero = foreground) without components under ``min_size`` pixels, holes filled if
    ``fill_holes``."""
    out = remove_small_components(mask, min_size)
    return ndimage.binary_fill_holes(out) if fill_holes else out


def postprocess_folder(
    pred: str | Path,
    out: str | Path,
    min_size: int = 0,
    fill_holes: bool = False,
    threshold: float = 0.0,
    overwrite: bool = False,
) -> Problems:
    """Post-process every ``pred/<stem>.png`` into ``out/<stem>.png``; ``out`` is written atomically.

    Unreadable masks are reported and skipped. Raises :class:`InputFolderError` when ``pred`` holds no PNG,
    :class:`OutputExistsError` for a non-empty ``out`` without ``overwrite``, :class:`NothingWrittenError`
    when every mask was skipped.
    """
    files = prediction_files(pred)
    if not files:
        raise InputFolderError(f"{pred}: no *.png masks")
    problems = Problems(STAGE)
    for counter in ("written", "pixels removed", "pixels filled"):
        problems.count(counter, 0)
    with atomic_folder(out, overwrite) as tmp:
        for stem, paths in tqdm(sorted(files.items()), desc=STAGE, unit="image", file=sys.stderr):
            try:
                if len(paths) > 1:
                    raise ValueError(f"more than one file for this image: {', '.join(map(str, paths))}")
                mask = read_grey_png(paths[0], problems) > threshold * 255
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                with tqdm.external_write_mode(file=sys.stderr):
                    problems.skip(paths[0], str(e))
                continue
            result = postprocess_mask(mask, min_size, fill_holes)
            write_png(tmp / f"{stem}.png", result.astype(np.uint8) * 255)
            problems.count("written")
            problems.count("pixels removed", int(np.count_nonzero(mask & ~result)))
            problems.count("pixels filled", int(np.count_nonzero(result & ~mask)))
        if not problems.counts["written"]:
            raise NothingWrittenError(
                f"{out}: every mask was skipped; nothing written, the folder left as it was"
            )
    return problems


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Post-process predicted masks: remove connected components smaller than --min-size "
        "pixels, fill holes. Writes --out/<stem>.png (mode L, 0/255) atomically; both steps are off by "
        "default.",
    )
    parser.add_argument("--pred", type=Path, required=True, help="folder of predicted <stem>.png masks")
    parser.add_argument("--out", type=Path, required=True, help="output folder (written only when complete)")
    parser.add_argument(
        "--min-size",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="remove 8-connected foreground components of fewer than N pixels (default: 0, keep all)",
    )
    parser.add_argument(
        "--fill-holes", action="store_true", help="fill background regions enclosed by foreground"
    )
    parser.add_argument(
        "--threshold",
        type=probability_threshold,
        default=0.0,
        metavar="T",
        help="foreground where value / 255 > T (default: 0, any value > 0)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when every mask was written, 1 when any was skipped, 2 for unusable input."""
    args = build_parser(prog).parse_args(argv)
    try:
        problems = postprocess_folder(
            args.pred,
            args.out,
            min_size=args.min_size,
            fill_holes=args.fill_holes,
            threshold=args.threshold,
            overwrite=args.overwrite,
        )
    except NothingWrittenError as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 1
    except (InputFolderError, OutputExistsError) as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 2
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
