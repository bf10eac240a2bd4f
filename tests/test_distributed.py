"""Multi-process training with torchrun (gloo on CPU), the MONAI model-zoo way: a second config file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import run

REPO = Path(__file__).resolve().parents[1]


def test_three_process_run_writes_once_and_scores_like_one_process(synthetic_dataset, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    overrides = ["--dataset_dir", str(synthetic_dataset), "--image_size", "64", "--epochs", "2",
                 "--batch_size", "4", "--encoder_weights", "none", "--device", "cpu", "--amp", "false",
                 "--num_workers", "0", "--output_dir", str(tmp_path)]
    # --standalone: torchrun picks a free port (a fixed one can still be held by an earlier run's socket)
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=3", "-m", "monai.bundle", "run",
                           "training", "--config_file", "['bundles/deeplab_lite0.json','bundles/multi_gpu.json']",
                           *overrides], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "deeplab_lite0" / "fold0"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "best.json", "best.pt", "config.json", "curves.png", "last.pt", "metrics.json", "tensorboard"]
    writers = {p.name.split(".")[-2] for p in (run_dir / "tensorboard").iterdir()}  # events...<host>.<pid>.<n>
    assert len(writers) == 1, "only rank 0 writes TensorBoard logs"
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    best = json.loads((run_dir / "best.json").read_text())

    cwd = os.getcwd()
    os.chdir(REPO)
    try:  # one process, same checkpoint and fold: 8 images split 3+3+2 over ranks, each counted once
        run(run_id="evaluating", config_file="bundles/deeplab_lite0.json", dataset_dir=str(synthetic_dataset),
            image_size=64, encoder_weights="none", device="cpu", amp=False, num_workers=0, output_dir=str(tmp_path))
    finally:
        os.chdir(cwd)
    single = json.loads((run_dir / "eval.json").read_text())
    assert single["images"] == 8
    assert single["val_dice"] == pytest.approx(best["val_dice"], abs=1e-6)
