"""``stas demo --task classification``: the glaucoma recipe end to end, each step the stage a user would run.

On an embedded synthetic fundus-like set (:func:`stas_pipeline.core.synthetic.make_fundus_dataset`: black
borders, vessels, an optic disc whose cup is larger in the positive class, two images per patient):

labels CSV -> ``stas make-datalist`` (inner test split + k folds grouped by patient) -> ``stas build-lmdb``
(the bundle's declared fundus chain) -> training of every fold of ``fundus_lite0`` through MONAI's entry point
-> ``stas predict`` (fold mean with flip TTA on the inner test; out-of-fold on the training pool) ->
``stas evaluate`` (AUC, sensitivity/specificity, ROC curve, worst images) -> ``stas pseudo-label`` (one round:
confident fold-mean predictions on a set of unlabelled images join every fold's training part) -> the cache
refreshed and the folds trained again on round 1 -> ``stas experiments`` (one row per run). The inner test is
never pseudo-labelled, so both rounds' inner-test AUCs are clean. Everything lands in ``OUT`` (default
``demo_output``)::

    data/images, data/labels.csv      the synthetic set          datalist.json, datalist_round1.json
    data/unlabelled/images/           images without labels     predictions/round0_unlabelled.csv
    cache_fundus_lite0_<size>/        LMDB cache                 runs/round<r>/fundus_lite0/fold<k>/
    predictions/round<r>_{test,oof}.csv                          runs/round<r>/fundus_lite0/eval_{test,oof}/
    experiments.md, experiments.csv, summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stas_pipeline.core.datalist import read_datalist
from stas_pipeline.core.demo_runner import FoldTrainingDemo, three_decimals
from stas_pipeline.core.synthetic import make_fundus_dataset
from stas_pipeline.tasks.classification.task import DEMO_DEFAULTS

BUNDLE = "fundus_lite0"
STAGE_NAMES = ("data", "datalist", "cache", "train", "predict", "evaluate", "pseudo_label", "train_round1",
               "predict_round1", "evaluate_round1", "experiments")
PSEUDO_HIGH, PSEUDO_LOW = 0.85, 0.08


class ClassificationDemo(FoldTrainingDemo):
    """The classification demo's state: settings, output paths, timings and scores."""

    STAGE_NAMES = STAGE_NAMES
    BUNDLE = BUNDLE
    N_IMAGES = 96  # default number of synthetic images
    DEFAULTS = DEMO_DEFAULTS

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.unlabelled = self.data / "unlabelled"
        self.n_unlabelled = max(8, self.n_images // 3)

    def datalist(self, round_: int) -> Path:
        return self.out / ("datalist.json" if round_ == 0 else f"datalist_round{round_}.json")

    def run_root(self, round_: int) -> Path:
        return self.out / "runs" / f"round{round_}" / self.BUNDLE

    # --- stages --------------------------------------------------------------------------------------------

    def stage_data(self) -> None:
        make_fundus_dataset(self.data, n=self.n_images, size=128, seed=self.args.seed)
        make_fundus_dataset(self.unlabelled, n=self.n_unlabelled, size=128, seed=self.args.seed + 1)
        (self.unlabelled / "labels.csv").unlink()  # these stay unlabelled: only pseudo labels will name them
        print(f"drew {self.n_images} labelled and {self.n_unlabelled} unlabelled synthetic fundus-like 128x128 "
              f"images into {self.data}")

    def stage_datalist(self) -> None:
        self.stage("make-datalist", ["--labels-csv", str(self.data / "labels.csv"), "--out", str(self.datalist(0)),
                                     "--folds", str(self.folds), "--test-fraction", str(self.args.test_fraction),
                                     "--seed", str(self.args.seed)])

    def stage_cache(self) -> None:
        self._cache(0)

    def _cache(self, round_: int) -> None:
        """The bundle's cache, built (round 0) or refreshed for a round's new entries (reused where unchanged)."""
        self.stage("build-lmdb", ["--datalist", str(self.datalist(round_)), "--out", str(self.cache), "--bundle",
                                  self.BUNDLE, "--image-size", str(self.image_size), "--lists", "training", "test"])

    def _train(self, round_: int) -> None:
        self.train_folds(self.BUNDLE, self.datalist(round_), self.run_root(round_), f"round {round_}")

    def _predict(self, round_: int) -> None:
        checkpoints = [str(self.run_root(round_) / f"fold{k}" / "best.pt") for k in range(self.folds)]
        common = ["--checkpoint", *checkpoints, "--datalist", str(self.datalist(round_)), "--tta", "hv",
                  "--batch-size", "16", "--workers", "0"]
        self.stage("predict", [*common, "--out", str(self.predictions / f"round{round_}_test.csv")])
        self.stage("predict", [*common, "--out-of-fold", "--out", str(self.predictions / f"round{round_}_oof.csv")])

    def _evaluate(self, round_: int) -> None:
        for split, section in (("test", "test"), ("oof", "training")):
            out = self.run_root(round_) / f"eval_{split}"
            self.stage("evaluate", ["--predictions", str(self.predictions / f"round{round_}_{split}.csv"),
                                    "--datalist", str(self.datalist(round_)), "--section", section,
                                    "--out", str(out), "--worst", "6"])
            self.scores[f"round{round_}_{split}"] = json.loads((out / "metrics.json").read_text())

    def stage_train(self) -> None:
        self._train(0)

    def stage_predict(self) -> None:
        self._predict(0)
        checkpoints = [str(self.run_root(0) / f"fold{k}" / "best.pt") for k in range(self.folds)]
        self.stage("predict", ["--checkpoint", *checkpoints, "--images", str(self.unlabelled / "images"),
                               "--tta", "hv", "--batch-size", "16", "--workers", "0",
                               "--out", str(self.predictions / "round0_unlabelled.csv")])

    def stage_evaluate(self) -> None:
        self._evaluate(0)

    def stage_pseudo_label(self) -> None:
        # the bundle's label smoothing (0.1) trains towards 0.9 and 0.05, so its most confident predictions sit
        # near those, never past the recipe's 0.98 / 0.02: the thresholds are set inside them
        self.stage("pseudo-label", ["--datalist", str(self.datalist(0)), "--predictions",
                                    str(self.predictions / "round0_unlabelled.csv"), "--out", str(self.datalist(1)),
                                    "--runs", str(self.run_root(0)), "--high", str(PSEUDO_HIGH),
                                    "--low", str(PSEUDO_LOW)])

    def stage_train_round1(self) -> None:
        self._cache(1)
        self._train(1)

    def stage_predict_round1(self) -> None:
        self._predict(1)

    def stage_evaluate_round1(self) -> None:
        self._evaluate(1)

    def stage_experiments(self) -> None:
        self.stage("experiments", [str(self.out / "runs"), "--out", str(self.out / "experiments.md"),
                                   "--csv", str(self.out / "experiments.csv")])

    # --- summary -------------------------------------------------------------------------------------------

    def summary(self) -> dict:
        rounds = read_datalist(self.datalist(1)).get("pseudo_rounds", []) if self.datalist(1).is_file() else []
        return {
            "task": "classification",
            "settings": {"bundle": self.BUNDLE, "image_size": self.image_size, "epochs": self.epochs,
                         "batch_size": self.batch_size, "lr": self.lr, "folds": self.folds,
                         "images": self.n_images, "encoder_weights": self.weights, "seed": self.args.seed},
            "auc": {name: scores.get("auc") for name, scores in self.scores.items()},
            "pseudo_labels": {k: rounds[-1][k] for k in ("added", "positives", "negatives", "uncertain")}
            if rounds else None,
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "outputs": {"experiments": str(self.out / "experiments.md"), "runs": str(self.out / "runs"),
                        "predictions": str(self.predictions)},
        }

    def print_summary(self, summary: dict) -> None:
        lines = ["", "=" * 78, f"stas demo --task classification: {self.BUNDLE}, {self.image_size} px, {self.epochs} "
                 f"epochs, {self.folds} folds, {self.n_images} synthetic images", "-" * 78,
                 f"{'round':<8}{'out-of-fold AUC':>18}{'inner-test AUC (fold mean)':>30}"]
        for round_ in (0, 1):
            oof, test = (summary["auc"].get(f"round{round_}_{s}") for s in ("oof", "test"))
            lines.append(f"{round_:<8}{three_decimals(oof):>18}{three_decimals(test):>30}")
        pseudo = summary["pseudo_labels"]
        if pseudo:
            lines.append(f"round 1 pseudo labels from {self.n_unlabelled} unlabelled images: {pseudo['added']} added "
                         f"({pseudo['positives']} positive, {pseudo['negatives']} negative), {pseudo['uncertain']} "
                         f"left out as uncertain (p between {PSEUDO_LOW} and {PSEUDO_HIGH})")
        lines += ["-" * 78, "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()),
                  f"experiments table: {self.out / 'experiments.md'}", "=" * 78]
        print("\n".join(lines), file=sys.stdout, flush=True)

