"""Patch reads from a pyramidal slide: our windowed reads (tifffile: only the tiles a patch touches are decoded, in
parallel threads) against OpenSlide's ``read_region`` and MONAI's ``WSIReader(backend="tifffile")``, which decodes
the whole level for every patch (MONAI issue 6513). One run, the same random patches of the same file for every
reader (after a few warm-up patches elsewhere), checked equal; reports milliseconds per patch, ours with one
decoding thread and with ``--threads``, the ratios, and the peak RSS after each reader (ours runs first, so its
figure is its own). OpenSlide (``pip install 'stas_pipeline[openslide]'``) reads level 0 of this file only (the
pyramid is in SubIFDs); it is left out when not installed or with ``--level`` above 0.

    python benchmarks/slide_reads.py --size 8192 --patches 20
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from monai.data import WSIReader

from stas_pipeline.tasks.slide.reader import DECODE_THREADS, Slide
from stas_pipeline.tasks.slide.synthetic import SyntheticSlide

WARM_UP = 5  # patches each reader reads first, elsewhere on the slide


def timed(read, corners: list[tuple[int, int]]) -> tuple[list[np.ndarray], float]:
    """The patches ``read(y, x)`` gives at ``corners`` and the seconds they took (after the warm-up patches)."""
    for y, x in corners[:WARM_UP]:
        read(y, x)
    t0 = time.perf_counter()
    patches = [read(y, x) for y, x in corners[WARM_UP:]]
    return patches, time.perf_counter() - t0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="side of the square synthetic slide, level 0 (8192)")
    parser.add_argument("--patch", type=int, default=512, help="side of each patch (512)")
    parser.add_argument("--patches", type=int, default=20, help="random patches read by each reader (20)")
    parser.add_argument("--level", type=int, default=0, help="pyramid level the patches are read from (0)")
    parser.add_argument("--compression", default="jpeg", help="tile compression of the slide (jpeg)")
    parser.add_argument("--threads", type=int, default=DECODE_THREADS,
                        help=f"threads decoding the tiles of one patch (here {DECODE_THREADS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the slide and of the patch positions")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.tif"
        t0 = time.perf_counter()
        SyntheticSlide(args.size, args.size, seed=args.seed).write(path, levels=3, compression=args.compression)
        write_s = time.perf_counter() - t0
        with Slide(path, threads=1) as one, Slide(path, threads=args.threads) as slide:
            rows, cols = slide.level_shape(args.level)
            scale = round(slide.downsample(args.level))
            rng = np.random.default_rng(args.seed)
            corners = [(int(rng.integers(0, rows - args.patch)), int(rng.integers(0, cols - args.patch)))
                       for _ in range(WARM_UP + args.patches)]
            ours, ours_s = timed(lambda y, x: slide.read(y, x, args.patch, args.patch, level=args.level), corners)
            _, one_s = timed(lambda y, x: one.read(y, x, args.patch, args.patch, level=args.level), corners)
        ours_rss = peak_rss_mib()
        openslide = None
        if args.level == 0 and importlib.util.find_spec("openslide"):
            import openslide as openslide_module

            with openslide_module.OpenSlide(path) as osr:
                openslide, openslide_s = timed(lambda y, x: osr.read_region((x, y), 0, (args.patch, args.patch)),
                                               corners)
        reader = WSIReader(backend="tifffile", level=args.level)
        wsi = reader.read(str(path))
        monai, monai_s = timed(lambda y, x: reader.get_data(wsi, location=(y * scale, x * scale),
                                                            size=(args.patch, args.patch), level=args.level)[0],
                               corners)
        reader_rss = peak_rss_mib()
    same = all(np.array_equal(a, np.moveaxis(np.asarray(b), 0, -1)) for a, b in zip(ours, monai, strict=True))
    result = {
        "slide": f"{args.size} x {args.size}, 3 levels, {args.compression} tiles of 256", "level": args.level,
        "patch": args.patch, "patches": args.patches, "write_s": round(write_s, 1), "patches_equal": same,
        "threads": args.threads, "ours_ms_per_patch": round(1000 * ours_s / args.patches, 2),
        "ours_1_thread_ms_per_patch": round(1000 * one_s / args.patches, 2),
        "monai_tifffile_ms_per_patch": round(1000 * monai_s / args.patches, 1),
        "monai_over_ours": round(monai_s / ours_s, 1),
        "peak_rss_mib_after_ours": round(ours_rss), "peak_rss_mib_after_monai": round(reader_rss),
        "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}, "
                   f"{len(os.sched_getaffinity(0))} cores",
    }
    if openslide is not None:
        result |= {"openslide_ms_per_patch": round(1000 * openslide_s / args.patches, 2),
                   "openslide_over_ours": round(openslide_s / ours_s, 2),
                   "openslide_over_ours_1_thread": round(openslide_s / one_s, 2),
                   "openslide_patches_equal": all(np.array_equal(a, np.asarray(b)[..., :3])
                                                  for a, b in zip(ours, openslide, strict=True))}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
