"""``stas export``: a checked submission zip of predicted masks, one 0/255 PNG per test image.

The checks and the zip are segmentation's (:mod:`stas_pipeline.tasks.segmentation.export`); the test images come
from a folder (``--test-images``) or a datalist's ``test`` list (``--datalist``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.datalist import test_images
from stas_pipeline.core.images import IMAGE_SUFFIXES, images_in_folder
from stas_pipeline.tasks.segmentation.export import export_submission


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write a submission zip: one single-channel 0/255 PNG per test image, named "
        "<image stem>.png, at the image's size. Everything is checked first; any problem (a missing mask, "
        "a mask without a test image, a size mismatch) refuses the submission: each problem named, nothing written, "
        "exit 2.",
    )
    parser.add_argument("--pred", type=Path, required=True, help="folder of predicted <image stem>.png masks")
    parser.add_argument("--out", type=Path, required=True, help="zip file to write, e.g. submission.zip")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--test-images", type=Path, metavar="DIR", help=f"folder of test images ({' '.join(IMAGE_SUFFIXES)})"
    )
    source.add_argument("--datalist", type=Path, help="datalist JSON whose 'test' list names the test images")
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="export even when some test images have no mask (each is reported as a warning)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out zip")
    return parser


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when the zip was written, 2 when it was refused or the input is unusable."""
    args = build_parser(prog).parse_args(argv)
    images = images_in_folder(args.test_images) if args.test_images is not None else test_images(args.datalist)
    problems = export_submission(args.pred, args.out, images, allow_missing=args.allow_missing,
                                 overwrite=args.overwrite)
    if problems.counts["written"]:
        size = args.out.stat().st_size
        print(f"wrote {args.out}: {problems.counts['written']} masks, {size / 2**20:.2f} MiB ({size} bytes)")
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
