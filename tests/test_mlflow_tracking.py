"""Experiment tracking the bundle way: MONAI's ``--tracking`` with the package's settings file
(``bundles/mlflow.json``) attaches MLflow handlers to this workflow's trainer and validator of a bundle written by
``stas bundle`` (MONAI patches the handlers in before it expands macros, so the bundle must have none); a 2-epoch
run leaves a real local MLflow store (SQLite, as MLflow 3.13+ wants) holding its parameters, per-epoch metrics
and the best checkpoint, read back with MLflow's own client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stas_pipeline import cli
from stas_pipeline.core.synthetic import make_fundus_dataset

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra (pip install .[mlflow]) is not installed")
REPO = Path(__file__).resolve().parents[1]


def test_a_tracked_run_leaves_its_params_metrics_and_checkpoint_in_mlflow(tmp_path):
    make_fundus_dataset(tmp_path / "data", n=24, size=48, seed=1)
    assert cli.main(["make-datalist", "--labels-csv", str(tmp_path / "data" / "labels.csv"), "--folds", "2",
                     "--out", str(tmp_path / "datalist.json")]) == 0
    assert cli.main(["build-lmdb", "--datalist", str(tmp_path / "datalist.json"), "--out", str(tmp_path / "cache"),
                     "--bundle", "fundus_lite0", "--image-size", "32", "--no-progress"]) == 0
    assert cli.main(["bundle", "fundus_lite0", "--out", str(tmp_path / "configs" / "fundus_lite0.json")]) == 0
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
         str(tmp_path / "configs" / "fundus_lite0.json"), "--tracking", str(REPO / "bundles" / "mlflow.json"),
         "--dataset_dir", str(tmp_path), "--datalist",
         str(tmp_path / "datalist.json"), "--cache_dir", str(tmp_path / "cache"), "--image_size", "32",
         "--epochs", "2", "--batch_size", "8", "--encoder_weights", "none", "--device", "cpu", "--amp", "false",
         "--num_workers", "0", "--output_dir", str(tmp_path / "runs")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    store = tmp_path / "runs" / "mlruns.db"
    assert store.is_file()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("fundus_lite0")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "fold0" and run.info.status == "FINISHED"
    assert run.data.params["bundle"] == "fundus_lite0" and run.data.params["image_size"] == "32"
    assert run.data.params["lr"] == "0.001" and "tf_efficientnet_lite0" in run.data.params["network"]
    losses = client.get_metric_history(run.info.run_id, "epoch_loss")
    aucs = client.get_metric_history(run.info.run_id, "val_auc")
    assert [m.step for m in losses] == [1, 2] and len(aucs) == 2
    best = json.loads((tmp_path / "runs" / "fundus_lite0" / "fold0" / "best.json").read_text())
    assert any(m.value == pytest.approx(best["val_auc"]) for m in aucs)
    history = json.loads((tmp_path / "runs" / "fundus_lite0" / "fold0" / "metrics.json").read_text())["history"]
    assert [m.value for m in losses] == pytest.approx([row["loss"] for row in history])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best.pt", "best.json", "config.json", "metrics.json"} <= artifacts
