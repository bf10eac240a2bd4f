"""Training throughput, three rows per model, in one run:

1. ``reference``: the reference recipe's loop: fp32, MONAI ``Dataset`` decoding and resizing the JPEG every step;
2. ``ours``: the LMDB cache, AMP (bf16 where supported, else fp16) and channels_last on CUDA, optional compile;
3. ``model-only``: random tensors already on the device, same model and precision as row 2 (the ceiling).

Each row trains the bundle's real model (smp DeepLabV3+ with its timm encoder and auxiliary head) with the
recipe's loss and optimiser (Dice + aux BCE, AdaBelief) and reports images per second and peak memory.

    python benchmarks/train_throughput.py --data ../shared/data/stas_public                  # a GPU node
    python benchmarks/train_throughput.py --bundles deeplab_lite0 --image-size 320 --steps 6  # CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from adabelief_pytorch import AdaBelief
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureTyped, RandRotate90d, ScaleIntensityd

from stas_pipeline.core.lmdb_cache import LMDBCacheDataset, Preprocessing, build_cache
from stas_pipeline.core.losses import SegmentationLoss
from stas_pipeline.core.models import build_model

REPO = Path(__file__).resolve().parents[1]
KEYS = ["image", "label"]


def random_part() -> list:
    return [ScaleIntensityd("image"), RandRotate90d(KEYS, prob=0.3), EnsureTyped(KEYS, track_meta=False)]


def cycle_batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in itertools.chain.from_iterable(itertools.repeat(loader)):
        yield batch["image"], batch["label"]


def random_batches(batch: int, size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.rand(batch, 3, size, size, device=device)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.97).float()
    return itertools.repeat((x, y))


def measure(model: torch.nn.Module, batches: Iterator, steps: int, warmup: int, device: torch.device,
            amp: bool, channels_last: bool) -> float:
    """Images per second of ``steps`` training steps after ``warmup`` ones."""
    loss_fn = SegmentationLoss()
    optimizer = AdaBelief(model.parameters(), lr=1e-4, eps=1e-16, betas=(0.9, 0.99), weight_decouple=True,
                          weight_decay=1e-4, rectify=False, print_change_log=False)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(enabled=amp and dtype == torch.float16 and device.type == "cuda")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.train()
    seen, start = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        x, y = next(batches)
        x = x.to(device, non_blocking=True, memory_format=fmt)
        y = y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=amp and device.type == "cuda"):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        seen += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS on CPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/stas_public",
                        help="folder with Train_Images/*.jpg and reference_masks/*.png")
    parser.add_argument("--bundles", nargs="+", default=["deeplab_effb6", "deeplab_effv2m", "deeplab_nfnet_l2"],
                        help="bundle names under bundles/ (model and batch size are read from them)")
    parser.add_argument("--image-size", type=int, default=800, help="training size (default 800)")
    parser.add_argument("--batch-size", type=int, default=0, help="override the bundles' batch size (0: keep)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each row (default 3)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers for rows 1 and 2 (default 4)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in rows 2 and 3")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    images = sorted((args.data / "Train_Images").glob("*.jpg"))
    items = [{"image": str(p), "label": str(args.data / "reference_masks" / f"{p.stem}.png")} for p in images]
    size = args.image_size
    report = {"device": torch.cuda.get_device_name(device) if cuda else f"CPU {platform.machine()}",
              "torch": torch.__version__, "image_size": size, "steps": args.steps, "workers": args.workers,
              "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build_cache(items, Path(tmp) / "cache", size, progress=False)
        report["cache_build_s"] = round(time.perf_counter() - start, 1)
        loader_kwargs = dict(shuffle=True, drop_last=True, num_workers=args.workers,
                             persistent_workers=args.workers > 0)
        for bundle in args.bundles:
            config = json.loads((REPO / "bundles" / f"{bundle}.json").read_text())
            batch = args.batch_size or config["batch_size"]
            reference = DataLoader(Dataset(items, Compose([*Preprocessing.resize(size).transforms, *random_part()])),
                                   batch_size=batch, **loader_kwargs)
            cached = DataLoader(LMDBCacheDataset(items, Path(tmp) / "cache", size, transform=Compose(random_part())),
                                batch_size=batch, pin_memory=cuda, **loader_kwargs)
            rows = [("reference: fp32, JPEG decoded every step", cycle_batches(reference), False, False, False),
                    ("ours: LMDB cache + AMP + channels_last", cycle_batches(cached), cuda, cuda, args.compile),
                    ("model only: tensors on the device", random_batches(batch, size, device), cuda, cuda,
                     args.compile)]
            for name, batches, amp, channels_last, compile_model in rows:
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                model = build_model(config["encoder_name"], aux_head=True, image_size=size).to(device)
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                net = torch.compile(model) if compile_model else model
                ips = measure(net, batches, args.steps, args.warmup, device, amp, channels_last)
                row = {"bundle": bundle, "batch": batch, "row": name, "images_per_s": round(ips, 2),
                       "peak_memory_mib": round(peak_memory_mib(device))}
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
                del model, net
    for bundle in args.bundles:
        r = [row["images_per_s"] for row in report["rows"] if row["bundle"] == bundle]
        report[f"{bundle}: ours / reference"] = round(r[1] / r[0], 2)
        report[f"{bundle}: ours / model only"] = round(r[1] / r[2], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
