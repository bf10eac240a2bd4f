"""``stas demo --task segmentation`` (the default): the STAS recipe end to end, from LabelMe files (drawn
synthetic ones, or ``--data``) to a checked submission zip and a summary table. Its stages call the segmentation
task's modules directly (labelme, datalist, the shared cache, MONAI's training entry point, inference, ensemble,
evaluation, export); the stages, the defaults, the measured times and the output layout are written down in
``stas_pipeline/stages/demo.py`` (``stas demo --help``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import monai.bundle
import torch

from stas_pipeline.core.bundles import bundle_file, parsed_content, write_resolved
from stas_pipeline.core.datalist import entries, test_images, write_datalist
from stas_pipeline.core.datalist_tables import fold_table
from stas_pipeline.core.demo_runner import Demo, StageError, check_problems, link, lite0_weights_installed
from stas_pipeline.core.images import IMAGE_SUFFIXES, MASK_SUFFIXES, InputFolderError, list_files
from stas_pipeline.core.lmdb_cache import Preprocessing, build_cache
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.splits import Split
from stas_pipeline.core.synthetic import make_challenge_dataset
from stas_pipeline.tasks.segmentation.datalist import foreground_fraction, make_datalist
from stas_pipeline.tasks.segmentation.ensemble import ensemble_folders
from stas_pipeline.tasks.segmentation.evaluation import evaluate_folders, format_summary, summarize
from stas_pipeline.tasks.segmentation.export import export_submission
from stas_pipeline.tasks.segmentation.inference import load_run_model, predict_images
from stas_pipeline.tasks.segmentation.labelme import convert_folder
from stas_pipeline.tasks.segmentation.task import (
    CROP_BUNDLE,
    CROP_REAL_DEFAULTS,
    CROP_SYNTHETIC_DEFAULTS,
    REAL_DEFAULTS,
    SYNTHETIC_DEFAULTS,
)

BUNDLE = "deeplab_lite0"  # the whole-image recipe's bundle
STAGE_NAMES = ("data", "masks", "datalist", "cache", "train", "predict", "ensemble", "evaluate", "export")
TASK, LABEL_KIND = "segmentation", "mask"  # what the demo's datalist declares
SYNTHETIC_SHAPE = (176, 320)  # height, width of the synthetic images: the challenge's aspect ratio, smaller


def _defaults(recipe: str, synthetic: bool) -> dict:
    if recipe == "crops":
        return CROP_SYNTHETIC_DEFAULTS if synthetic else CROP_REAL_DEFAULTS
    return SYNTHETIC_DEFAULTS if synthetic else REAL_DEFAULTS


class SegmentationDemo(Demo):
    """The segmentation demo's state: settings, the paths of every output, timings and scores."""

    STAGE_NAMES = STAGE_NAMES

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.n_images = args.n_images or 40
        self.synthetic = args.data is None
        defaults = _defaults(args.recipe, self.synthetic)
        self.bundle = CROP_BUNDLE if args.recipe == "crops" else BUNDLE
        self.image_size = args.image_size or defaults["image_size"]
        self.epochs = args.epochs or defaults["epochs"]
        # the crop bundle validates every other epoch; an odd number of epochs validates each, so the last counts
        self.knobs = {"crop_size": args.crop_size or defaults["crop_size"],
                      "val_interval": 2 if self.epochs % 2 == 0 else 1} if self.bundle == CROP_BUNDLE else {}
        side = ("--crop-size", self.knobs["crop_size"]) if self.knobs else ("--image-size", self.image_size)
        if side[1] % 16:
            raise StageError(f"{side[0]} must be a multiple of 16 (DeepLabV3+'s output stride), got {side[1]}")
        self.batch_size = args.batch_size or defaults["batch_size"]
        self.lr = args.lr or defaults["lr"]
        self.weights = args.weights or ("imagenet" if lite0_weights_installed() else "none")
        self.device = args.device
        self.data = self.out / "data" if self.synthetic else args.data.resolve()
        self.masks = self.out / "masks"
        self.split = self.out / "split"
        self.datalist = self.out / "datalist.json"
        self.cache = self.out / f"cache_{self.bundle}_{self.image_size}"
        self.runs = self.out / "runs"
        self.predictions = self.out / "predictions"
        self.evaluation = self.out / "evaluation"
        self.overlays = self.out / "overlays"
        self.submission = self.out / "submission.zip"
        self.folds = 0
        self.n_train = self.n_test = 0
        self.val: dict[int, dict] = {}
        self.test: dict[str, dict] = {}
        self.ensemble_method = ""
        self.notes: list[str] = []

    # --- stages --------------------------------------------------------------------------------------------

    def stage_data(self) -> None:
        if self.synthetic:
            height, width = SYNTHETIC_SHAPE
            make_challenge_dataset(self.data, n=self.n_images, height=height, width=width, seed=self.args.seed)
            print(f"drew {self.n_images} synthetic {width}x{height} images into {self.data}")
        elif not self.data.is_dir():
            raise StageError(f"{self.data}: --data folder not found")

    def stage_masks(self) -> None:
        try:
            problems = convert_folder(self.data / "Train_Annotations", self.masks, images=self.data / "Train_Images")
        except InputFolderError as err:
            raise StageError(f"{err} (the data folder needs the challenge layout: Train_Images/*.jpg and "
                             "Train_Annotations/*.json)") from None
        print(problems.summary())
        if not problems.counts["written"]:
            raise StageError("no mask written")
        if problems.skipped:
            self.notes.append(f"masks: {len(problems.skipped)} annotation file(s) skipped, see the log")

    def stage_datalist(self) -> None:
        images = {p.stem: p for p in list_files(self.data / "Train_Images", IMAGE_SUFFIXES)}
        masks = {p.stem: p for p in list_files(self.masks, MASK_SUFFIXES)}
        stems = sorted(images.keys() & masks.keys())
        if len(stems) < len(images):
            self.notes.append(f"datalist: {len(images) - len(stems)} image(s) without an annotation left out")
        # the held-out test split: a seeded sample of the empty and of the non-empty masks alike
        empty = {s for s in stems if foreground_fraction(masks[s]) == 0}
        nonempty = [s for s in stems if s not in empty]
        rng = random.Random(self.args.seed)
        test: list[str] = []
        for group in (sorted(empty), nonempty):
            rng.shuffle(group)
            test += group[: round(self.args.test_fraction * len(group))]
        if not test and len(stems) > 1:
            test = [rng.choice(stems)]
        test_set = set(test)
        train = [s for s in stems if s not in test_set]
        wanted = self.args.folds or min(5, max(2, self.args.folds_to_train, len(train) // 5))
        self.folds = max(wanted, 2, self.args.folds_to_train)
        if not test or len(train) < self.folds:
            raise StageError(f"{len(stems)} annotated images: too few for a test split of {len(test)} and "
                             f"{self.folds} folds of the rest; use more images or a larger --test-fraction")
        if self.args.folds and self.args.folds < self.args.folds_to_train:
            raise StageError(f"--folds {self.args.folds} is fewer than --folds-to-train {self.args.folds_to_train}")
        for part, members in (("train", train), ("test", test)):
            for kind, source in (("images", images), ("masks", masks)):
                folder = self.split / f"{part}_{kind}"
                folder.mkdir(parents=True)
                for stem in members:
                    link(source[stem], folder / source[stem].name)
        problems = Problems("make-datalist")
        split = Split(self.folds, self.args.seed, test_images=self.split / "test_images")
        datalist = make_datalist(self.split / "train_images", self.split / "train_masks", self.out, split, problems)
        check_problems(problems, "files")
        write_datalist(self.datalist, datalist, TASK, LABEL_KIND)
        self.n_train, self.n_test = len(datalist["training"]), len(datalist["test"])
        print(fold_table(datalist, LABEL_KIND))
        print(f"{self.n_train} images in {self.folds} folds, {self.n_test} held out as the test split")

    def stage_cache(self) -> None:
        items = entries(self.datalist, "training")
        problems = Problems("build-lmdb")
        (chain,) = parsed_content(self.bundle, ["task#preprocessing"], {"image_size": self.image_size, **self.knobs})
        stats = build_cache(items, self.cache, Preprocessing.of(chain), problems)
        check_problems(problems, "samples")
        print(f"{self.cache}: {stats.written + stats.reused} samples, {stats.bytes_on_disk / 2**20:.1f} MiB")

    def stage_train(self) -> None:
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = write_resolved(self.bundle, self.out / "configs" / f"{bundle_file(self.bundle).stem}.json")
        for fold in range(self.args.folds_to_train):
            print(f"training {self.bundle} fold {fold} of {self.folds} ({self.epochs} epochs, {self.image_size} px, "
                  f"batch {self.batch_size}, {self.weights} weights, {device})", flush=True)
            monai.bundle.run(
                run_id="training", config_file=str(config), dataset_dir=str(self.out),
                datalist=str(self.datalist), cache_dir=str(self.cache), fold=fold, epochs=self.epochs,
                image_size=self.image_size, batch_size=self.batch_size, lr=self.lr,
                encoder_weights=self.weights, device=device, amp=False, num_workers=0,
                output_dir=str(self.runs), seed=self.args.seed, **self.knobs)
            metrics_file = self.run_dir(fold) / "metrics.json"
            if not metrics_file.is_file() or not (self.run_dir(fold) / "best.pt").is_file():
                raise StageError(f"fold {fold}: training wrote no {metrics_file} / best.pt")
            metrics = json.loads(metrics_file.read_text())
            self.val[fold] = {"best_val_dice": metrics.get("best_val_dice"), "best_epoch": metrics.get("best_epoch")}
            print(f"fold {fold}: best validation Dice {metrics.get('best_val_dice')} at epoch "
                  f"{metrics.get('best_epoch')}", flush=True)

    def stage_predict(self) -> None:
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        images = test_images(self.datalist)
        for fold in range(self.args.folds_to_train):
            model = load_run_model(self.run_dir(fold) / "best.pt", device)
            problems = predict_images([model], images, self.predictions / f"fold{fold}",
                                      save_probs=self.predictions / f"fold{fold}_probs", batch_size=4)
            check_problems(problems, "images")

    def stage_ensemble(self) -> None:
        n = self.args.folds_to_train
        method = self.args.ensemble if self.args.ensemble != "auto" else ("mean" if n % 2 == 0 else "vote")
        if method == "mean":
            members = [self.predictions / f"fold{k}_probs" for k in range(n)]
            self.ensemble_method = f"mean of {n} folds' probabilities > 0.5"
        else:
            members = [self.predictions / f"fold{k}" for k in range(n)]
            self.ensemble_method = f"strict majority vote of {n} folds' masks" + (
                " (ties: background)" if n % 2 == 0 else "")
        problems = ensemble_folders(members, self.predictions / "ensemble", method=method)
        check_problems(problems, "images")
        print(f"{self.ensemble_method}: {problems.counts['written']} masks")

    def stage_evaluate(self) -> None:
        members = [(f"fold{k}", self.predictions / f"fold{k}") for k in range(self.args.folds_to_train)]
        for name, folder in [*members, ("ensemble", self.predictions / "ensemble")]:
            overlays = name == "ensemble" and self.args.worst > 0
            rows, problems = evaluate_folders(
                folder, self.split / "test_masks", csv_path=self.evaluation / f"{name}.csv",
                overlays=self.overlays if overlays else None, images=self.split / "test_images",
                worst=self.args.worst)
            check_problems(problems, "images")
            self.test[name] = summarize(rows)
            print(f"{name}: {format_summary(self.test[name])}")

    def stage_export(self) -> None:
        problems = export_submission(self.predictions / "ensemble", self.submission,
                                     test_images(self.datalist))
        check_problems(problems, "files")
        print(f"{self.submission}: {problems.counts['written']} masks")

    # --- summary ---------------------------------------------------------------------------------------------

    def run_dir(self, fold: int) -> Path:
        return self.runs / self.bundle / f"fold{fold}"

    def outputs(self) -> dict[str, str]:
        folds = range(self.args.folds_to_train)
        return {
            "images": str(self.data / "Train_Images"),
            "annotations": str(self.data / "Train_Annotations"),
            "masks": str(self.masks),
            "test split (reference masks)": str(self.split / "test_masks"),
            "datalist": str(self.datalist),
            "cache": str(self.cache),
            "runs": ", ".join(str(self.run_dir(k)) for k in folds),
            "predictions": ", ".join(str(self.predictions / f"fold{k}") for k in folds),
            "ensemble": str(self.predictions / "ensemble"),
            "scores": str(self.evaluation),
            "overlays": str(self.overlays),
            "submission": str(self.submission),
            "summary": str(self.out / "summary.json"),
        }

    def summary(self) -> dict:
        source = (f"synthetic ({self.n_images} images of {SYNTHETIC_SHAPE[1]}x{SYNTHETIC_SHAPE[0]})"
                  if self.synthetic else str(self.data))
        return {
            "data": source,
            "settings": {"bundle": self.bundle, "image_size": self.image_size, **self.knobs, "epochs": self.epochs,
                         "batch_size": self.batch_size, "lr": self.lr, "encoder_weights": self.weights,
                         "folds": self.folds, "folds_trained": self.args.folds_to_train,
                         "test_fraction": self.args.test_fraction, "seed": self.args.seed,
                         "device": self.device or "auto"},
            "images": {"training": self.n_train, "test": self.n_test},
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "total_seconds": round(sum(self.seconds.values()), 1),
            "folds": [{"fold": k, **self.val.get(k, {}), "test_dice": self.test.get(f"fold{k}", {}).get("dice")}
                      for k in range(self.args.folds_to_train)],
            "ensemble": {"method": self.ensemble_method, "test_dice": self.test.get("ensemble", {}).get("dice"),
                         "test": self.test.get("ensemble", {})},
            "notes": self.notes,
            "outputs": self.outputs(),
        }

    def print_summary(self, summary: dict) -> None:
        def num(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        s = summary["settings"]
        lines = ["", "=" * 78,
                 f"stas demo: {summary['data']}",
                 f"{self.n_train} training images in {self.folds} folds, {self.n_test} held out as the test split; "
                 f"{s['bundle']}, {s['image_size']} px, {s['epochs']} epochs, batch {s['batch_size']}, "
                 f"{s['encoder_weights']} weights", "",
                 f"{'stage':<10} {'seconds':>8}"]
        lines += [f"{name:<10} {sec:>8.1f}" for name, sec in summary["seconds"].items()]
        lines += [f"{'total':<10} {summary['total_seconds']:>8.1f}", "",
                  f"{'model':<10} {'val Dice':>9} {'test Dice':>10}   (test: {self.n_test} held-out images)"]
        for row in summary["folds"]:
            lines.append(f"{'fold ' + str(row['fold']):<10} {num(row.get('best_val_dice')):>9} "
                         f"{num(row.get('test_dice')):>10}")
        lines.append(f"{'ensemble':<10} {'-':>9} {num(summary['ensemble']['test_dice']):>10}   "
                     f"({summary['ensemble']['method']})")
        lines += ["", "outputs:"]
        width = max(map(len, summary["outputs"]))
        lines += [f"  {k:<{width}}  {v}" for k, v in summary["outputs"].items()]
        lines += [f"note: {n}" for n in summary["notes"]]
        lines.append("=" * 78)
        print("\n".join(lines), flush=True)
