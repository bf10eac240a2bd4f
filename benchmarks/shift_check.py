"""The shift check: how a trained run holds up when the stain changes, as on another lab's or scanner's slides.

A split grouped by source image cannot show a stain or scanner shift. This re-scores the same runs on the same
images with the stain shifted in haematoxylin-eosin-DAB space (``stas predict --stain-shift``: darker and
lighter, more and less haematoxylin, more and less eosin; ``core/options.py``'s ``STAIN_SHIFTS``), and prints the
metric per shift and the worst. Every step is the stage a user runs, once per shift:

    stas predict --checkpoint ... --stain-shift <shift> <PREDICT ARGS> --out OUT/<shift>/...
    stas evaluate ... (the task's mode) --out OUT/<shift>/eval

Tasks, by what the runs predict: image-level runs (classification, grading) give a predictions CSV scored
against ``--datalist``'s ``--section`` (AUC; grading: quadratic kappa); segmentation runs give masks scored
against ``--ref`` (mean per-image Dice); slide runs give slides scored against ``--masks`` (mean Dice at 0.5).
Writes ``OUT/shift_check.json`` and prints a table.

    python benchmarks/shift_check.py --checkpoint runs/fundus_lite0/fold*/best.pt --datalist datalist.json \\
        --section test --out /tmp/shift
    python benchmarks/shift_check.py --checkpoint runs/deeplab_lite0_crops/fold0/best.pt \\
        --datalist fold0_test.json --ref data/masks --out /tmp/shift_seg
    python benchmarks/shift_check.py --checkpoint runs/deeplab_lite0_slide/fold0/best.pt \\
        --slides test_slides/ --masks test_masks.csv --out /tmp/shift_slides
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from stas_pipeline import cli
from stas_pipeline.core.options import STAIN_SHIFTS

METRICS = {"classification": "auc", "grading": "kappa", "slide": "mean_dice_at_0.5"}


def stas(*args: str) -> None:
    """``stas <args>`` in this process; a stage that could do nothing (exit 2) or failed (3) stops the check (1:
    some inputs skipped, e.g. reference masks of images not predicted, goes on)."""
    print("$ stas " + " ".join(args), flush=True)
    code = cli.main(list(args))
    if code > 1:
        raise SystemExit(f"stas {args[0]} exited {code}")


def task_of(checkpoint: str) -> str:
    record = Path(checkpoint).with_name("best.json")
    return json.loads(record.read_text()).get("task", "segmentation")


def mean_dice(scores_csv: Path) -> float:
    with open(scores_csv, newline="") as f:
        dice = [float(row["dice"]) for row in csv.DictReader(f)]
    return sum(dice) / len(dice)


def check(args: argparse.Namespace) -> dict:
    task = "slide" if args.masks else task_of(args.checkpoint[0])
    if args.datalist:
        source = ["--datalist", str(args.datalist)]
    elif args.images:
        source = ["--images", str(args.images)]
    else:
        source = ["--slides", *map(str, args.slides)]
    if args.out_of_fold:
        source.append("--out-of-fold")
    rows = {}
    for shift in args.shifts:
        out = args.out / shift
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        predict = ["predict", "--checkpoint", *args.checkpoint, *source, "--tta", args.tta, "--stain-shift", shift,
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--overwrite"]
        if task in ("classification", "grading"):
            stas(*predict, "--out", str(out / "predictions.csv"))
            stas("evaluate", "--predictions", str(out / "predictions.csv"), "--datalist", str(args.datalist),
                 "--section", args.section, "--out", str(out / "eval"), "--overwrite")
            metrics = json.loads((out / "eval" / "metrics.json").read_text())
            value = metrics[METRICS[task]]
        elif task == "slide":
            stas(*predict, "--out", str(out / "pred"))
            stas("evaluate", "--slides", str(out / "pred"), "--masks", str(args.masks), "--out", str(out / "eval"),
                 "--overwrite")
            value = json.loads((out / "eval" / "metrics.json").read_text())[METRICS[task]]
        else:
            stas(*predict, "--out", str(out / "pred"))
            stas("evaluate", "--pred", str(out / "pred"), "--ref", str(args.ref), "--csv", str(out / "scores.csv"),
                 "--overwrite")
            value = mean_dice(out / "scores.csv")
        rows[shift] = {"factors": STAIN_SHIFTS.get(shift), "score": value,
                       "seconds": round(time.perf_counter() - start, 1)}
    base = rows.get("none", {}).get("score")
    worst = min((r for r in rows if r != "none"), key=lambda r: rows[r]["score"], default=None)
    return {"task": task, "checkpoints": args.checkpoint, "tta": args.tta, "shifts": rows, "unshifted": base,
            "worst_shift": worst, "worst": rows[worst]["score"] if worst else None,
            "drop": round(base - rows[worst]["score"], 4) if worst and base is not None else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="PT", help="the runs, as stas predict")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--datalist", type=Path, help="datalist whose test list (or training, --out-of-fold) is "
                                                      "predicted and, for image-level runs, scored")
    source.add_argument("--images", type=Path, help="folder of images (segmentation; scored against --ref)")
    source.add_argument("--slides", type=Path, nargs="+", metavar="SLIDE",
                        help="whole slides (files or folders), as stas predict --slides; scored against --masks")
    parser.add_argument("--out-of-fold", action="store_true", help="predict the datalist's training images out "
                                                                   "of fold (score with --section training)")
    parser.add_argument("--section", choices=("test", "training"), default="test",
                        help="image-level: the datalist section scored (default: test)")
    parser.add_argument("--ref", type=Path, help="segmentation: folder of reference masks")
    parser.add_argument("--masks", type=Path, help="slides: the slides' masks (RLE CSV or folder)")
    parser.add_argument("--out", type=Path, required=True, help="working folder: OUT/<shift>/..., shift_check.json")
    parser.add_argument("--shifts", nargs="+", default=list(STAIN_SHIFTS), choices=list(STAIN_SHIFTS),
                        help="the shifts (default: all, 'none' first)")
    parser.add_argument("--tta", default="none", help="test-time flips, as stas predict (default: none)")
    parser.add_argument("--batch-size", type=int, default=16, help="as stas predict (default: 16)")
    parser.add_argument("--workers", type=int, default=0, help="as stas predict (default: 0)")
    args = parser.parse_args(argv)
    if args.slides and not args.masks:
        parser.error("--slides needs --masks (the slides' reference masks)")
    if "none" not in args.shifts:
        args.shifts.insert(0, "none")
    result = check(args)
    (args.out / "shift_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'shift':<10} {'factors (H, E, D)':<20} score")
    for name, row in result["shifts"].items():
        print(f"{name:<10} {str(row['factors']):<20} {row['score']:.4f}")
    print(f"unshifted {result['unshifted']:.4f}; worst {result['worst']:.4f} ({result['worst_shift']}), "
          f"drop {result['drop']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
