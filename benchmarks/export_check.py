"""Exported models against PyTorch on real images: ``stas export-model`` of trained runs, then the bundle's members
through the same prediction code with each backend (the state dicts, TorchScript, ONNX Runtime), on a folder of
real images (the public STAS images, the public tiles). Reports the largest difference of the probability maps
(segmentation) or scores (image-level) from PyTorch's, and whether the masks (bytes of the PNGs; else how many
pixels differ), the grades (grading runs) or the rounded scores are identical. ``--float64`` adds PyTorch in
float64 as the reference every backend (PyTorch's own float32 included) is also measured against: how far each
float32 result lies from the exact one.

    python benchmarks/export_check.py --checkpoint runs/deeplab_lite0_crops/fold0/best.pt \\
        --images ../shared/data/stas_public/Train_Images --n 4
    python benchmarks/export_check.py --checkpoint runs/fundus_lite0/fold*/best.pt \\
        --images ../shared/data/stas_tiles_public/tiles --n 64
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stas_pipeline import cli
from stas_pipeline.tasks.classification.inference import predict_scores
from stas_pipeline.tasks.grading.metrics import grade_of
from stas_pipeline.tasks.model_zoo import bundle_runs
from stas_pipeline.tasks.segmentation.inference import predict_images

BACKENDS = ("torch", "torchscript", "onnxruntime")


class Float64(torch.nn.Module):
    """A network run in float64 on float32 inputs, its output back in float32: the reference."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.double()).float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", type=Path, required=True, help="best.pt of runs of one task")
    parser.add_argument("--images", type=Path, required=True, help="folder of real images")
    parser.add_argument("--n", type=int, default=4, help="images (the first n by name; 4)")
    parser.add_argument("--tta", default="none", help="flip TTA (none)")
    parser.add_argument("--float64", action="store_true",
                        help="also measure every backend against PyTorch in float64 (the exact reference)")
    args = parser.parse_args(argv)
    images = sorted(p for p in args.images.iterdir() if p.is_file())[:args.n]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        assert cli.main(["export-model", *map(str, args.checkpoint), "--out", str(bundle)]) == 0
        inference = json.loads((bundle / "configs" / "inference.json").read_text())
        members, grading = inference["members"], bool(inference["predict"].get("grade_of"))
        results: dict[str, dict] = {}
        for backend in (*BACKENDS, "float64") if args.float64 else BACKENDS:
            runs = bundle_runs(bundle, members, backend="torch" if backend == "float64" else backend)
            if backend == "float64":
                for run in runs:
                    run.model = Float64(run.model)
            if hasattr(runs[0], "window"):  # segmentation runs
                out = Path(tmp) / backend
                predict_images(runs, images, out / "masks", save_probs=out / "probs", probs_format="npy",
                               tta=args.tta)
                masks = sorted((out / "masks").iterdir())
                results[backend] = {"masks": [p.read_bytes() for p in masks],
                                    "pixels": np.concatenate([np.asarray(Image.open(p)).ravel() for p in masks]),
                                    "values": np.concatenate([np.load(p).ravel()
                                                              for p in sorted((out / "probs").iterdir())])}
            elif grading:  # grading runs: the grades from the default cut points
                rows = predict_scores(runs, images, tta=args.tta, value="score", grade_of=grade_of)[1]
                results[backend] = {"masks": [r["grade"] for r in rows],
                                    "values": np.array([r["score"] for r in rows])}
            else:
                rows = predict_scores(runs, images, tta=args.tta)[1]
                results[backend] = {"masks": [round(r["prob"], 3) for r in rows],
                                    "values": np.array([r["prob"] for r in rows])}
    report = {"checkpoints": [str(c) for c in args.checkpoint], "images": len(images), "tta": args.tta}
    for backend in BACKENDS[1:]:
        report[backend] = compare(results[backend], results["torch"])
    if args.float64:
        report["against_float64"] = {backend: compare(results[backend], results["float64"]) for backend in BACKENDS}
    print(json.dumps(report, indent=2))
    return 0


def compare(got: dict, reference: dict) -> dict:
    """The largest difference of ``got``'s values from ``reference``'s, and whether their outputs are identical
    (segmentation: how many mask pixels differ)."""
    report = {"max_abs_difference": float(np.abs(got["values"] - reference["values"]).max()),
              "outputs_identical": got["masks"] == reference["masks"]}
    if "pixels" in reference:
        report["mask_pixels_differing"] = (f"{int((got['pixels'] != reference['pixels']).sum())} of "
                                           f"{reference['pixels'].size}")
    return report


if __name__ == "__main__":
    sys.exit(main())
