"""How fast this machine trains right now: seconds per training step of a DeepLabV3+ on random tensors.

The CPU VMs run at varying speed (the same step can take 1.5x longer in a slow spell); timing this probe beside a
long run (``--pause PID`` stops the run's processes while the probe runs) says which speed a wall time was
measured at, so that figures from different hours compare as ratios.

    python benchmarks/speed_probe.py                                    # Lite0 DeepLabV3+, 8 x 256 px, 2 threads
    python benchmarks/speed_probe.py --pause $(pgrep -f "monai.bundle run training")
    python benchmarks/speed_probe.py --frozen-stages 2 --decoder-channels 128     # a cheaper network's step
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time
from datetime import datetime, timezone

import torch
from adabelief_pytorch import AdaBelief

from stas_pipeline.core.losses import SegmentationLoss
from stas_pipeline.core.models import build_model


def step_seconds(encoder: str, batch: int, size: int, steps: int, channels_last: bool,
                 decoder_channels: int | None = None, frozen_stages: int = 0) -> list[float]:
    """Wall seconds of each of ``steps`` training steps (after one warm-up step): the recipe's Dice + aux loss and
    AdaBelief (over the parameters that train)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(encoder, aux_head=True, image_size=size, decoder_channels=decoder_channels,
                        frozen_stages=frozen_stages).to(memory_format=fmt).train()
    optimizer = AdaBelief([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-16, betas=(0.9, 0.99),
                          weight_decouple=True, weight_decay=1e-4, rectify=False, print_change_log=False)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 1, size, size) > 0.9).float()
    loss_fn, times = SegmentationLoss(), []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="tf_efficientnet_lite0", help="timm encoder of the DeepLabV3+")
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--size", type=int, default=256, help="image side (default 256)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (default 6)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--decoder-channels", type=int, default=None, help="decoder width (default: smp's, 256)")
    parser.add_argument("--frozen-stages", type=int, default=0,
                        help="encoder feature levels frozen, as the bundles' frozen_stages (default 0)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="contiguous tensors instead of channels_last")
    parser.add_argument("--pause", type=int, nargs="*", default=[], metavar="PID",
                        help="processes to stop (SIGSTOP) while the probe runs and continue afterwards")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for pid in args.pause:
        os.kill(pid, signal.SIGSTOP)
    try:
        times = step_seconds(args.encoder, args.batch, args.size, args.steps, args.channels_last,
                             args.decoder_channels, args.frozen_stages)
    finally:
        for pid in args.pause:
            os.kill(pid, signal.SIGCONT)
    print(json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "encoder": args.encoder,
                      "batch": args.batch, "size": args.size, "threads": args.threads,
                      "decoder_channels": args.decoder_channels, "frozen_stages": args.frozen_stages,
                      "median_step_s": round(statistics.median(times), 3), "paused": args.pause}))


if __name__ == "__main__":
    main()
