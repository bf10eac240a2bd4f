"""What the stain augmentation costs a training step: the bundle's own training chain and network, with the stain
knobs off and on, timed in one run, alternating, as a ratio.

A step here is what one training iteration does on a single process: the bundle's ``task#train_transforms`` on
``batch_size`` cached items (real images through ``task#preprocessing``, as the cache holds them; the crop recipe
cuts its crops from them), collated, then forward, loss (``task#loss``), backward and AdaBelief. Steps with the
augmentation off and on alternate, so a slow spell of the machine weighs on both.

    python benchmarks/stain_aug.py --data ../shared/data/stas_public --bundle deeplab_lite0_crops
    python benchmarks/stain_aug.py --tiles ../shared/data/stas_tiles_public --bundle fundus_lite0 --image-size 224
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from adabelief_pytorch import AdaBelief
from monai.data import list_data_collate
from monai.transforms import Compose

from stas_pipeline.core.bundles import parsed_content

STAIN_ON = {"hed_jitter": 0.05, "hsv_jitter": 0.05, "bc_jitter": 0.1}


def cached_items(bundle: str, knobs: dict, data: Path | None, tiles: Path | None, n: int) -> list[dict]:
    """``n`` items as the cache holds them: the bundle's preprocessing of real images, the image as uint8."""
    (steps,) = parsed_content(bundle, ["task#preprocessing"], knobs)
    chain = Compose(steps)
    if data is not None:
        images = sorted((data / "Train_Images").glob("*.jpg"))[:n]
        entries = [{"image": str(p), "label": str(data / "reference_masks" / f"{p.stem}.png")} for p in images]
    else:
        entries = [{"image": str(p), "label": 0.0} for p in sorted((tiles / "tiles").glob("*.jpg"))[:n]]
    items = []
    for entry in entries:
        item = chain(entry)
        item["image"] = torch.as_tensor(item["image"]).round().clamp(0, 255).to(torch.uint8)
        items.append(item)
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="STAS folder (Train_Images/, reference_masks/)")
    source.add_argument("--tiles", type=Path, help="tiles folder (tiles/*.jpg)")
    parser.add_argument("--bundle", required=True, help="bundle name")
    parser.add_argument("--image-size", type=int, help="image_size knob (default: the bundle's)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps each way (default 6)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="the stain knobs when on (default: " + " ".join(f"{k}={v}" for k, v in STAIN_ON.items())
                             + ")")
    args = parser.parse_args(argv)
    on = {**STAIN_ON, **{k: float(v) for k, v in (kv.split("=", 1) for kv in args.set)}} if args.set else STAIN_ON
    knobs = {"encoder_weights": "none", **({"image_size": args.image_size} if args.image_size else {})}
    network, loss, batch_size, lr = parsed_content(args.bundle, ["task#network_def", "task#loss", "batch_size", "lr"],
                                                   knobs)
    chains = {name: parsed_content(args.bundle, ["task#train_transforms"], {**knobs, **extra})[0]
              for name, extra in (("off", {}), ("on", on))}
    items = cached_items(args.bundle, knobs, args.data, args.tiles, batch_size * 2)
    optimizer = AdaBelief(network.parameters(), lr=lr, eps=1e-8, betas=(0.9, 0.99), weight_decouple=True,
                          weight_decay=1e-4, rectify=False, print_change_log=False)
    network.train()
    times: dict[str, dict[str, list[float]]] = {name: {"chain": [], "step": []} for name in chains}
    for k in range(args.steps + 1):  # the first round warms up
        for name, chain in chains.items():
            chain.set_random_state(seed=k)
            start = time.perf_counter()
            samples = [chain(dict(items[(k * batch_size + i) % len(items)])) for i in range(batch_size)]
            batch = list_data_collate([s for x in samples for s in (x if isinstance(x, list) else [x])])
            chained = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            label = batch["label"].float()
            out = network(batch["image"].float())
            loss(out, label if label.ndim > 1 else label.view(-1, 1)).backward()
            optimizer.step()
            if k:
                times[name]["chain"].append(chained - start)
                times[name]["step"].append(time.perf_counter() - chained)
    median = {name: {part: statistics.median(v) for part, v in t.items()} for name, t in times.items()}
    total = {name: m["chain"] + m["step"] for name, m in median.items()}
    result = {"bundle": args.bundle, "knobs_on": on, "batch_size": batch_size, "steps": args.steps,
              "median_seconds": median, "step_ratio_on_off": round(total["on"] / total["off"], 4),
              "chain_ratio_on_off": round(median["on"]["chain"] / median["off"]["chain"], 4),
              "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
