"""Stage 3: decode and resize every datalist sample once into an LMDB cache.

Run it again after the data changed: unchanged samples are copied from the old cache, changed and new
ones decoded, and the cache replaced only when the new one is complete.
"""

from __future__ import annotations

import argparse
import sys

from monai.data import load_decathlon_datalist

from stas_pipeline.core.lmdb_cache import CacheError, build_cache
from stas_pipeline.core.problems import Problems


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", required=True, help="datalist.json written by make-datalist")
    parser.add_argument("--out", required=True, help="cache directory (an LMDB environment) to create or refresh")
    parser.add_argument("--image-size", type=int, nargs="+", default=[800], metavar="N",
                        help="size the samples are resized to: one number for a square, or H W (default 800)")
    parser.add_argument("--lists", nargs="+", default=["training"], metavar="KEY",
                        help="datalist sections to cache (default: training; add 'test' to cache test images too)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if len(args.image_size) not in (1, 2) or min(args.image_size) <= 0:
        print(f"error: --image-size takes one or two positive numbers, got {args.image_size}", file=sys.stderr)
        return 2
    items = []
    try:
        for key in args.lists:
            items += load_decathlon_datalist(args.datalist, is_segmentation=True, data_list_key=key)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {args.datalist}: {err}", file=sys.stderr)
        return 2
    if not items:
        print(f"error: {args.datalist}: no entries in {args.lists}", file=sys.stderr)
        return 2
    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    problems = Problems("build-lmdb")
    try:
        stats = build_cache(items, args.out, size, problems, progress=not args.no_progress)
    except CacheError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kept = stats.written + stats.reused
    if kept:
        print(f"{args.out}: {kept} samples, {stats.bytes_on_disk / 2**20:.1f} MiB "
              f"({stats.bytes_on_disk / kept / 2**20:.2f} MiB per sample)")
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
