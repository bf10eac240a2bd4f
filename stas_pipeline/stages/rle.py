"""Masks to and from Kaggle RLE CSVs (``id,encoding``; column-major, 1-indexed runs: see ``tasks/slide/rle.py``).

``stas rle encode MASK... --out masks.csv`` encodes each mask image (PNG, JPEG, or a TIFF of any size, read by
column strips: never whole); the id is the file name without its suffix; nonzero pixels are foreground.
``stas rle decode masks.csv --out DIR (--shape H W | --like SLIDE_OR_IMAGE...)`` writes ``DIR/<id>.png`` (0/255)
or, with ``--format tif``, a tiled pyramidal TIFF written window by window (for slide-sized masks). ``--like``
takes each id's size from the file of the same name. A mask or row that cannot be used is reported with the
reason and skipped; the rest is written; the CSV or folder appears only when complete.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from stas_pipeline.core.fileio import OutputExistsError, atomic_folder, write_png
from stas_pipeline.core.mask_io import InputFolderError, NothingWrittenError, read_grey_png
from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.slide.reader import Slide, SlideError, write_slide
from stas_pipeline.tasks.slide.rle import (
    RLEError,
    RLEMask,
    decode,
    encode,
    encode_strips,
    file_id,
    read_rle_csv,
    write_rle_csv,
)

STAGE = "rle"
STRIP = 1024  # columns per strip when a TIFF mask is read


def _tiff_strips(slide: Slide) -> Iterator[np.ndarray]:
    height, width = slide.level_shape(0)
    for x in range(0, width, STRIP):
        yield slide.read(0, x, height, min(STRIP, width - x))[..., 0]


def encode_mask_file(path: str | Path) -> str:
    """The RLE string of one mask file (TIFFs read by column strips)."""
    if Path(path).suffix.lower() in (".tif", ".tiff", ".svs"):
        with Slide(path) as slide:
            return encode_strips(_tiff_strips(slide), slide.level_shape(0)[0])
    return encode(read_grey_png(path))


def encode_files(masks: list[Path], out: Path, overwrite: bool = False) -> Problems:
    problems = Problems(f"{STAGE} encode")
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    rows, seen = [], {}
    for path in masks:
        ident = file_id(path)
        try:
            if ident in seen:
                raise ValueError(f"id {ident!r} also comes from {seen[ident]}")
            rows.append((ident, encode_mask_file(path)))
            seen[ident] = path
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            problems.skip(path, str(err))
    if not rows:
        raise NothingWrittenError(f"{out}: every mask was skipped; nothing written")
    write_rle_csv(rows, out, overwrite)
    problems.count("encoded", len(rows))
    return problems


def _sizes_like(files: list[Path], problems: Problems) -> dict[str, tuple[int, int]]:
    """(height, width) of each readable file by its id; unreadable files are reported."""
    sizes = {}
    for path in files:
        try:
            if path.suffix.lower() in (".tif", ".tiff", ".svs"):
                with Slide(path) as slide:
                    sizes[file_id(path)] = slide.level_shape(0)
            else:
                with Image.open(path) as img:
                    sizes[file_id(path)] = (img.height, img.width)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            problems.skip(path, f"cannot take its size: {err}")
    return sizes


def decode_csv(csv_path: Path, out: Path, shape: tuple[int, int] | None, like: list[Path], fmt: str = "png",
               overwrite: bool = False) -> Problems:
    problems = Problems(f"{STAGE} decode")
    rows = read_rle_csv(csv_path)
    sizes = _sizes_like(like, problems)
    done = set()
    with atomic_folder(out, overwrite) as tmp:
        for ident, rle in rows:
            size = shape or sizes.get(ident)
            try:
                if ident in done or not ident or Path(ident).name != ident:
                    raise ValueError("a repeated id" if ident in done else f"id {ident!r} is not a file name")
                if size is None:
                    raise ValueError(f"no size: no --like file named {ident}.* and no --shape")
                if fmt == "png":
                    write_png(tmp / f"{ident}.png", decode(rle, size) * 255)
                else:
                    write_slide(tmp / f"{ident}.tif", RLEMask(rle, size).image, size[0], size[1], channels=1,
                                levels=3)
                problems.count("decoded")
                done.add(ident)
            except (RLEError, ValueError) as err:
                problems.skip(f"{csv_path} id {ident}", str(err))
        if not problems.counts["decoded"]:
            raise NothingWrittenError(f"{out}: every row was skipped; nothing written")
    return problems


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="mask images -> one RLE CSV (id = file name without suffix)")
    enc.add_argument("masks", nargs="+", type=Path, help="mask images: PNG/JPEG, or TIFF of any size")
    enc.add_argument("--out", type=Path, required=True, help="RLE CSV to write (id,encoding)")
    enc.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    dec = sub.add_parser("decode", help="an RLE CSV -> one mask per id")
    dec.add_argument("csv", type=Path, help="RLE CSV with an id column and an encoding column")
    dec.add_argument("--out", type=Path, required=True, help="folder for <id>.png or <id>.tif (written when done)")
    size = dec.add_mutually_exclusive_group(required=True)
    size.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"), help="every mask's height and width")
    size.add_argument("--like", type=Path, nargs="+", metavar="FILE",
                      help="slides or images named <id>.<suffix> whose sizes the masks take")
    dec.add_argument("--format", choices=["png", "tif"], default="png",
                     help="png (0/255, whole mask in memory) or tif (tiled pyramid, written by window; default png)")
    dec.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when everything was converted, 1 when anything was skipped, 2 for unusable input."""
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "encode":
            problems = encode_files(args.masks, args.out, args.overwrite)
        else:
            problems = decode_csv(args.csv, args.out, tuple(args.shape) if args.shape else None, args.like or [],
                                  args.format, args.overwrite)
    except NothingWrittenError as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 1
    except (InputFolderError, OutputExistsError, SlideError, RLEError, OSError) as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
