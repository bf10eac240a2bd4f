"""Tiny runs for tests: synthetic STAS-like (segmentation) or fundus-like (image-level) images, their datalist and
LMDB cache made by the stages, then a bundle trained by MONAI's own runner from the repository root (as the card's
command runs it)."""

from __future__ import annotations

import os
from pathlib import Path

from monai.bundle import run

from stas_pipeline import cli
from stas_pipeline.core.synthetic import make_dataset, make_fundus_dataset

REPO = Path(__file__).resolve().parents[1]


def prepare(root: Path, bundle: str = "deeplab_lite0", n: int = 8, image_size: int = 32) -> None:
    """``root/data`` (``n`` synthetic images and masks), ``root/datalist.json`` (2 folds), ``root/cache``."""
    images, masks = make_dataset(root / "data", n=n, height=48, width=64)
    assert cli.main(["make-datalist", "--images", str(images), "--masks", str(masks), "--folds", "2",
                     "--out", str(root / "datalist.json")]) == 0
    assert cli.main(["build-lmdb", "--datalist", str(root / "datalist.json"), "--out", str(root / "cache"),
                     "--bundle", bundle, "--image-size", str(image_size), "--no-progress"]) == 0


def prepare_fundus(root: Path, bundle: str = "fundus_lite0", n: int = 30, size: int = 64, seed: int = 0,
                   image_size: int = 32, split: tuple[str, ...] = (), lists: tuple[str, ...] = ("training",)) -> None:
    """``root/data`` (``n`` fundus-like images of ``size`` px, ``data/labels.csv``: labels 0/1, or for a grading
    ``bundle`` grades 0-4, two images per patient sharing one), ``root/datalist.json`` (2 folds, ``split``: more
    make-datalist options) and ``root/cache`` (``lists`` of it at ``image_size`` for ``bundle``)."""
    labels = make_fundus_dataset(root / "data", n=n, size=size, seed=seed)
    if bundle.startswith("grading"):
        lines = labels.read_text().splitlines()
        labels.write_text("\n".join([lines[0]] + [f"{row.rsplit(',', 2)[0]},{(i // 2) % 5},{row.rsplit(',', 1)[1]}"
                                                  for i, row in enumerate(lines[1:])]) + "\n")
    assert cli.main(["make-datalist", "--labels-csv", str(labels), "--folds", "2", *split,
                     "--out", str(root / "datalist.json")]) == 0
    assert cli.main(["build-lmdb", "--datalist", str(root / "datalist.json"), "--out", str(root / "cache"),
                     "--bundle", bundle, "--image-size", str(image_size), "--lists", *lists, "--no-progress"]) == 0


def train(root: Path, bundle: str = "deeplab_lite0", run_ids: tuple[str, ...] = ("training",),
          **overrides: object) -> Path:
    """``bundle`` trained on ``root``'s datalist and cache (fold 0, 1 epoch at 32 px, batch 4, no weights, CPU, into
    ``root/runs``, unless ``overrides`` say otherwise), then its other ``run_ids``: its
    ``<output_dir>/<bundle>/fold<fold>`` folder."""
    settings = {"dataset_dir": str(root), "datalist": str(root / "datalist.json"), "cache_dir": str(root / "cache"),
                "image_size": 32, "epochs": 1, "batch_size": 4, "encoder_weights": "none", "device": "cpu",
                "amp": False, "num_workers": 0, "output_dir": str(root / "runs"), **overrides}
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        for run_id in run_ids:
            run(run_id=run_id, config_file=f"bundles/{bundle}.json", **settings)
    finally:
        os.chdir(cwd)
    return Path(settings["output_dir"]) / bundle / f"fold{settings.get('fold', 0)}"
