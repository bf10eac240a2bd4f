"""Patch reads from a pyramidal slide: our windowed reads (tifffile's zarr store: only the tiles a patch touches
are decoded) against MONAI's ``WSIReader(backend="tifffile")``, which decodes the whole level for every patch
(MONAI issue 6513). One run, the same random patches for both, checked equal; reports milliseconds per patch,
the ratio, and the peak RSS after each reader (ours runs first, so its figure is its own).

    python benchmarks/slide_reads.py --size 8192 --patches 20
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from monai.data import WSIReader

from stas_pipeline.tasks.slide.reader import Slide
from stas_pipeline.tasks.slide.synthetic import SyntheticSlide


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="side of the square synthetic slide, level 0 (8192)")
    parser.add_argument("--patch", type=int, default=512, help="side of each patch (512)")
    parser.add_argument("--patches", type=int, default=20, help="random patches read by each reader (20)")
    parser.add_argument("--level", type=int, default=0, help="pyramid level the patches are read from (0)")
    parser.add_argument("--compression", default="jpeg", help="tile compression of the slide (jpeg)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the slide and of the patch positions")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.tif"
        t0 = time.perf_counter()
        SyntheticSlide(args.size, args.size, seed=args.seed).write(path, levels=3, compression=args.compression)
        write_s = time.perf_counter() - t0
        with Slide(path) as slide:
            rows, cols = slide.level_shape(args.level)
            scale = round(slide.downsample(args.level))
            rng = np.random.default_rng(args.seed)
            corners = [(int(rng.integers(0, rows - args.patch)), int(rng.integers(0, cols - args.patch)))
                       for _ in range(args.patches)]
            t0 = time.perf_counter()
            ours = [slide.read(y, x, args.patch, args.patch, level=args.level) for y, x in corners]
            ours_s = time.perf_counter() - t0
        ours_rss = peak_rss_mib()
        reader = WSIReader(backend="tifffile", level=args.level)
        wsi = reader.read(str(path))
        t0 = time.perf_counter()
        monai = [reader.get_data(wsi, location=(y * scale, x * scale), size=(args.patch, args.patch),
                                 level=args.level)[0] for y, x in corners]
        monai_s = time.perf_counter() - t0
        reader_rss = peak_rss_mib()
    same = all(np.array_equal(a, np.moveaxis(np.asarray(b), 0, -1)) for a, b in zip(ours, monai, strict=True))
    result = {
        "slide": f"{args.size} x {args.size}, 3 levels, {args.compression} tiles of 256", "level": args.level,
        "patch": args.patch, "patches": args.patches, "write_s": round(write_s, 1), "patches_equal": same,
        "ours_ms_per_patch": round(1000 * ours_s / args.patches, 1),
        "monai_tifffile_ms_per_patch": round(1000 * monai_s / args.patches, 1),
        "monai_over_ours": round(monai_s / ours_s, 1),
        "peak_rss_mib_after_ours": round(ours_rss), "peak_rss_mib_after_monai": round(reader_rss),
        "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
