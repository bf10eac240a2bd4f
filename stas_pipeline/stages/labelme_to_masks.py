"""LabelMe JSON annotations -> binary PNG masks, one per image.

``stas labelme-to-masks ANNOTATIONS --out MASKS [--images IMAGES] [--labels STAS ...]`` writes
``MASKS/<image stem>.png`` (mode L, 0 background / 255 foreground, ``imageHeight`` x ``imageWidth``) for every
``ANNOTATIONS/*.json``. Each shape is drawn as ``labelme.utils.shape_to_mask`` draws it (PIL ImageDraw at the
float coordinates) and the mask is the union of the shapes. A file that cannot be converted is reported on one
line, the others are still converted, and the run exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.cli_types import positive_int
from stas_pipeline.tasks.segmentation.labelme import convert_folder


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert LabelMe JSON annotations into binary PNG masks (0 background, 255 foreground), "
        "one <image stem>.png per annotation file, drawn as labelme's shape_to_mask draws them.",
    )
    parser.add_argument("annotations", type=Path, help="folder of LabelMe *.json files")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder to write the masks into (created if missing)"
    )
    parser.add_argument(
        "--images",
        type=Path,
        help="image folder; when given, each file's imageWidth x imageHeight is checked against its image",
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        help="draw only shapes with these labels (default: every shape)",
    )
    parser.add_argument(
        "--line-width",
        type=positive_int,
        default=10,
        help="width in pixels of line and linestrip shapes (default: 10)",
    )
    parser.add_argument(
        "--point-radius", type=positive_int, default=5, help="radius in pixels of point shapes (default: 5)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace masks that already exist in --out")
    return parser


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when every file was converted, 1 when any was skipped, 2 for unusable folders."""
    args = build_parser(prog).parse_args(argv)
    return convert_folder(args.annotations, args.out, images=args.images, labels=args.labels,
                          line_width=args.line_width, point_radius=args.point_radius,
                          overwrite=args.overwrite).finish()


if __name__ == "__main__":
    sys.exit(main())
