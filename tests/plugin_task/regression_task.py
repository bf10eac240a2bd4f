"""A fifth task that plugs into the stages from outside the package: image-level regression of a number.

It proves the seam (tasks/base.py): registered by name, it runs make-datalist -> build-lmdb -> its bundle
(``tests/plugin_task/regression_lite0.json``, trained by MONAI's runner) -> predict -> evaluate with no edit
under ``stas_pipeline/stages``. It reuses library parts (the labels CSV reader, the fold splitter, the
image-level inference and predictions CSV) and adds its own: the label kind, an MSE loss, a metric (negative
mean absolute error: higher is better, as the checkpoint keeper expects), its predictions CSV column ``value``,
and an evaluation (MAE, RMSE, Pearson r).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.metrics import EpochMetric

from stas_pipeline.core.datalist import number_of, read_datalist
from stas_pipeline.core.fileio import write_json
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.splits import assign_folds
from stas_pipeline.core.trained_runs import load_trained_run
from stas_pipeline.tasks.base import Predictor, Task, register
from stas_pipeline.tasks.classification.inference import predict_scores

COLUMN = "value"


class FirstOutputMSE(torch.nn.Module):
    """Mean squared error of the network's first output against the number."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(pred.float().reshape(pred.shape[0], -1)[:, 0], target.float().reshape(-1))


def _neg_mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    return -float((pred.float().reshape(pred.shape[0], -1)[:, 0] - target.float().reshape(-1)).abs().mean())


def negative_mae(output_transform) -> EpochMetric:
    """The validation metric: minus the mean absolute error over the whole validation fold."""
    return EpochMetric(_neg_mae, output_transform=output_transform, check_compute_fn=False)


def first_output(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().reshape(logits.shape[0], -1)[:, 0]


class RegressionTask(Task):
    name = "regression"
    description = "a number per image (test task: MSE, MAE)"
    label_kind = "number"
    image_level = True
    evaluate_options = ("predictions",)
    bundle_dir = Path(__file__).parent

    def make_datalist(self, args: argparse.Namespace, problems: Problems) -> dict:
        """``image,label`` rows of the first labels CSV (images relative to it), in ``--folds`` folds by seed."""
        source = Path(args.labels_csv[0].path)
        with open(source, newline="") as handle:
            rows = list(csv.DictReader(handle))
        base = Path(args.out).resolve().parent
        entries = [{"image": str((source.parent / r["image"]).resolve().relative_to(base)),
                    "label": float(r["label"])} for r in rows]
        strata = [int(e["label"] > np.median([x["label"] for x in entries])) for e in entries]
        for entry, fold in zip(entries, assign_folds(strata, args.folds, args.seed), strict=True):
            entry["fold"] = fold
            problems.count("labelled")
        return {"training": entries, "test": [{"image": e["image"]} for e in entries[:4]]}

    def predictor(self, args: argparse.Namespace, infos: list[dict]) -> tuple[list[Path], Predictor]:
        runs = []
        for checkpoint, info in zip(args.checkpoint, infos, strict=True):
            run = load_trained_run(checkpoint, info, args.device)
            run.score = first_output
            runs.append(run)
        images = [Path(e["image"]) for e in read_datalist(args.datalist).entries("test")]

        def predict(chosen: Sequence[Path], estimating: bool) -> Problems:
            return predict_scores(runs, chosen, None if estimating else args.out, "none", args.batch_size,
                                  0, False, args.overwrite, value=COLUMN)[0]

        return images, predict

    def reads_predictions(self, path: Path) -> bool:
        if path.suffix.lower() != ".csv" or not path.is_file():
            return False
        with open(path, newline="") as handle:
            return COLUMN in (next(csv.reader(handle), None) or [])

    def evaluate(self, args: argparse.Namespace) -> Problems:
        """MAE, RMSE and Pearson r of the CSV's ``value`` against the datalist's numbers, into ``--out``."""
        problems = Problems("evaluate")
        datalist = read_datalist(args.datalist)
        truth = {str(Path(e["image"]).resolve()): number_of(e) for s in ("training", "test")
                 for e in datalist.entries(s) if number_of(e) is not None}
        pairs = []
        with open(args.predictions, newline="") as handle:
            for row in csv.DictReader(handle):
                key = str(Path(row["image"]).resolve())
                if key in truth:
                    pairs.append((float(row[COLUMN]), truth[key]))
                else:
                    problems.skip(row["image"], "no numeric label in the datalist")
        pred, ref = np.array(pairs).T
        metrics = {"count": len(pairs), "mae": float(np.abs(pred - ref).mean()),
                   "rmse": math.sqrt(float(((pred - ref) ** 2).mean())),
                   "pearson_r": float(np.corrcoef(pred, ref)[0, 1]) if len(pairs) > 1 else None}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "metrics.json", metrics, overwrite=True)
        print(json.dumps(metrics))
        problems.count("scored", len(pairs))
        return problems


def register_regression() -> Task:
    """Register the task (and with it the folder of its bundle)."""
    return register(RegressionTask)
