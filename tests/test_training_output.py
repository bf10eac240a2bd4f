"""What a terminal shows of a training run: a progress bar per epoch and one line per validation with the metric
and the best so far; the per-iteration lines only with STAS_DEBUG=1. A real 2-epoch run of MONAI's runner."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stas_pipeline.core.datalist import write_datalist
from stas_pipeline.core.splits import Split
from stas_pipeline.core.synthetic import make_dataset
from stas_pipeline.stages import build_lmdb
from stas_pipeline.tasks.segmentation.datalist import make_datalist

REPO = Path(__file__).resolve().parents[1]
EPOCH_LINE = re.compile(r"^epoch (\d)/2  loss \d\.\d{4}  val_dice \d\.\d{4}  best \d\.\d{4} \(epoch \d\)  \d+\.\d s$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 synthetic images in 2 folds, cached at 64 px for deeplab_lite0."""
    root = tmp_path_factory.mktemp("output")
    images, masks = make_dataset(root, n=6, height=48, width=64)
    write_datalist(root / "datalist.json", make_datalist(images, masks, root, Split(folds=2, seed=0)),
                   "segmentation", "mask")
    assert build_lmdb.main(["--datalist", str(root / "datalist.json"), "--out", str(root / "cache_64"),
                            "--bundle", "deeplab_lite0", "--image-size", "64", "--no-progress"]) == 0
    return root


def train(dataset: Path, out: Path, debug: bool = False) -> str:
    env = {**os.environ, "STAS_DEBUG": "1" if debug else ""}
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundles/deeplab_lite0.json",
         "--dataset_dir", str(dataset), "--datalist", str(dataset / "datalist.json"), "--image_size", "64",
         "--epochs", "2", "--batch_size", "2", "--encoder_weights", "none", "--device", "cpu", "--amp", "false",
         "--num_workers", "0", "--output_dir", str(out)],
        cwd=REPO, capture_output=True, env=env, check=True)
    return (done.stdout + done.stderr).decode()  # bytes: text mode would turn tqdm's \r redraws into lines


def test_a_run_prints_a_bar_and_a_line_per_epoch_not_per_iteration(dataset, tmp_path):
    lines = train(dataset, tmp_path).split("\n")  # as a terminal (and wc -l) counts them: tqdm redraws with \r
    assert [int(m.group(1)) for m in map(EPOCH_LINE.match, lines) if m] == [1, 2]
    assert not [line for line in lines if "Iter:" in line or " - INFO - Epoch" in line or "new best" in line]
    bars = [line for line in lines if re.search(r"train \[\d/2\]: \[(\d)/\1\] 100%", line)]
    assert len(bars) == 2 and all("loss=" in bar and "it/s" in bar for bar in bars)
    assert len(lines) < 30, "\n".join(lines)


def test_debug_shows_every_iteration(dataset, tmp_path):
    text = train(dataset, tmp_path, debug=True)
    assert len(re.findall(r"Epoch: \d/2, Iter: 1/\d -- train_loss", text)) == 2
    assert "Got new best metric of val_dice" in text
