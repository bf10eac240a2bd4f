"""Whole-slide stages at scale: a synthetic SIZE x SIZE pyramidal slide (JPEG tiles, 6 levels) is tiled,
predicted whole and scored, each stage a separate ``stas`` process whose peak RSS (``/usr/bin/time``) and wall
time are recorded. Two small slides with masks train the model (deeplab_lite0, a few epochs on their tiles);
the big slide has no mask in the tiling CSV, so ``stas tile`` lists its tiles as the test set and
``stas predict`` predicts it whole (with its QuPath GeoJSON, traced band by band); its own mask (RLE) scores the
prediction.

    python benchmarks/slide_scale.py --size 40000 --out /tmp/slide_scale        # must stay under 2 GiB RSS
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from stage_runs import STAS, measured

from stas_pipeline.tasks.slide.synthetic import SyntheticSlide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40000, help="side of the big slide, level 0 (40000)")
    parser.add_argument("--out", type=Path, required=True,
                        help="work folder for slides, tiles, runs, predictions (new or empty)")
    parser.add_argument("--scale", type=int, default=8, help="windows read this many times smaller (8)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs on the small slides' tiles (2)")
    args = parser.parse_args()
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty; give a new --out")
    (out / "slides").mkdir(parents=True)
    results: dict = {}

    start = time.perf_counter()
    rows = []
    for k in range(2):
        small = SyntheticSlide(4096, 4096, seed=k + 1)
        small.write(out / "slides" / f"small{k}.tif", levels=3, overwrite=True)
        rows.append(f"small{k},{small.rle()}")
    (out / "masks.csv").write_text("id,encoding\n" + "\n".join(rows) + "\n")
    big = SyntheticSlide(args.size, args.size, seed=0)
    big.write(out / "slides" / "big.tif", levels=6, overwrite=True)
    (out / "big_mask.csv").write_text(f"id,encoding\nbig,{big.rle(strip=1024)}\n")
    results["write_slides"] = {"seconds": round(time.perf_counter() - start, 1),
                               "big_slide_mib": round((out / "slides" / "big.tif").stat().st_size / 2**20)}
    print("write_slides", results["write_slides"], flush=True)

    tile_size, image_size = 128 * args.scale, 128
    measured("tile", [*STAS, "tile", str(out / "slides"), "--masks", str(out / "masks.csv"), "--out",
                      str(out / "tiles"), "--size", str(tile_size), "--stride", str(tile_size // 2), "--scale",
                      str(args.scale), "--folds", "2", "--overwrite"], out, results)
    datalist = json.loads((out / "tiles" / "datalist.json").read_text())
    results["tiles"] = {"training": len(datalist["training"]), "big_slide_windows": len(datalist["test"])}
    measured("build_lmdb", [*STAS, "build-lmdb", "--datalist", str(out / "tiles" / "datalist.json"), "--out",
                            str(out / f"cache_{image_size}"), "--bundle", "deeplab_lite0", "--image-size",
                            str(image_size), "--no-progress"], out, results)
    measured("train", [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                       "bundles/deeplab_lite0.json", "--dataset_dir", str(out / "tiles"), "--datalist",
                       str(out / "tiles" / "datalist.json"), "--cache_dir", str(out / f"cache_{image_size}"),
                       "--image_size", str(image_size), "--epochs", str(args.epochs), "--batch_size", "16",
                       "--device", "cpu", "--num_workers", "0", "--balanced_sampling", "true",
                       "--output_dir", str(out / "runs")], out, results)
    checkpoint = out / "runs" / "deeplab_lite0" / "fold0" / "best.pt"
    measured("predict", [*STAS, "predict", "--checkpoint", str(checkpoint), "--datalist",
                         str(out / "tiles" / "datalist.json"), "--batch-size", "16", "--overwrite", "--geojson",
                         "--out", str(out / "pred")], out, results)
    (geojson,) = (out / "pred").glob("*.geojson")
    results["predict"]["geojson"] = {"file": geojson.name, "mib": round(geojson.stat().st_size / 2**20, 1),
                                     "features": len(json.loads(geojson.read_text())["features"])}
    windows = int((out / "predict.log").read_text().split("windows ")[1].split(",")[0])  # tissue >= 0.01: more
    results["predict"]["windows"] = windows  # than the tile list's 0.05
    results["predict"]["windows_per_s"] = round(windows / results["predict"]["seconds"], 1)
    measured("evaluate", [*STAS, "evaluate", "--slides", str(out / "pred"), "--masks", str(out / "big_mask.csv"),
                          "--overwrite", "--out", str(out / "eval")], out, results)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    results["big_slide_dice"] = {"at_0.5": round(metrics["mean_dice_at_0.5"], 4),
                                 "best": round(metrics["mean_dice_at_best"], 4),
                                 "best_threshold": metrics["best_threshold"]}
    # the auxiliary head's option: the decoder skipped on windows it calls empty, its effect on time and Dice
    measured("predict_skip_empty", [*STAS, "predict", "--checkpoint", str(checkpoint), "--datalist",
                                    str(out / "tiles" / "datalist.json"), "--batch-size", "16", "--skip-empty", "0.5",
                                    "--out", str(out / "pred_skip")], out, results)
    log = (out / "predict_skip_empty.log").read_text()
    results["predict_skip_empty"]["decoder_passes_skipped"] = int(log.split("decoder passes skipped ")[1].split(",")[0])
    measured("evaluate_skip_empty", [*STAS, "evaluate", "--slides", str(out / "pred_skip"), "--masks",
                                     str(out / "big_mask.csv"), "--out", str(out / "eval_skip")], out, results)
    results["big_slide_dice"]["at_0.5_skip_empty"] = round(
        json.loads((out / "eval_skip" / "metrics.json").read_text())["mean_dice_at_0.5"], 4)
    results["slide"] = f"{args.size} x {args.size}, 6 levels, JPEG tiles of 256"
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
