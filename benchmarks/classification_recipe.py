"""The classification recipe end to end on a labels CSV, timed: every step is the stage a user runs.

    stas make-datalist (k folds grouped, inner test) -> stas build-lmdb (the bundle's chain) -> every fold trained
    through MONAI's entry point -> stas predict (fold mean + flip TTA on the inner test; out of fold) ->
    stas evaluate (inner-test AUC, out-of-fold AUC)

Reports CV AUC (mean and std of the folds' best validation AUC), out-of-fold AUC, inner-test AUC of the fold
mean, the wall time of training alone and of the whole run, and the peak RSS of the training processes; writes
``OUT/benchmark.json``. Training runs as separate processes (``python -m monai.bundle run training ...``), one
fold after another, as a user on a single machine would.

    python benchmarks/classification_recipe.py --labels ../shared/data/stas_tiles_public/labels.csv \\
        --label-column stas --out /tmp/tiles_bench --image-size 160 --epochs 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def stas(*args: str) -> None:
    """``stas <args>`` in a subprocess; a failing stage stops the benchmark."""
    print("$ stas " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "stas_pipeline.cli", *args], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=Path, required=True, help="labels CSV (image paths relative to it)")
    parser.add_argument("--label-column", default="label", help="the CSV's label column (default: label)")
    parser.add_argument("--out", type=Path, required=True, help="working folder (datalist, cache, runs, CSVs)")
    parser.add_argument("--bundle", default="fundus_lite0", help="classification bundle (default: fundus_lite0)")
    parser.add_argument("--image-size", type=int, default=160, help="training size (default: 160)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per fold (default: 6)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdaBelief learning rate (default: 1e-3)")
    parser.add_argument("--folds", type=int, default=5, help="folds (default: 5)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="inner test fraction (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of training (default: 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="further bundle overrides for training, e.g. --set rot90_prob=0.5 (repeatable)")
    parser.add_argument("--channels-last", choices=("true", "false"), default="true",
                        help="channels_last memory format (default: true, faster on CPU too)")
    args = parser.parse_args(argv)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    datalist, cache = out / "datalist.json", out / f"cache_{args.bundle}_{args.image_size}"
    runs = out / "runs"
    start = time.perf_counter()
    if not datalist.exists():
        stas("make-datalist", "--labels-csv", str(args.labels), "--label-column", args.label_column,
             "--folds", str(args.folds), "--test-fraction", str(args.test_fraction), "--seed", str(args.seed),
             "--out", str(datalist))
    stas("build-lmdb", "--datalist", str(datalist), "--out", str(cache), "--bundle", args.bundle,
         "--image-size", str(args.image_size), "--lists", "training", "test", "--no-progress")
    prepared = time.perf_counter()

    overrides = [token for item in args.set for token in ("--" + item.split("=", 1)[0], item.split("=", 1)[1])]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for fold in range(args.folds):
        command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                   f"bundles/{args.bundle}.json", "--dataset_dir", str(out), "--datalist", str(datalist),
                   "--cache_dir", str(cache), "--fold", str(fold), "--image_size", str(args.image_size),
                   "--epochs", str(args.epochs), "--batch_size", str(args.batch_size), "--lr", str(args.lr),
                   "--seed", str(args.seed), "--device", device, "--num_workers", "0",
                   "--channels_last", args.channels_last, "--output_dir", str(runs), *overrides]
        print(f"training fold {fold}: " + " ".join(command), flush=True)
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    trained = time.perf_counter()
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    run_dir = runs / args.bundle
    checkpoints = [str(run_dir / f"fold{k}" / "best.pt") for k in range(args.folds)]
    common = ["--checkpoint", *checkpoints, "--datalist", str(datalist), "--tta", "hv", "--batch-size", "32",
              "--workers", "0", "--overwrite"]
    stas("predict", *common, "--out", str(out / "test.csv"))
    stas("predict", *common, "--out-of-fold", "--out", str(out / "oof.csv"))
    for name, section in (("test", "test"), ("oof", "training")):
        stas("evaluate", "--predictions", str(out / f"{name}.csv"), "--datalist", str(datalist),
             "--section", section, "--out", str(run_dir / f"eval_{name}"))
    done = time.perf_counter()

    folds = [json.loads((run_dir / f"fold{k}" / "metrics.json").read_text())["best_val_auc"]
             for k in range(args.folds)]
    scores = {name: json.loads((run_dir / f"eval_{name}" / "metrics.json").read_text())["auc"]
              for name in ("test", "oof")}
    result = {
        "bundle": args.bundle, "image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "folds": args.folds, "overrides": args.set, "fold_auc": folds,
        "cv_auc_mean": float(torch.tensor(folds).mean()), "cv_auc_std": float(torch.tensor(folds).std()),
        "oof_auc": scores["oof"], "inner_test_auc": scores["test"],
        "seconds": {"prepare": round(prepared - start, 1), "training": round(trained - prepared, 1),
                    "predict_evaluate": round(done - trained, 1), "total": round(done - start, 1)},
        "peak_rss_mib_training": round(peak_rss), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {device}",
    }
    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
