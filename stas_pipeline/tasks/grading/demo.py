"""``stas demo --task grading``: the diabetic-retinopathy grading recipe end to end, each step the stage a user
would run, on an embedded synthetic set (:func:`stas_pipeline.core.synthetic.make_graded_fundus_dataset`: the
cup-to-disc ratio grows with the grade 0-4, grades skewed towards 0, two images per patient):

labels CSV -> ``stas make-datalist`` (inner test split + k folds stratified by grade, grouped by patient) ->
``stas build-lmdb`` -> every fold of ``grading_lite0`` trained once per head (regression, cumulative,
expectation) through MONAI's entry point -> ``stas predict`` per head (fold mean on the inner test, out of fold
on the rest) -> ``stas evaluate`` per head (kappa; on out-of-fold scores the cut points searched with the guard)
-> ``stas ensemble`` of the three heads on the inner test (mean of scores, label average and scaled average with
each head's cut points) -> ``stas evaluate`` of each ensemble. Everything lands in ``OUT``::

    data/images, data/labels.csv                datalist.json, cache_grading_lite0_<size>/
    runs/<head>/grading_lite0/fold<k>/          runs/<head>/eval_{test,oof}/ (metrics, confusion.png, cuts)
    predictions/<head>_{test,oof}.csv           predictions/ensemble_<method>.csv, runs/ensemble_<method>/
    summary.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stas_pipeline.core.demo_runner import three_decimals
from stas_pipeline.core.synthetic import make_graded_fundus_dataset
from stas_pipeline.tasks.classification.demo import ClassificationDemo

BUNDLE = "grading_lite0"
HEADS = ("regression", "cumulative", "expectation")
METHODS = ("mean", "label-average", "scaled-average")
STAGE_NAMES = ("data", "datalist", "cache", "train", "predict", "evaluate", "ensemble")


class GradingDemo(ClassificationDemo):
    """The grading demo: the classification demo's settings and stage runner, three heads instead of rounds."""

    STAGE_NAMES = STAGE_NAMES
    BUNDLE = BUNDLE
    N_IMAGES = 120

    def head_root(self, head: str) -> Path:
        return self.out / "runs" / head / BUNDLE

    def stage_data(self) -> None:
        make_graded_fundus_dataset(self.data, n=self.n_images, size=128, seed=self.args.seed)
        print(f"drew {self.n_images} graded synthetic fundus-like 128x128 images into {self.data}")

    def stage_datalist(self) -> None:
        self.stage("make-datalist", ["--labels-csv", str(self.data / "labels.csv"), "--out", str(self.datalist(0)),
                                     "--classes", "0", "1", "2", "3", "4", "--folds", str(self.folds),
                                     "--test-fraction", str(self.args.test_fraction), "--seed", str(self.args.seed)])

    def stage_train(self) -> None:
        for head in HEADS:
            self.train_folds(BUNDLE, self.datalist(0), self.head_root(head), head, head=head)

    def stage_predict(self) -> None:
        for head in HEADS:
            checkpoints = [str(self.head_root(head) / f"fold{k}" / "best.pt") for k in range(self.folds)]
            common = ["--checkpoint", *checkpoints, "--datalist", str(self.datalist(0)), "--tta", "hv",
                      "--batch-size", "16", "--workers", "0"]
            self.stage("predict", [*common, "--out", str(self.predictions / f"{head}_test.csv")])
            self.stage("predict", [*common, "--out-of-fold", "--out", str(self.predictions / f"{head}_oof.csv")])

    def _evaluate_predictions(self, name: str, csv_name: str, section: str) -> None:
        out = self.out / "runs" / name
        self.stage("evaluate", ["--predictions", str(self.predictions / csv_name), "--datalist",
                                str(self.datalist(0)), "--section", section, "--out", str(out)])
        self.scores[name] = json.loads((out / "metrics.json").read_text())

    def stage_evaluate(self) -> None:
        for head in HEADS:
            self._evaluate_predictions(f"{head}/eval_oof", f"{head}_oof.csv", "training")
            self._evaluate_predictions(f"{head}/eval_test", f"{head}_test.csv", "test")

    def stage_ensemble(self) -> None:
        tests = [str(self.predictions / f"{head}_test.csv") for head in HEADS]
        cuts = [str(self.out / "runs" / head / "eval_oof" / "cut_points.json") for head in HEADS]
        for method in METHODS:
            out = self.predictions / f"ensemble_{method}.csv"
            self.stage("ensemble", [*tests, "--method", method, "--out", str(out),
                                    *(["--member-cuts", *cuts] if method != "mean" else [])])
            self._evaluate_predictions(f"ensemble_{method}", out.name, "test")

    def summary(self) -> dict:
        def kappa(name: str) -> float | None:
            return self.scores.get(name, {}).get("kappa")

        return {
            "task": "grading",
            "settings": {"bundle": BUNDLE, "image_size": self.image_size, "epochs": self.epochs,
                         "batch_size": self.batch_size, "lr": self.lr, "folds": self.folds,
                         "images": self.n_images, "encoder_weights": self.weights, "seed": self.args.seed},
            "heads": {head: {"oof_kappa": kappa(f"{head}/eval_oof"),
                             "oof_kappa_searched_cuts": self.scores.get(f"{head}/eval_oof", {})
                             .get("with_cut_points", {}).get("kappa"),
                             "cuts_adopted": self.scores.get(f"{head}/eval_oof", {}).get("cut_points", {})
                             .get("adopted"),
                             "test_kappa": kappa(f"{head}/eval_test")} for head in HEADS},
            "ensembles": {method: kappa(f"ensemble_{method}") for method in METHODS},
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "outputs": {"runs": str(self.out / "runs"), "predictions": str(self.predictions)},
        }

    def print_summary(self, summary: dict) -> None:
        lines = ["", "=" * 78, f"stas demo --task grading: {BUNDLE}, {self.image_size} px, {self.epochs} epochs, "
                 f"{self.folds} folds, {self.n_images} synthetic images", "-" * 78,
                 f"{'head':<14}{'OOF kappa':>11}{'(searched cuts)':>17}{'inner-test kappa':>19}"]
        for head, row in summary["heads"].items():
            searched = "-" if row["oof_kappa_searched_cuts"] is None else (
                f"{row['oof_kappa_searched_cuts']:.3f} {'adopted' if row['cuts_adopted'] else 'kept'}")
            lines.append(f"{head:<14}{three_decimals(row['oof_kappa']):>11}{searched:>17}{three_decimals(row['test_kappa']):>19}")
        for method, value in summary["ensembles"].items():
            lines.append(f"{'ensemble ' + method:<42}{three_decimals(value):>19}")
        lines += ["-" * 78, "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()),
                  "=" * 78]
        print("\n".join(lines), file=sys.stdout, flush=True)

