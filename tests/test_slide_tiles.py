"""Whole slides into tiles: ``stas tile`` on real pyramidal TIFFs (synthetic slides written tile by tile) with an
RLE CSV, tissue and folds by slide, bad slides and bad RLE rows named; the tiles cached by ``stas build-lmdb``
through the bundle's chain; the DeepLabV3+ bundle trained on them unchanged by MONAI's own runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import run
from monai.data import load_decathlon_datalist

from stas_pipeline import cli
from stas_pipeline.core.lmdb_cache import LMDBCacheDataset, Preprocessing
from stas_pipeline.tasks.slide.rle import RLEMask
from stas_pipeline.tasks.slide.synthetic import SyntheticSlide
from stas_pipeline.tasks.slide.tiling import TileSpec, read_tile_mask

REPO = Path(__file__).resolve().parents[1]
SIZE, SCALE = 256, 4  # tiles of 256 level-0 pixels cached at 64


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SyntheticSlide]]:
    """Four synthetic slides (three with masks in masks.csv, one without) in ``slides/``."""
    root = tmp_path_factory.mktemp("slides")
    made = {f"s{k}": SyntheticSlide(900, 1200, seed=k, glomeruli=400, radius=(15, 30)) for k in range(4)}
    for name, slide in made.items():
        slide.write(root / "slides" / f"{name}.tif", levels=2, tile=128, compression="zlib")
    rows = [f"{name},{slide.rle()}" for name, slide in made.items() if name != "s3"]
    (root / "masks.csv").write_text("id,encoding\n" + "\n".join(rows) + "\n")
    return root, made


def tile(root: Path, out: Path, *extra: str) -> int:
    return cli.main(["tile", str(root / "slides"), "--masks", str(root / "masks.csv"), "--out", str(out),
                     "--size", str(SIZE), "--stride", str(SIZE // 2), "--scale", str(SCALE), "--folds", "3",
                     "--thumbnail", "300", *extra])


def test_tile_lays_tiles_over_tissue_with_folds_by_slide(slides, tmp_path):
    root, made = slides
    assert tile(root, tmp_path) == 0
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    training, test = datalist["training"], datalist["test"]
    assert {e["group"] for e in training} == {"s0", "s1", "s2"} and {e["group"] for e in test} == {"s3"}
    assert sorted({e["fold"] for e in training}) == [0, 1, 2]
    assert all(len({e["fold"] for e in training if e["group"] == g}) == 1 for g in ("s0", "s1", "s2"))
    for entry in training[::7]:
        t, slide = entry["tile"], made[entry["group"]]
        assert entry["tissue"] >= 0.05 and entry["label_id"] == entry["group"]
        assert (tmp_path / entry["label"]).resolve() == (root / "masks.csv").resolve()
        window = slide.mask(t["y"], t["x"], SIZE, SIZE)
        assert entry["mask_fraction"] == pytest.approx(window.mean(), abs=1e-5)
        yy, xx = np.mgrid[t["y"]:t["y"] + SIZE:16, t["x"]:t["x"] + SIZE:16].astype(np.float32)
        assert slide._in_tissue(yy, xx).any()  # no tile over glass only
    grid = (900 // (SIZE // 2)) * (1200 // (SIZE // 2))
    assert 0 < len([e for e in training if e["group"] == "s0"]) < grid  # glass tiles dropped
    assert sorted(p.name for p in (tmp_path / "tissue").iterdir()) == ["s0.png", "s1.png", "s2.png", "s3.png"]
    assert tile(root, tmp_path) == 2  # the datalist exists: not replaced without --overwrite
    assert tile(root, tmp_path / "q", "--quarter-shift") == 0
    shifted = json.loads((tmp_path / "q" / "datalist.json").read_text())["training"]
    assert len(shifted) > len(training) and any(e["tile"]["y"] % (SIZE // 2) == SIZE // 4 for e in shifted)


def test_bad_slides_and_rle_rows_are_named_and_the_rest_tiled(slides, tmp_path, capsys):
    root, made = slides
    bad = tmp_path / "bad"
    (bad / "slides").mkdir(parents=True)
    for name in ("s0", "s1", "s2", "s3"):
        (bad / "slides" / f"{name}.tif").symlink_to(root / "slides" / f"{name}.tif")
    data = (root / "slides" / "s3.tif").read_bytes()
    (bad / "slides" / "cut.tif").write_bytes(data[:len(data) // 3])
    rows = (root / "masks.csv").read_text().splitlines()
    rows[2] = "s1,1 5 3 2"  # not sorted
    rows += ["cut,1 2", f"s3,{made['s3'].rle()}"]
    (bad / "masks.csv").write_text("\n".join(rows).replace("s2,", "s2,99999999 5 ", 1) + "\n")
    assert tile(bad, tmp_path / "out", "--folds", "2") == 1
    err = capsys.readouterr().err
    assert f"{bad / 'slides' / 'cut.tif'}: cannot decode level 0 window" in err
    assert "masks.csv id s1: run 2 (3 2) is not after the end" in err
    assert "masks.csv id s2: run 1 (99999999 5) runs past the last pixel (1080000)" in err
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert {e["group"] for e in datalist["training"]} == {"s0", "s3"} and not datalist["test"]
    assert tile(bad, tmp_path / "three") == 2  # 3 folds from 2 slides
    assert "3 folds need 3 slides (or --groups groups) with masks; 2 could be tiled" in capsys.readouterr().err
    assert not (tmp_path / "three" / "datalist.json").exists()


def test_the_bundle_trains_on_cached_tiles(slides, tmp_path):
    """build-lmdb caches the tiles through deeplab_lite0's chain (masks as read_tile_mask gives them); MONAI's
    runner trains the unchanged bundle on them for an epoch, drawing tiles balanced by mask area."""
    root, made = slides
    assert tile(root, tmp_path, "--folds", "2") == 0
    cache = tmp_path / f"cache_{SIZE // SCALE}"
    assert cli.main(["build-lmdb", "--datalist", str(tmp_path / "datalist.json"), "--out", str(cache),
                     "--bundle", "deeplab_lite0", "--image-size", str(SIZE // SCALE), "--no-progress"]) == 0
    items = load_decathlon_datalist(str(tmp_path / "datalist.json"), True, "training")
    cached = LMDBCacheDataset(items, cache, Preprocessing.resize(SIZE // SCALE))
    spec = TileSpec(SIZE, SIZE, SCALE)
    for k in (0, len(items) // 2, len(items) - 1):
        t, slide = items[k]["tile"], made[items[k]["group"]]
        expected = read_tile_mask(RLEMask(slide.rle(), (900, 1200)).window, t["y"], t["x"], spec)
        assert np.array_equal(cached[k]["label"][0].numpy(), expected)
        assert cached[k]["image"].shape == (3, SIZE // SCALE, SIZE // SCALE)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        run(run_id="training", config_file="bundles/deeplab_lite0.json", dataset_dir=str(tmp_path),
            datalist=str(tmp_path / "datalist.json"), cache_dir=str(cache), image_size=SIZE // SCALE, epochs=1,
            batch_size=8, encoder_weights="none", device="cpu", amp=False, num_workers=0, balanced_sampling=True,
            output_dir=str(tmp_path / "runs"))
    finally:
        os.chdir(cwd)
    metrics = json.loads((tmp_path / "runs" / "deeplab_lite0" / "fold0" / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and metrics["history"][0]["loss"] > 0
