"""A trained run stands alone: training writes the bundle run's resolved configuration (``config.json``) beside
its checkpoints, and prediction rebuilds the run's chain from it, whatever the bundle file says afterwards and
wherever the run folder and the working directory are. Bundles resolve from the package, not the working
directory (``stas bundle``). Real MONAI runner, real Lite0 DeepLabV3+ (no weights), real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import run

from stas_pipeline import cli
from stas_pipeline.core.bundles import add_bundle_dir, parsed_content, resolved_config
from stas_pipeline.core.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]


def macros(config: object) -> list[str]:
    """Every ``%file#id`` macro left in a configuration."""
    if isinstance(config, dict):
        return [m for v in config.values() for m in macros(v)]
    if isinstance(config, list):
        return [m for v in config for m in macros(v)]
    return [config] if isinstance(config, str) and config.startswith("%") else []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``probe_lite0``: deeplab_lite0 under another name in a folder of its own, trained one epoch at 32 px."""
    root = tmp_path_factory.mktemp("standalone")
    images, masks = make_dataset(root / "data", n=8, height=48, width=64)
    bundles = root / "bundles"
    bundles.mkdir()
    config = json.loads((REPO / "bundles" / "deeplab_lite0.json").read_text())
    (bundles / "probe_lite0.json").write_text(json.dumps({**config, "bundle_name": "probe_lite0"}, indent=1))
    add_bundle_dir(bundles)
    assert cli.main(["make-datalist", "--images", str(images), "--masks", str(masks), "--folds", "2",
                     "--out", str(root / "datalist.json")]) == 0
    assert cli.main(["build-lmdb", "--datalist", str(root / "datalist.json"), "--out", str(root / "cache"),
                     "--bundle", str(bundles / "probe_lite0.json"), "--image-size", "32", "--no-progress"]) == 0
    cwd = os.getcwd()
    os.chdir(REPO)  # MONAI's runner resolves the bundle's %bundles/... macros from the repository root
    try:
        run(run_id="training", config_file=str(bundles / "probe_lite0.json"), dataset_dir=str(root),
            datalist=str(root / "datalist.json"), cache_dir=str(root / "cache"), image_size=32, epochs=1,
            batch_size=2, encoder_weights="none", device="cpu", amp=False, num_workers=0,
            output_dir=str(root / "runs"))
    finally:
        os.chdir(cwd)
    return {"root": root, "images": images, "bundle": bundles / "probe_lite0.json",
            "run": root / "runs" / "probe_lite0" / "fold0"}


def predict(checkpoint: Path, images: Path, out: Path) -> dict[str, bytes]:
    assert cli.main(["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out / "masks"),
                     "--save-probs", str(out / "probs"), "--probs-format", "npy", "--workers", "0"]) == 0
    return {**snapshot(out / "masks"), **{f"p/{k}": v for k, v in snapshot(out / "probs").items()}}


def test_the_run_predicts_the_same_after_its_bundle_changed_and_moved(probe, tmp_path):
    run_dir = probe["run"]
    recorded = json.loads((run_dir / "config.json").read_text())
    assert recorded["bundle_name"] == "probe_lite0" and recorded["image_size"] == 32
    assert not macros(recorded)
    before = predict(run_dir / "best.pt", probe["images"], tmp_path / "before")

    edited = json.loads(probe["bundle"].read_text())  # the bundle's chain changes after training
    edited["stain"] = {"run_info": {}, "augment": {"_target_": "Identityd", "keys": "image"},
                       "normalize": {"_target_": "stas_pipeline.core.stain.StainShiftd", "keys": "image",
                                     "factors": [1.5, 1.0, 1.0]}}
    probe["bundle"].write_text(json.dumps(edited, indent=1))
    assert predict(run_dir / "best.pt", probe["images"], tmp_path / "edited") == before

    moved = tmp_path / "elsewhere" / "fold0"
    shutil.copytree(run_dir, moved)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert predict(moved / "best.pt", probe["images"], tmp_path / "moved") == before
    finally:
        os.chdir(cwd)

    (moved / "config.json").unlink()  # a run from before config.json: rebuilt from the (edited) bundle by name
    assert predict(moved / "best.pt", probe["images"], tmp_path / "by_name") != before


def test_bundles_resolve_from_any_working_directory(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        (chain,) = parsed_content("deeplab_lite0", ["task#preprocessing"], {"image_size": 48})
        assert cli.main(["bundle", "fundus_lite0", "--out", str(tmp_path / "c" / "fundus.json")]) == 0
        assert cli.main(["bundle", "fundus_lite0", "--out", str(tmp_path / "c" / "fundus.json")]) == 2
    finally:
        os.chdir(cwd)
    assert type(chain[-1]).__name__ == "Resized"
    written = json.loads((tmp_path / "c" / "fundus.json").read_text())
    assert written == resolved_config("fundus_lite0") and (tmp_path / "c" / "logging.conf").is_file()
    assert not macros(written)
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "initialize", "--config_file",
                           str(tmp_path / "c" / "fundus.json"), "--dataset_dir", str(tmp_path), "--encoder_weights",
                           "none", "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_stas_bundle_writes_only_its_out_file(tmp_path):
    """``--out`` names the one file written: a user's own ``<bundle>.json`` and ``logging.conf`` beside it stay."""
    mine = {"fundus_lite0.json": "my own bundle\n", "logging.conf": "my own logging\n"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    assert cli.main(["bundle", "fundus_lite0", "--out", str(tmp_path / "resolved.json")]) == 0
    assert {name: (tmp_path / name).read_text() for name in mine} == mine
    assert json.loads((tmp_path / "resolved.json").read_text()) == resolved_config("fundus_lite0")
