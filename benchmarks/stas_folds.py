"""A STAS segmentation recipe in k folds on a real folder: every fold trained by MONAI's own runner, every image
predicted out of fold (by the run that did not train on it), scored against the reference masks.

    python benchmarks/stas_folds.py --data ../shared/data/stas_public --out /tmp/stas_folds --name whole256 \
        --bundle deeplab_lite0 --set image_size=256 epochs=16 batch_size=4 lr=0.002
    python benchmarks/stas_folds.py --data ../shared/data/stas_public --out /tmp/stas_folds --name crops \
        --bundle deeplab_lite0_crops

Writes ``OUT/datalist.json`` (5 folds, seed 0, shared by every recipe), ``OUT/<name>/``: the cache, ``runs/``,
``oof/`` (masks), ``oof_probs/``, ``per_image.csv``, ``overlays/`` and ``worst.jpg`` (the worst images),
``oof_study.csv`` (post-processing chosen on the out-of-fold maps) and ``results.json``: per-fold wall time,
peak RSS and best validation Dice, out-of-fold mean Dice, the best post-processing. Each fold that already has
its ``best.pt`` and timing is kept, so an interrupted run goes on where it stopped; runs of this script with
``--only-folds`` may train folds side by side (one thread each), and a last run without it predicts.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_runs import STAS, measured  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with Train_Images/ and reference_masks/")
    parser.add_argument("--out", type=Path, required=True, help="benchmark folder (datalist shared by recipes)")
    parser.add_argument("--name", required=True, help="this recipe's subfolder of --out")
    parser.add_argument("--bundle", required=True, help="bundle name in bundles/")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="bundle knobs for training (and the cache), e.g. image_size=256 epochs=16")
    parser.add_argument("--folds", type=int, default=5, help="folds (5)")
    parser.add_argument("--only-folds", type=int, nargs="*", help="train only these folds (default: all)")
    parser.add_argument("--tta", default="hv", help="flip TTA of the out-of-fold predictions (hv)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                        help="torch threads of every command (OMP_NUM_THREADS, default 2)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out = (args.out / args.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    datalist = args.out.resolve() / "datalist.json"
    results_path = out / "results.json"
    results = {"bundle": args.bundle, "knobs": args.set, "threads": args.threads}
    if not datalist.is_file():
        measured("datalist", [*STAS, "make-datalist", "--images", str(args.data / "Train_Images"), "--masks",
                              str(args.data / "reference_masks"), "--out", str(datalist), "--folds",
                              str(args.folds), "--seed", "0"], out, {})
    knobs = dict(kv.split("=", 1) for kv in args.set)
    cache = out / "cache"
    cache_knobs = [f"--set={k}={v}" for k, v in knobs.items() if k in CACHE_KNOBS]
    size = ["--image-size", knobs["image_size"]] if "image_size" in knobs else []
    measured("cache", [*STAS, "build-lmdb", "--bundle", args.bundle, "--datalist", str(datalist), "--out", str(cache),
                       *size, *cache_knobs, "--no-progress"],
             out, results)
    overrides = [f"--{k}={v}" for k, v in knobs.items()]
    runs = out / "runs"
    for fold in args.only_folds if args.only_folds is not None else range(args.folds):
        name = f"train_fold{fold}"
        if name in _saved(results_path) and (runs / args.bundle / f"fold{fold}" / "best.pt").is_file():
            continue
        measured(name, [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                        f"bundles/{args.bundle}.json", "--dataset_dir", str(out), "--datalist", str(datalist),
                        "--cache_dir", str(cache), "--fold", str(fold), "--output_dir", str(runs), "--device", "cpu",
                        "--num_workers", "1", "--encoder_weights", "imagenet", *overrides], out, results)
        best = json.loads((runs / args.bundle / f"fold{fold}" / "best.json").read_text())
        results[name]["val_dice"] = best.get("val_dice")
        _save(results_path, results)
    checkpoints = sorted(str(p) for p in (runs / args.bundle).glob("fold*/best.pt"))
    if args.only_folds is not None or len(checkpoints) < args.folds:
        _save(results_path, results)
        print(f"{len(checkpoints)} of {args.folds} folds trained; a run without --only-folds predicts out of fold")
        return
    results = {**_saved(results_path), **results}
    if "predict_oof" not in results or not (out / "oof_probs").is_dir():
        measured("predict_oof", [*STAS, "predict", "--checkpoint", *checkpoints, "--datalist", str(datalist),
                                 "--out-of-fold", "--out", str(out / "oof"), "--save-probs", str(out / "oof_probs"),
                                 "--tta", args.tta, "--workers", "1", "--batch-size", "4", "--device", "cpu",
                                 "--overwrite"], out, results)
    measured("evaluate_oof", [*STAS, "evaluate", "--pred", str(out / "oof"), "--ref",
                              str(args.data / "reference_masks"), "--csv", str(out / "per_image.csv"),
                              "--overlays", str(out / "overlays"), "--images", str(args.data / "Train_Images"),
                              "--worst", "6", "--overwrite"], out, results)
    with open(out / "per_image.csv") as f:
        dice = {Path(r["image"]).stem: float(r["dice"]) for r in csv.DictReader(f)}
    folds = {Path(e["image"]).stem: e["fold"] for e in json.loads(datalist.read_text())["training"]}
    results["oof_dice"] = round(statistics.fmean(dice.values()), 4)
    results["oof_fold_dice"] = {k: round(statistics.fmean(d for s, d in dice.items() if folds[s] == k), 4)
                                for k in sorted(set(folds.values()))}
    results["worst"] = sorted(dice, key=dice.get)[:6]
    montage(sorted((out / "overlays").glob("*_overlay.png")), out / "worst.jpg")
    measured("postprocess_study", [*STAS, "postprocess", "--pred", str(out / "oof_probs"), "--ref",
                                   str(args.data / "reference_masks"), "--study", str(out / "oof_study.csv"),
                                   "--overwrite"], out, results)
    with open(out / "oof_study.csv") as f:
        results["oof_study_best"] = next(csv.DictReader(f))
    print(json.dumps(_save(results_path, results), indent=2))


def montage(overlays: list[Path], path: Path, width: int = 1200) -> None:
    """The worst images' overlays (reference green, prediction red) two across, scaled to ``width``, as a JPEG."""
    from PIL import Image

    tiles = [Image.open(p).convert("RGB") for p in overlays]
    w = width // 2
    tiles = [t.resize((w, round(t.height * w / t.width))) for t in tiles]
    h = max(t.height for t in tiles)
    sheet = Image.new("RGB", (width, h * ((len(tiles) + 1) // 2)), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % 2) * w, (i // 2) * h))
    sheet.save(path, quality=85)


def _saved(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(path: Path, results: dict) -> dict:
    """Merge ``results`` into the file (folds trained by parallel runs of this script each add theirs)."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {**_saved(path), **results}
        path.write_text(json.dumps(merged, indent=2))
    return merged


CACHE_KNOBS = ("keep_aspect",)  # knobs of the cached chain besides image_size

if __name__ == "__main__":
    main()
