"""LMDB cache benchmark: samples per second through a DataLoader, cache size per sample, build memory.

Compares, in one run on a folder in the challenge layout (default ../shared/data/stas_public):

1. ``jpeg``: MONAI ``Dataset`` decoding and resizing every JPEG every time (the reference recipe's loader);
2. ``monai-lmdb``: MONAI's own ``LMDBDataset`` over the same chain (caches float32 tensors);
3. ``ours``: ``LMDBCacheDataset`` (uint8 records), then the same random part of the chain.

Each loader yields the same thing: a (3, S, S) float image in [0, 1] and a (1, S, S) mask, randomly rotated.
Figures are per core: ``--workers 0`` reads in the main process.

    python benchmarks/lmdb_cache.py --data ../shared/data/stas_public --image-size 800
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.data import Dataset, LMDBDataset
from monai.transforms import Compose, EnsureTyped, RandRotate90d, ScaleIntensityd
from torch.utils.data import DataLoader

from stas_pipeline.core.lmdb_cache import LMDBCacheDataset, Preprocessing, build_cache

KEYS = ["image", "label"]


def random_part() -> list:
    return [ScaleIntensityd("image"), RandRotate90d(KEYS, prob=0.3), EnsureTyped(KEYS)]


def items_from(data: Path) -> list[dict]:
    images = sorted((data / "Train_Images").glob("*.jpg"))
    return [{"image": str(p), "label": str(data / "reference_masks" / f"{p.stem}.png")} for p in images]


def throughput(dataset, workers: int, epochs: int) -> float:
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    n, start = 0, None
    for epoch in range(epochs + 1):
        for batch in loader:
            n += batch["image"].shape[0] if epoch else 0
        if epoch == 0:  # first epoch warms up page cache and workers
            start = time.perf_counter()
    return n / (time.perf_counter() - start)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def build_memory(items: list[dict], copies: int, size: int, tmp: Path) -> dict:
    """Peak anonymous memory of building a cache of ``copies`` x the images (copied under new names)."""
    many = []
    for c in range(copies):
        folder = tmp / f"copy{c}"
        folder.mkdir()
        for it in items:
            img = folder / Path(it["image"]).name
            shutil.copy(it["image"], img)
            many.append({"image": str(img), "label": it["label"]})
    (tmp / "many.json").write_text(json.dumps(many))
    code = (
        "import json,sys;from stas_pipeline.core.lmdb_cache import build_cache\n"
        "def anon():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon'))\n"
        f"items=json.load(open({str(tmp / 'many.json')!r}));a=anon()\n"
        f"build_cache(items,{str(tmp / 'many_cache')!r},{size},progress=False)\n"
        "hwm=next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print(json.dumps({'anon_before_kib':a,'anon_after_kib':anon(),'peak_rss_kib':hwm}))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["samples"] = len(many)
    result["cache_bytes"] = disk_bytes(tmp / "many_cache")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/stas_public",
                        help="folder with Train_Images/*.jpg and reference_masks/*.png")
    parser.add_argument("--image-size", type=int, default=800, help="square size samples are resized to")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: per-core figure)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    parser.add_argument("--memory-copies", type=int, default=8,
                        help="build-memory check: cache this many copies of the images (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    items = items_from(args.data)[: args.limit or None]
    size = args.image_size
    pre = Preprocessing.resize(size)
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "torch": torch.__version__, "samples": len(items), "image_size": size, "workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        build_cache(items, tmp / "ours", size, progress=False)
        report["ours_build_s"] = time.perf_counter() - start
        ours = LMDBCacheDataset(items, tmp / "ours", size, transform=Compose(random_part()))

        start = time.perf_counter()
        monai_lmdb = LMDBDataset(items, Compose([*pre.transforms, *random_part()]),
                                 cache_dir=tmp / "monai", progress=False)
        report["monai_lmdb_build_s"] = time.perf_counter() - start
        jpeg = Dataset(items, Compose([*pre.transforms, *random_part()]))

        for name, ds in [("jpeg", jpeg), ("monai-lmdb", monai_lmdb), ("ours", ours)]:
            report[f"{name}_samples_per_s"] = throughput(ds, args.workers, args.epochs)
            print(f"{name:>10}: {report[f'{name}_samples_per_s']:.1f} samples/s", flush=True)
        report["ours_mib_per_sample"] = disk_bytes(tmp / "ours") / len(items) / 2**20
        report["monai_lmdb_mib_per_sample"] = disk_bytes(tmp / "monai") / len(items) / 2**20
        report["speedup_ours_vs_jpeg"] = report["ours_samples_per_s"] / report["jpeg_samples_per_s"]
        report["speedup_ours_vs_monai_lmdb"] = report["ours_samples_per_s"] / report["monai-lmdb_samples_per_s"]
        if args.memory_copies:
            report["build_memory"] = build_memory(items, args.memory_copies, size, tmp)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
