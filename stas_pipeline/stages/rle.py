"""Masks to and from Kaggle RLE CSVs (``id,encoding``; column-major, 1-indexed runs: see ``tasks/slide/rle.py``).

``stas rle encode MASK... --out masks.csv`` encodes each mask image (PNG, or a TIFF of any size, read by
column strips: never whole); the id is the file name without its suffix; nonzero pixels are foreground. A JPEG
mask is refused (lossy: its pixels are not the mask's); an RGB mask is read as grey, with a warning.
``stas rle decode masks.csv --out DIR (--shape H W | --like SLIDE_OR_IMAGE...)`` writes ``DIR/<id>.png`` (0/255)
or, with ``--format tif``, a tiled pyramidal TIFF written window by window (for slide-sized masks); with
``--geojson`` also ``DIR/<id>.geojson``, the mask's objects as QuPath GeoJSON (``core/geojson.py``). ``--like``
takes each id's size from the file of the same name. A mask or row that cannot be used is reported with the
reason and skipped; the rest is written; the CSV or folder appears only when complete. A UTF-8 BOM in the CSV
is accepted. Exit 0 when everything was converted, 1 when anything was skipped, 2 when nothing could be (nothing
written) or for unusable input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.geojson import add_geojson_options, style_of
from stas_pipeline.tasks.slide.rle import decode_csv, encode_files


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="mask images -> one RLE CSV (id = file name without suffix)")
    enc.add_argument("masks", nargs="+", type=Path, help="mask images: PNG, or TIFF of any size")
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
    add_geojson_options(dec, "each mask (<id>.geojson)")
    return parser


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when everything was converted, 1 when anything was skipped, 2 when nothing could be or
    for unusable input."""
    args = build_parser(prog).parse_args(argv)
    if args.command == "encode":
        problems = encode_files(args.masks, args.out, args.overwrite)
    else:
        problems = decode_csv(args.csv, args.out, tuple(args.shape) if args.shape else None, args.like or [],
                              args.format, args.overwrite, style_of(args))
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
