"""The package as a user installs it: a wheel built from this clone, installed (not editable) into a fresh
virtualenv, used from a folder outside the clone: make-datalist, build-lmdb, a 1-epoch bundle run through MONAI's
runner (the bundle written by ``stas bundle``) and predict. The fresh virtualenv borrows the test environment's
dependencies (torch, MONAI...) through a ``.pth`` line, so nothing is downloaded; stas_pipeline itself comes
only from the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from stas_pipeline.core.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]


def sh(*argv: str | Path, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"{' '.join(map(str, argv))}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel of this clone installed: its bin folder."""
    root = tmp_path_factory.mktemp("wheel")
    sh(sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist",
       cwd=root)
    (wheel,) = (root / "dist").glob("stas_pipeline-*.whl")
    sh(sys.executable, "-m", "venv", "--without-pip", root / "venv", cwd=root)
    venv_python = root / "venv" / "bin" / "python"
    site = Path(sh(venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root).strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, MONAI, ...: not stas
    sh(sys.executable, "-m", "pip", "--python", venv_python, "install", "--no-deps", "-q", wheel, cwd=root)
    return root / "venv" / "bin"


def test_the_installed_wheel_runs_the_pipeline_outside_the_clone(installed, tmp_path):
    work = tmp_path / "work"
    images, masks = make_dataset(work / "data", n=8, height=48, width=64)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("PYTHONPATH", None)
    where = sh(installed / "python", "-c", "import stas_pipeline; print(stas_pipeline.__file__)", cwd=work, env=env)
    assert str(installed.parent) in where and str(REPO) not in where

    stas = installed / "stas"
    sh(stas, "make-datalist", "--images", images, "--masks", masks, "--folds", "2", "--out", "datalist.json",
       cwd=work, env=env)
    sh(stas, "build-lmdb", "--datalist", "datalist.json", "--out", "cache", "--bundle", "deeplab_lite0",
       "--image-size", "32", "--no-progress", cwd=work, env=env)
    sh(stas, "bundle", "deeplab_lite0", "--out", "configs/deeplab_lite0.json", cwd=work, env=env)
    sh(installed / "python", "-m", "monai.bundle", "run", "training", "--config_file", "configs/deeplab_lite0.json",
       "--dataset_dir", ".", "--cache_dir", "cache", "--image_size", "32", "--epochs", "1", "--batch_size", "2",
       "--encoder_weights", "none", "--device", "cpu", "--amp", "false", "--num_workers", "0",
       "--output_dir", "runs", cwd=work, env=env)
    run_dir = work / "runs" / "deeplab_lite0" / "fold0"
    assert json.loads((run_dir / "config.json").read_text())["bundle_name"] == "deeplab_lite0"
    sh(stas, "predict", "--checkpoint", run_dir / "best.pt", "--images", images, "--out", "preds", "--workers", "0",
       cwd=work, env=env)
    assert sorted(p.name for p in (work / "preds").iterdir()) == sorted(f"{p.stem}.png" for p in images.iterdir())
