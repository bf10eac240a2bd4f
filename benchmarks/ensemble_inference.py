"""Ensemble inference speed: the bundles' models together over a folder of images, with ``predict_images``
(decode, resize to the training size, predict, average, resize back, write mask + probabilities).

Model weights do not change the speed, so the models are built without pretrained weights.

    python benchmarks/ensemble_inference.py --images ../shared/data/stas_public/Train_Images        # GPU
    python benchmarks/ensemble_inference.py --bundles deeplab_lite0 deeplab_lite0 deeplab_lite0 \\
        --image-size 320 --limit 20                                                              # CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from stas_pipeline.core.models import build_model
from stas_pipeline.core.options import TTA_VIEWS
from stas_pipeline.core.trained_runs import inference_ready
from stas_pipeline.tasks.segmentation.inference import predict_images

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared/data/stas_public/Train_Images",
                        help="folder of images (1716 x 942 JPEGs in the challenge)")
    parser.add_argument("--bundles", nargs="+", default=["deeplab_effb6", "deeplab_effv2m", "deeplab_nfnet_l2"],
                        help="bundles whose models form the ensemble")
    parser.add_argument("--image-size", type=int, default=800, help="training size the models run at")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=4, help="decoding processes")
    parser.add_argument("--tta", default="none", choices=list(TTA_VIEWS), help="test-time views, as stas predict")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parser.parse_args()
    device = torch.device(args.device)
    images = sorted(args.images.glob("*.jpg"))[: args.limit or None]
    models = []
    for bundle in args.bundles:
        config = json.loads((REPO / "bundles" / f"{bundle}.json").read_text())
        model = inference_ready(build_model(config["encoder_name"], aux_head=True, image_size=args.image_size), device)
        models.append((model, args.image_size))
    with tempfile.TemporaryDirectory() as tmp:
        predict_images(models[:1], images[: args.batch_size], Path(tmp) / "warmup", batch_size=args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        predict_images(models, images, Path(tmp) / "masks", save_probs=Path(tmp) / "probs",
                       batch_size=args.batch_size, num_workers=args.workers, tta=args.tta, amp=args.amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}",
        "bundles": args.bundles, "image_size": args.image_size, "images": len(images), "tta": args.tta,
        "seconds": round(seconds, 1), "images_per_s": round(len(images) / seconds, 2),
        "peak_memory_mib": round(peak),
    }, indent=2))


if __name__ == "__main__":
    main()
