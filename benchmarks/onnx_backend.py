"""``stas predict --backend onnxruntime`` against ``--backend torch`` on the CPU, one run, one machine, alternating.

For a trained run: ``--n`` images predicted by each backend in turn (``--rounds`` times, after a warm-up that also
makes the run's ``model.onnx``), images per second from the median round, and where the time goes: the network
alone on one input of the run's size (torch module against the ONNX Runtime session, same batch) against the
whole prediction (decoding, the chain, windows, TTA, writing).

    python benchmarks/onnx_backend.py --checkpoint runs/deeplab_lite0_crops/fold0/best.pt \\
        --images ../shared/data/stas_public/Train_Images --n 8
    python benchmarks/onnx_backend.py --checkpoint runs/fundus_lite0/fold0/best.pt \\
        --images ../shared/data/stas_tiles_public/tiles --n 128 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from stas_pipeline import cli
from stas_pipeline.core.exported import input_size, onnx_model_for
from stas_pipeline.core.trained_runs import load_trained_run, run_info_of

BACKENDS = ("torch", "onnxruntime")


def predict_seconds(checkpoint: Path, images: Path, out: Path, backend: str, batch_size: int, tta: str) -> float:
    image_level = run_info_of(checkpoint).get("task") in ("classification", "grading")
    target = out / "p.csv" if image_level else out / "masks"
    start = time.perf_counter()
    assert cli.main(["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(target),
                     "--backend", backend, "--batch-size", str(batch_size), "--tta", tta, "--workers", "0",
                     "--overwrite"]) == 0
    return time.perf_counter() - start


def network_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="best.pt of a trained run")
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--n", type=int, default=8, help="images predicted per round (8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per backend (3)")
    parser.add_argument("--batch-size", type=int, default=1, help="as stas predict (1)")
    parser.add_argument("--tta", default="none", help="as stas predict (none)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for path in sorted(p for p in args.images.iterdir() if p.is_file())[:args.n]:
            (folder / path.name).symlink_to(path.resolve())
        for backend in BACKENDS:  # warm-up: the ONNX export, first-call costs
            predict_seconds(args.checkpoint, folder, Path(tmp) / backend, backend, args.batch_size, args.tta)
        rounds: dict[str, list[float]] = {b: [] for b in BACKENDS}
        for _ in range(args.rounds):
            for backend in BACKENDS:
                rounds[backend].append(predict_seconds(args.checkpoint, folder, Path(tmp) / backend, backend,
                                                       args.batch_size, args.tta))
    info = run_info_of(args.checkpoint)
    x = torch.rand(args.batch_size, 3, *input_size(info))
    networks = {"torch": load_trained_run(args.checkpoint, info).model,
                "onnxruntime": onnx_model_for(args.checkpoint, info, tuple(x.shape))}
    net = {b: network_seconds(m, x) for b, m in networks.items()}
    seconds = {b: statistics.median(v) for b, v in rounds.items()}
    result = {
        "checkpoint": str(args.checkpoint), "bundle": info.get("bundle"), "images": args.n, "tta": args.tta,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "images_per_second": {b: round(args.n / s, 3) for b, s in seconds.items()},
        "speedup_onnxruntime": round(seconds["torch"] / seconds["onnxruntime"], 3),
        "rounds_seconds": rounds,
        "network_seconds_per_input": {b: round(s, 4) for b, s in net.items()},
        "network_speedup_onnxruntime": round(net["torch"] / net["onnxruntime"], 3),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
