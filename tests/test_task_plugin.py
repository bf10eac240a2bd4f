"""The task seam, proved from outside the package: a fifth task (image-level regression of a number,
tests/plugin_task/) registers itself and runs make-datalist -> build-lmdb -> a 1-epoch run of its own bundle
(MONAI's runner) -> predict -> evaluate through the unchanged stages. Real PNGs, real cache, real timm model."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from plugin_task.regression_task import COLUMN, register_regression

from stas_pipeline import cli
from stas_pipeline.core.datalist import read_datalist
from stas_pipeline.tasks import all_tasks, get_task

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def make_images(folder: Path, n: int = 20) -> Path:
    """``n`` noisy images whose brightness is their label, and ``labels.csv`` (image,label)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        value = float(i) / (n - 1)
        pixels = np.clip(60 + 150 * value + rng.normal(0, 10, (48, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
        rows.append({"image": f"img{i:02d}.png", "label": f"{value:.4f}"})
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "labels.csv"


def test_a_task_from_outside_runs_every_stage(tmp_path):
    task = register_regression()
    assert get_task("regression") is task
    labels = make_images(tmp_path / "data")
    datalist = tmp_path / "datalist.json"
    assert cli.main(["make-datalist", "--labels-csv", str(labels), "--task", "regression", "--folds", "2",
                     "--out", str(datalist)]) == 0
    written = read_datalist(datalist)
    assert (written.task, written.label_kind) == ("regression", "number")
    assert sorted({e["fold"] for e in written.entries("training")}) == [0, 1]

    cache = tmp_path / f"cache_regression_lite0_{SIZE}"
    assert cli.main(["build-lmdb", "--datalist", str(datalist), "--out", str(cache), "--bundle", "regression_lite0",
                     "--image-size", str(SIZE), "--lists", "training", "test", "--no-progress"]) == 0

    train = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
         "tests/plugin_task/regression_lite0.json", "--dataset_dir", str(tmp_path), "--image_size", str(SIZE),
         "--epochs", "1", "--batch_size", "8", "--encoder_weights", "none", "--device", "cpu", "--amp", "false",
         "--num_workers", "0", "--output_dir", str(tmp_path / "runs")],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = tmp_path / "runs" / "regression_lite0" / "fold0"
    info = json.loads((run_dir / "best.json").read_text())
    assert info["task"] == "regression" and math.isfinite(info["val_neg_mae"])

    predictions = tmp_path / "test.csv"
    assert cli.main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--datalist", str(datalist),
                     "--out", str(predictions)]) == 0
    with open(predictions, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(math.isfinite(float(r[COLUMN])) for r in rows)

    assert cli.main(["evaluate", "--predictions", str(predictions), "--datalist", str(datalist),
                     "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["count"] == 4 and metrics["mae"] >= 0 and metrics["rmse"] >= metrics["mae"]


def test_the_stages_compare_with_no_task_name():
    """No stage compares with a task name or knows the test task: the task comes from the registry."""
    names = "|".join(["regression", *all_tasks()])
    comparison = re.compile(rf"""(==|!=|\bin)\s*[(\[{{]?\s*["']({names})["']|["']({names})["']\s*(==|!=|\bin\b)""")
    for path in (REPO / "stas_pipeline" / "stages").glob("*.py"):
        text = path.read_text()
        assert "regression" not in text and not comparison.search(text), f"{path.name} compares with a task name"
