"""Stage 3: run the deterministic part of a bundle's transform chain once per datalist sample, into an LMDB cache.

The chain is the one the bundle declares (``task#preprocessing``: LoadImaged, EnsureChannelFirstd, a task's
crops, Resized), with the bundle's knobs (``--image-size``, ``--set crop_fraction=0.9``); training and inference
use the same declaration, and the cache is keyed by it. Run it again after the data changed: unchanged samples
are copied from the old cache, changed and new ones decoded, and the cache replaced only when the new one is
complete. A sample that cannot be decoded is reported, left out, and recorded as left out in the cache. A corrupt
cache (``data.mdb`` overwritten, truncated or missing) is reported, never read, and rebuilt from scratch.
"""

from __future__ import annotations

import argparse
import json
import sys

from stas_pipeline.cli import command
from stas_pipeline.core.bundles import parsed_content
from stas_pipeline.core.datalist import DatalistError, read_datalist
from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks import get_task


def _knob(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", required=True, help="datalist.json written by make-datalist")
    parser.add_argument("--out", required=True, help="cache directory (an LMDB environment) to create or refresh")
    parser.add_argument("--bundle", default="deeplab_effb6",
                        help="bundle whose declared chain (task#preprocessing) is cached: a name in bundles/ or a "
                             "JSON file (default deeplab_effb6: the STAS segmentation chain)")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="N",
                        help="size the samples are resized to: one number for a square, or H W (default: the "
                             "bundle's image_size)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=_knob,
                        help="another top-level knob of the bundle the chain depends on, e.g. crop_fraction=0.9 "
                             "(VALUE is read as JSON when it parses, else as text); repeatable")
    parser.add_argument("--lists", nargs="+", default=["training"], metavar="KEY",
                        help="datalist sections to cache (default: training; add 'test' to cache test images too)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from stas_pipeline.core.lmdb_cache import CacheError, Preprocessing, build_cache  # MONAI: after --help

    if args.image_size is not None and (len(args.image_size) not in (1, 2) or min(args.image_size) <= 0):
        raise CacheError(f"--image-size takes one or two positive numbers, got {args.image_size}")
    datalist = read_datalist(args.datalist)
    items = []
    for key in args.lists:
        if datalist.get(key) is None:
            raise DatalistError(f"{args.datalist}: no '{key}' list")
        items += datalist.entries(key)
    if not items:
        raise DatalistError(f"{args.datalist}: no entries in {args.lists}")
    knobs = dict(args.set)
    if args.image_size is not None:
        knobs["image_size"] = args.image_size[0] if len(args.image_size) == 1 else list(args.image_size)
    problems = Problems("build-lmdb", done=("decoded", "reused"))
    (chain,) = parsed_content(args.bundle, ["task#preprocessing"], knobs)
    stats = build_cache(items, args.out, Preprocessing(chain), problems, progress=not args.no_progress,
                        loader=get_task(datalist.task).entry_loader())
    kept = stats.written + stats.reused
    if kept:
        print(f"{args.out}: {kept} samples, {stats.bytes_on_disk / 2**20:.1f} MiB "
              f"({stats.bytes_on_disk / kept / 2**20:.2f} MiB per sample)"
              + ("; rebuilt from scratch, the corrupt cache replaced" if stats.corrupt else ""))
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
