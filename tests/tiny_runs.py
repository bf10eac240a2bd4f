"""Tiny segmentation runs for tests: synthetic STAS-like images, their datalist and LMDB cache made by the stages,
then a bundle trained by MONAI's own runner from the repository root (as the card's command runs it)."""

from __future__ import annotations

import os
from pathlib import Path

from monai.bundle import run

from stas_pipeline import cli
from stas_pipeline.core.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]


def prepare(root: Path, bundle: str = "deeplab_lite0", n: int = 8, image_size: int = 32) -> None:
    """``root/data`` (``n`` synthetic images and masks), ``root/datalist.json`` (2 folds), ``root/cache``."""
    images, masks = make_dataset(root / "data", n=n, height=48, width=64)
    assert cli.main(["make-datalist", "--images", str(images), "--masks", str(masks), "--folds", "2",
                     "--out", str(root / "datalist.json")]) == 0
    assert cli.main(["build-lmdb", "--datalist", str(root / "datalist.json"), "--out", str(root / "cache"),
                     "--bundle", bundle, "--image-size", str(image_size), "--no-progress"]) == 0


def train(root: Path, bundle: str = "deeplab_lite0", **overrides: object) -> Path:
    """``bundle`` trained on ``root``'s datalist and cache (1 epoch at 32 px, batch 4, no weights, CPU, unless
    ``overrides`` say otherwise): its ``runs/<bundle>/fold0`` folder."""
    settings = {"dataset_dir": str(root), "datalist": str(root / "datalist.json"), "cache_dir": str(root / "cache"),
                "image_size": 32, "epochs": 1, "batch_size": 4, "encoder_weights": "none", "device": "cpu",
                "amp": False, "num_workers": 0, "output_dir": str(root / "runs"), **overrides}
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        run(run_id="training", config_file=f"bundles/{bundle}.json", **settings)
    finally:
        os.chdir(cwd)
    return root / "runs" / bundle / "fold0"
