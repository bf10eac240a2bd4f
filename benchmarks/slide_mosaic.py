"""Real slides with real masks: the public STAS images laid out as mosaics (pyramidal JPEG TIFFs, masks as RLE),
the slide recipe trained on part of them and the rest predicted whole, against the same runs predicting those
images one by one (each image its own slide, the same windows, scales and TTA).

Three mosaics of the images in name order: ``train_a`` (the first 50, 10 x 5), ``train_b`` (the next 50) and
``test`` (the rest, 8 columns; an empty slot is glass). Per scale of ``--scales`` (default 2, the recipe's: 1024-px
windows, stride 512, read 2x smaller; ``--scales 4 2``: a member per scale, merged), ``stas tile`` puts the two
training mosaics in two folds, and fold 0 of the recipe's bundle (``--bundle``, default ``deeplab_lite0_slide``)
trains on ``train_b``'s tiles (validated on ``train_a``'s; ``--fold 1``: the reverse): 256-px crops (one per 512-px
tile) at 2x, 256-px tiles at 4x, so every member takes the same training steps (validation on whole 512-px tiles
makes a 2x run about twice as long on a CPU). ``stas predict`` predicts the test mosaic whole with all members
(each at the tiling its run records, the maps merged; ``--runs``: members trained earlier), then each test image
alone; each image's Dice against its reference mask is measured on its own region of the mosaic's level-0 mask, and
on its own prediction.
``--pseudo-rounds N``: the member is group A's round 0; the test mosaic joins a tile datalist as test tiles, and
each round group B trains on them as group A's latest run labels them (``stas pseudo-label --group B``), then
group A on group B's labels; every run's test-mosaic Dice is in ``results.json``'s ``rounds``, and group A's last
run is the figure (the HuBMAP winners' alternating rounds, scored on the slide they labelled).
The threshold (``--threshold-on validation``, the default) is chosen as the slide demo chooses it, out of fold: the
same members predict their fold's validation mosaic (``train_a`` for fold 0) whole, and the cut of the saved
probability maps with the highest mean per-image Dice there is the one the test figure is also given at
(``results.json``'s ``threshold``; the figures at 0.5 stay beside it).
Each stage is a ``stas`` process with its wall time and peak RSS. Training and prediction run on ``--device``
(cuda when there is one; on one core of the 2-core VMs an epoch of the 2x member took 6 to 15 minutes).

    python benchmarks/slide_mosaic.py --out /tmp/mosaic                          # the slide recipe
    python benchmarks/slide_mosaic.py --out /tmp/mosaic_hc0 --set hypercolumns=false   # a part off (ablation)
    python benchmarks/slide_mosaic.py --out /tmp/mosaic_pair --scales 4 2        # a multi-scale pair
    python benchmarks/slide_mosaic.py --out /tmp/mosaic_old --bundle deeplab_lite0 --scales 4   # the old figure
    python benchmarks/slide_mosaic.py --out /tmp/mosaic_pl --scales 4 --pseudo-rounds 1  # + alternating rounds
    python benchmarks/slide_mosaic.py --out /tmp/mosaic_e18 --epochs 18 --set seed=1 --device cuda  # longer, a GPU
    python benchmarks/slide_mosaic.py --out /tmp/mosaic_f1 --fold 1              # trained on train_a, cut on train_b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from stage_runs import REPO, STAS, measured

from stas_pipeline.core.datalist import load_fold
from stas_pipeline.core.trained_runs import run_info_of
from stas_pipeline.tasks.slide.evaluation import threshold_curve
from stas_pipeline.tasks.slide.inference import upsampled
from stas_pipeline.tasks.slide.reader import Slide, write_slide
from stas_pipeline.tasks.slide.rle import encode_strips

GLASS = 242
TILE = {"size": 1024, "stride": 512}  # level-0 pixels of every scale's windows
CROP = 256  # members whose tiles are larger train on crops of this size (the same cost per step as 256-px tiles)


class Mosaic:
    """Images (and their masks) on a grid of ``columns``, any window composed on demand (a few images decoded)."""

    def __init__(self, images: list[Path], masks: list[Path], columns: int):
        self.images, self.masks, self.columns = images, masks, columns
        with Image.open(images[0]) as first:
            self.cell = (first.height, first.width)
        self.rows = -(-len(images) // columns)
        self.shape = (self.rows * self.cell[0], columns * self.cell[1])
        self._decoded: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def _array(self, kind: str, k: int) -> np.ndarray:
        key = (kind, k)
        if key not in self._decoded:
            path = (self.images if kind == "image" else self.masks)[k]
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB") if kind == "image" else img.convert("L"))
            if arr.shape[:2] != self.cell:
                raise ValueError(f"{path}: {arr.shape[1]}x{arr.shape[0]}, the mosaic's cells are "
                                 f"{self.cell[1]}x{self.cell[0]}")
            self._decoded[key] = arr if kind == "image" else (arr > 0).astype(np.uint8)
            if len(self._decoded) > 24:
                self._decoded.popitem(last=False)
        self._decoded.move_to_end(key)
        return self._decoded[key]

    def region(self, k: int) -> tuple[int, int]:
        """Top-left corner (level 0) of image ``k``."""
        return (k // self.columns) * self.cell[0], (k % self.columns) * self.cell[1]

    def window(self, kind: str, y: int, x: int, h: int, w: int) -> np.ndarray:
        out = np.full((h, w, 3), GLASS, np.uint8) if kind == "image" else np.zeros((h, w), np.uint8)
        ch, cw = self.cell
        for r in range(max(y, 0) // ch, min((y + h - 1) // ch, self.rows - 1) + 1):
            for c in range(max(x, 0) // cw, min((x + w - 1) // cw, self.columns - 1) + 1):
                k = r * self.columns + c
                if k >= len(self.images):
                    continue
                y0, x0 = max(y, r * ch), max(x, c * cw)
                y1, x1 = min(y + h, (r + 1) * ch), min(x + w, (c + 1) * cw)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = self._array(kind, k)[y0 - r * ch:y1 - r * ch,
                                                                           x0 - c * cw:x1 - c * cw]
        return out

    def write(self, path: Path) -> str:
        """The mosaic as a pyramidal JPEG TIFF; returns its mask's RLE."""
        write_slide(path, lambda y, x, h, w: self.window("image", y, x, h, w), *self.shape, levels=4,
                    compression="jpeg")
        strips = (self.window("mask", 0, x, self.shape[0], min(512, self.shape[1] - x))
                  for x in range(0, self.shape[1], 512))
        return encode_strips(strips, self.shape[0])


def image_histograms(mosaic: Mosaic, prob_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each image's two 256-bin histograms (all pixels, mask pixels) of its region of the probability map ``stas
    predict`` saved (``<id>_prob.npy``: p x 255 at an integer scale, each scaled pixel repeated), as ``stas
    evaluate --slides`` counts a slide's: its ``threshold_curve`` then scores every cut of the images."""
    prob = np.load(prob_path, mmap_mode="r")
    scale = round(mosaic.shape[1] / prob.shape[1])
    histograms = {}
    for k, path in enumerate(mosaic.images):
        p = upsampled(prob, scale, *mosaic.region(k), *mosaic.cell)
        ref = mosaic._array("mask", k).astype(bool)
        histograms[path.stem] = (np.bincount(p.ravel(), minlength=256), np.bincount(p[ref], minlength=256))
    return histograms


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = pred.sum() + ref.sum()
    return 1.0 if total == 0 else float(2 * (pred & ref).sum() / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/stas_public",
                        help="folder with Train_Images/*.jpg and reference_masks/*.png")
    parser.add_argument("--out", type=Path, required=True, help="work folder (new or empty)")
    parser.add_argument("--bundle", default="deeplab_lite0_slide",
                        help="bundle of every member (deeplab_lite0_slide, the slide recipe; deeplab_lite0 with "
                             "--scales 4: the figure before the recipe)")
    parser.add_argument("--scales", type=int, nargs="+", default=[2],
                        help="one member per scale, merged at prediction (default 2, the recipe's; 4 2: a "
                             "multi-scale pair, measured below the 2x member alone)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="bundle knobs of every member's training, e.g. mask_loss=dice (an ablation)")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (12)")
    parser.add_argument("--fold", type=int, choices=(0, 1), default=0,
                        help="the fold every member trains: 0 (default) on train_b, validated on train_a; 1 on "
                             "train_a, validated on train_b. The threshold is chosen on the validation mosaic")
    parser.add_argument("--runs", type=Path, nargs="+", default=[], metavar="BEST_PT",
                        help="predict with these trained members (best.pt of earlier runs of this benchmark, e.g. "
                             "one --scales 4 and one --scales 2 run side by side) instead of training")
    parser.add_argument("--tta", default="hv", help="test-time views of every prediction, as stas predict (hv)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device of every training and prediction (default: cuda when available, else "
                             "cpu; the figures in docs/benchmarks.md are the CPU's)")
    parser.add_argument("--pseudo-rounds", type=int, default=0,
                        help="alternating pseudo-label rounds on the test mosaic after the member (one scale, or "
                             "one --runs trained as --set says): per round group B trains on group A's confident "
                             "test tiles, then group A on group B's; the figure is group A's last run (0: none)")
    parser.add_argument("--max-uncertain", type=float, default=0.05,
                        help="stas pseudo-label's --max-uncertain for the rounds: a test tile is a pseudo label "
                             "when at most this share of its pixels lies between 0.02 and 0.98 (0.05; at the "
                             "stage's 0.01 no tile with STAS passed on the 4x member's map, whose median tile "
                             "has 6 %% of its pixels there)")
    parser.add_argument("--threshold-on", choices=("validation", "none"), default="validation",
                        help="validation (default): the members also predict their fold's validation mosaic "
                             "(train_a for fold 0) whole, and the test figure is given at the cut with the best mean "
                             "per-image Dice there as well as at 0.5; none: at 0.5 only (one prediction less)")
    parser.add_argument("--limit", type=int, default=0,
                        help="only the first N images, split 40/40/20 (a quick check; default: all, 50/50/rest)")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.pseudo_rounds and len(args.runs or args.scales) != 1:
        parser.error("--pseudo-rounds: one member (one scale, or one --runs)")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty; give a new --out")
    for sub in ("slides", "test", "images", "val"):
        (out / sub).mkdir(parents=True)
    images = sorted((args.data / "Train_Images").glob("*.jpg"))
    masks = [args.data / "reference_masks" / f"{p.stem}.png" for p in images]
    if args.limit:
        images, masks = images[:args.limit], masks[:args.limit]
    a = 50 if not args.limit else round(0.4 * args.limit)
    parts = {"train_a": slice(0, a), "train_b": slice(a, 2 * a), "test": slice(2 * a, None)}
    if args.runs:  # what those runs trained, not this call's training options
        trained = [run_info_of(p) for p in args.runs]
        results: dict = {key: [info.get(key) for info in trained] for key in ("bundle", "epochs", "seed")}
    else:
        results = {"bundle": args.bundle, "scales": args.scales, "knobs": args.set, "epochs": args.epochs}
    results |= {"runs": [str(p) for p in args.runs],
                "images": {name: len(images[part]) for name, part in parts.items()}}

    start = time.perf_counter()
    mosaics = {name: Mosaic(images[part], masks[part], columns=10 if name != "test" else 8)
               for name, part in parts.items()}
    rles = {name: mosaic.write(out / ("test" if name == "test" else "slides") / f"{name}.tif")
            for name, mosaic in mosaics.items()}
    (out / "masks.csv").write_text(f"id,encoding\ntrain_a,{rles['train_a']}\ntrain_b,{rles['train_b']}\n")
    (out / "test_mask.csv").write_text(f"id,encoding\ntest,{rles['test']}\n")  # kept apart: scoring only
    test = mosaics["test"]
    for k, path in enumerate(test.images):  # each test image alone, as its own slide
        write_slide(out / "images" / f"{path.stem}.tif", lambda y, x, h, w, k=k: _alone(test, k, y, x, h, w),
                    *test.cell, levels=3, compression="jpeg")
    results["write_slides_s"] = round(time.perf_counter() - start, 1)
    results["mosaics"] = {name: f"{m.shape[1]} x {m.shape[0]}" for name, m in mosaics.items()}

    checkpoints, knobs = [str(p.resolve()) for p in args.runs], [f"--{kv}" for kv in args.set]
    for scale in [] if args.runs else args.scales:
        tiles = out / f"tiles_{scale}"
        measured(f"tile_{scale}", tile_command(out, tiles, scale, ["slides"]), out, results)
        results[f"training_tiles_{scale}"] = len(json.loads((tiles / "datalist.json").read_text())["training"])
        checkpoints.append(train(str(scale), tiles / "datalist.json", scale, out, args, knobs, results))
    if args.pseudo_rounds:
        checkpoints = [pseudo_rounds(checkpoints[0], test, out, args, knobs, results)]
    measured("predict_mosaic", predict_command(checkpoints, out / "test", out / "pred_mosaic", args), out, results)
    measured("predict_images", predict_command(checkpoints, out / "images", out / "pred_images", args), out, results)
    for name in ("predict_mosaic", "predict_images"):
        windows = sum(int(line.split("windows ")[1].split(",")[0]) for line in
                      (out / f"{name}.log").read_text().splitlines() if line.startswith("predict: slides"))
        results[name]["windows"] = windows
        results[name]["windows_per_s"] = round(windows / results[name]["seconds"], 2)

    measured("evaluate_mosaic", [*STAS, "evaluate", "--slides", str(out / "pred_mosaic"), "--masks",
                                 str(out / "test_mask.csv"), "--out", str(out / "eval_mosaic")], out, results)
    slide_metrics = json.loads((out / "eval_mosaic" / "metrics.json").read_text())
    results["test_mosaic_slide_dice"] = {"at_0.5": round(slide_metrics["mean_dice_at_0.5"], 4)}
    per_image = per_image_dice(test, out / "pred_mosaic", out / "pred_images")
    results["per_image"] = per_image
    results["mean_dice_mosaic"] = round(float(np.mean([r["dice_mosaic"] for r in per_image])), 4)
    results["mean_dice_alone"] = round(float(np.mean([r["dice_alone"] for r in per_image])), 4)
    results["difference"] = round(results["mean_dice_mosaic"] - results["mean_dice_alone"], 4)
    if args.threshold_on == "validation":
        val = validation_slide(checkpoints[0])
        (out / "val" / f"{val}.tif").symlink_to(out / "slides" / f"{val}.tif")
        results["threshold"] = validation_threshold(checkpoints, val, mosaics, out, args, results)
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs" + (
        f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else "")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "per_image"}, indent=2))


def validation_slide(checkpoint: str) -> str:
    """The training mosaic ``checkpoint``'s run validated on: the slide of its fold in its datalist."""
    info = run_info_of(checkpoint)
    (slide,) = {e["group"] for e in load_fold(info["datalist"], info["fold"])[1]}
    return slide


def validation_threshold(checkpoints: list[str], val: str, mosaics: dict[str, Mosaic], out: Path,
                         args: argparse.Namespace, results: dict) -> dict:
    """``checkpoints`` predict the validation mosaic ``val`` (stage ``predict_val``); the cut with the best mean
    per-image Dice on it, chosen as ``stas evaluate --slides`` chooses it, and the test mosaic's mean per-image
    Dice at it (its map as ``predict_mosaic`` saved it), with both curves."""
    measured("predict_val", predict_command(checkpoints, out / "val", out / "pred_val", args), out, results)
    val_curve = threshold_curve(image_histograms(mosaics[val], out / "pred_val" / f"{val}_prob.npy"))
    test_dice = threshold_curve(image_histograms(mosaics["test"], out / "pred_mosaic" / "test_prob.npy"))["curve"]
    if abs(test_dice["0.5"] - results["mean_dice_mosaic"]) > 1e-3:  # the map cut here must be the written mask
        raise SystemExit(f"test map cut at 0.5: mean Dice {test_dice['0.5']:.4f}, the written mask's "
                         f"{results['mean_dice_mosaic']}")
    best = val_curve["best_threshold"]
    return {"chosen_on": f"{val}: the validation images of the members' fold, mean per-image Dice", "threshold": best,
            "val_mean_dice": round(val_curve["mean_dice_at_best"], 4),
            "mean_dice_mosaic": round(test_dice[str(best)], 4),
            "by_threshold": {t: {"val": round(v, 4), "test": round(test_dice[t], 4)}
                             for t, v in val_curve["curve"].items()}}


def predict_command(checkpoints: list[str], slides: Path, pred: Path, args: argparse.Namespace) -> list[str]:
    """``stas predict`` of the slides in ``slides`` by ``checkpoints`` (merged) into ``pred``."""
    return [*STAS, "predict", "--checkpoint", *checkpoints, "--slides", str(slides), "--tta", args.tta,
            "--batch-size", "8", "--device", args.device, "--out", str(pred)]


def tile_command(out: Path, tiles: Path, scale: int, folders: list[str]) -> list[str]:
    """``stas tile`` of ``folders`` of ``out`` (the training mosaics; with ``test``, the test mosaic joins the
    datalist's test list) at ``scale``, into ``tiles``."""
    return [*STAS, "tile", *(str(out / f) for f in folders), "--masks", str(out / "masks.csv"), "--out", str(tiles),
            "--size", str(TILE["size"]), "--stride", str(TILE["stride"]), "--scale", str(scale), "--folds", "2"]


def train(name: str, datalist: Path, scale: int, out: Path, args: argparse.Namespace, knobs: list[str],
          results: dict) -> str:
    """Cache ``datalist``'s tiles and train fold 0 of the bundle on them (stages ``build_lmdb_<name>``,
    ``train_<name>``, run in ``out/runs_<name>``); returns its ``best.pt``."""
    size = TILE["size"] // scale
    measured(f"build_lmdb_{name}", [*STAS, "build-lmdb", "--datalist", str(datalist), "--out",
                                    str(out / f"cache_{name}"), "--bundle", args.bundle, "--image-size", str(size),
                                    "--no-progress"], out, results)
    crops = ["--crop_size", str(CROP), "--crops_per_image", "1"] if size > CROP else []
    measured(f"train_{name}", [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                               f"bundles/{args.bundle}.json", "--dataset_dir", str(datalist.parent), "--datalist",
                               str(datalist), "--cache_dir", str(out / f"cache_{name}"), "--image_size", str(size),
                               "--fold", str(args.fold), "--epochs", str(args.epochs), "--batch_size", "8", "--lr",
                               "0.002", "--device", args.device, "--num_workers", "0", "--balanced_sampling", "true",
                               *crops, *knobs, "--output_dir", str(out / f"runs_{name}")], out, results)
    run = out / f"runs_{name}" / args.bundle / f"fold{args.fold}"
    results[f"train_{name}"]["val_dice"] = json.loads((run / "best.json").read_text()).get("val_dice")
    return str(run / "best.pt")


def pseudo_rounds(member: str, test: Mosaic, out: Path, args: argparse.Namespace, knobs: list[str],
                  results: dict) -> str:
    """Alternating pseudo-label rounds from ``member`` (group A's round 0): in each round group B trains on the
    test mosaic's tiles as group A's latest run labels them (``stas pseudo-label --group B``), then group A on
    group B's; each run predicts the test mosaic, scored in ``results["rounds"]``. Returns group A's last
    ``best.pt``."""
    config = json.loads((Path(member).parent / "config.json").read_text())
    scale = int(json.loads(Path(config["datalist"]).read_text())["tiles"]["scale"])
    tiles = out / f"tiles_{scale}_rounds"
    measured("tile_rounds", tile_command(out, tiles, scale, ["slides", "test"]), out, results)
    base, latest = tiles / "datalist.json", {"A": member}
    datalists = {"A": base, "B": base}
    rounds = [{"group": "A", "round": 0, "checkpoint": member, **mosaic_scores(member, "A0", test, out, args)}]
    for r in range(1, args.pseudo_rounds + 1):
        for group, other in (("B", "A"), ("A", "B")):
            name, labeller = f"{group}{r}", latest[other]
            labelled = tiles / f"D_{name}.json"
            pseudo = [*STAS, "pseudo-label", "--datalist", str(datalists[group]), "--predictions",
                      str(out / f"pred_mosaic_{other}{r - (other == 'A')}"), "--runs",
                      str(Path(labeller).parents[1]), "--group", group, "--max-uncertain", str(args.max_uncertain),
                      "--out", str(labelled)]
            if r == 1 and group == "B":
                pseudo += ["--labelled-by", "A"]  # round 0 trained on a datalist of no group
            measured(f"pseudo_label_{name}", pseudo, out, results)
            record = json.loads(labelled.read_text())["pseudo_rounds"][-1]
            datalists[group] = labelled
            latest[group] = train(f"{scale}_{name}", labelled, scale, out, args, knobs, results)
            rounds.append({"group": group, "round": r, "checkpoint": latest[group],
                           **{k: record[k] for k in ("tiles_added", "tiles_uncertain", "positive_tiles")},
                           "val_dice": results[f"train_{scale}_{name}"]["val_dice"],
                           **mosaic_scores(latest[group], name, test, out, args)})
            print(json.dumps(rounds[-1]), flush=True)
    results["rounds"] = rounds
    return latest["A"]


def mosaic_scores(checkpoint: str, name: str, test: Mosaic, out: Path, args: argparse.Namespace) -> dict:
    """``checkpoint`` predicts the test mosaic into ``out/pred_mosaic_<name>``: its pooled Dice at 0.5 and the
    mean of its images' Dice."""
    results: dict = {}
    measured(f"predict_mosaic_{name}", predict_command([checkpoint], out / "test", out / f"pred_mosaic_{name}", args),
             out, results)
    measured(f"evaluate_mosaic_{name}", [*STAS, "evaluate", "--slides", str(out / f"pred_mosaic_{name}"),
                                         "--masks", str(out / "test_mask.csv"), "--out",
                                         str(out / f"eval_mosaic_{name}")], out, results)
    pooled = json.loads((out / f"eval_mosaic_{name}" / "metrics.json").read_text())["mean_dice_at_0.5"]
    per_image = per_image_dice(test, out / f"pred_mosaic_{name}")
    return {"pooled_dice": round(pooled, 4),
            "mean_dice_mosaic": round(float(np.mean([r["dice_mosaic"] for r in per_image])), 4)}


def per_image_dice(test: Mosaic, mosaic: Path, alone: Path | None = None) -> list[dict]:
    """Each test image's Dice on its region of ``mosaic``'s predicted mask (and on its own prediction in
    ``alone``)."""
    rows = []
    with Slide(mosaic / "test.tif") as mosaic_mask:
        for k, path in enumerate(test.images):
            ref = np.asarray(Image.open(test.masks[k])) > 0
            y, x = test.region(k)
            rows.append({"image": path.stem, "dice_mosaic": round(dice(mosaic_mask.read(y, x, *test.cell)[..., 0] > 0,
                                                                       ref), 4)})
            if alone is not None:
                with Slide(alone / f"{path.stem}.tif") as own:
                    rows[-1]["dice_alone"] = round(dice(own.read(0, 0, *test.cell)[..., 0] > 0, ref), 4)
    return rows


def _alone(mosaic: Mosaic, k: int, y: int, x: int, h: int, w: int) -> np.ndarray:
    """A window of image ``k`` by itself (glass beyond its edges)."""
    out = np.full((h, w, 3), GLASS, np.uint8)
    ch, cw = mosaic.cell
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, ch), min(x + w, cw)
    if y0 < y1 and x0 < x1:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = mosaic._array("image", k)[y0:y1, x0:x1]
    return out


if __name__ == "__main__":
    main()
