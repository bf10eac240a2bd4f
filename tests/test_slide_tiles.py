"""Whole slides: ``stas tile`` on real pyramidal TIFFs (synthetic slides written tile by tile) with an RLE CSV,
tissue and folds by slide, bad slides and bad RLE rows named; the tiles cached by ``stas build-lmdb`` through
the bundle's chain; the DeepLabV3+ bundle trained on them unchanged by MONAI's own runner; ``stas predict`` on
whole slides (stitched windows checked against a pixelwise model, the outputs, out of fold)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run
from monai.data import load_decathlon_datalist
from monai.transforms import Compose, EnsureTyped
from PIL import Image

from stas_pipeline import cli
from stas_pipeline.core.lmdb_cache import LMDBCacheDataset, Preprocessing
from stas_pipeline.tasks.segmentation.inference import SegmentationRun
from stas_pipeline.tasks.slide.inference import SlideSettings, stitch_probabilities
from stas_pipeline.tasks.slide.reader import Slide
from stas_pipeline.tasks.slide.rle import RLEMask, encode
from stas_pipeline.tasks.slide.synthetic import SyntheticSlide
from stas_pipeline.tasks.slide.task import TISSUE_METHODS
from stas_pipeline.tasks.slide.tiling import TileSpec, TissueSettings, plan_tiles, read_tile_image, read_tile_mask
from stas_pipeline.tasks.slide.tissue import tissue_mask

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


def test_groups_keep_a_patients_slides_in_one_fold(slides, tmp_path):
    root, _ = slides
    (tmp_path / "patients.csv").write_text("image,group\ns0,patient_a\ns1,patient_a\ns2,patient_b\n")
    assert tile(root, tmp_path, "--folds", "2", "--groups", str(tmp_path / "patients.csv")) == 0
    training = json.loads((tmp_path / "datalist.json").read_text())["training"]
    folds = {g: {e["fold"] for e in training if e["group"] == g} for g in ("patient_a", "patient_b")}
    assert all(len(f) == 1 for f in folds.values()) and folds["patient_a"] != folds["patient_b"]
    assert {Path(e["image"]).stem for e in training if e["group"] == "patient_a"} == {"s0", "s1"}


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
    assert f"ERROR {bad / 'masks.csv'} id s1: run 2 (3 2) is not after the end" in err
    assert "masks.csv id s2: run 1 (99999999 5) runs past the last pixel (1080000)" in err
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert {e["group"] for e in datalist["training"]} == {"s0", "s3"} and not datalist["test"]
    assert tile(bad, tmp_path / "three") == 2  # 3 folds from 2 slides
    assert "3 folds need 3 slides (or --groups groups) with masks; 2 could be tiled" in capsys.readouterr().err
    assert not (tmp_path / "three" / "datalist.json").exists()


def disc_polygons(slide: SyntheticSlide) -> list[list[list[float]]]:
    """Each glomerulus of ``slide`` as a 64-gon of (x, y) vertices."""
    angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    return [[[float(cx + r * np.cos(a)), float(cy + r * np.sin(a))] for a in angles] for cy, cx, r in slide.discs]


def test_masks_from_polygons_and_mask_images_and_a_wrong_size_named(slides, tmp_path, capsys):
    """A folder of masks: GeoJSON polygons, LabelMe polygons, a mask PNG of the slide's size; a PNG of another
    size is named and its slide left out. Mask shares agree with the true discs."""
    root, made = slides
    masks = tmp_path / "masks"
    masks.mkdir()
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]}}
                for ring in disc_polygons(made["s0"])]
    (masks / "s0.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    shapes = [{"label": "glomerulus", "points": ring, "shape_type": "polygon"} for ring in disc_polygons(made["s1"])]
    (masks / "s1.json").write_text(json.dumps({"shapes": shapes, "imageHeight": 900, "imageWidth": 1200}))
    Image.fromarray(made["s2"].mask(0, 0, 900, 1200) * 255).save(masks / "s2.png")
    Image.fromarray(np.zeros((90, 120), np.uint8)).save(masks / "s3.png")
    assert cli.main(["tile", str(root / "slides"), "--masks", str(masks), "--out", str(tmp_path / "out"),
                     "--size", str(SIZE), "--stride", str(SIZE // 2), "--scale", str(SCALE), "--folds", "3",
                     "--thumbnail", "300"]) == 1
    assert f"ERROR {masks / 's3.png'}: mask is 120x90 (WxH), the slide 1200x900; slide s3.tif left out" in \
        capsys.readouterr().err
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert {e["group"] for e in datalist["training"]} == {"s0", "s1", "s2"} and not datalist["test"]
    for entry in datalist["training"]:
        t = entry["tile"]
        truth = made[entry["group"]].mask(t["y"], t["x"], SIZE, SIZE).mean()
        assert entry["mask_fraction"] == (pytest.approx(truth, rel=0.05, abs=0.002) if entry["group"] != "s2"
                                          else pytest.approx(truth, abs=1e-5))  # polygon outlines count


@pytest.fixture(scope="module")
def trained(slides, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiles of the four slides (2 folds), cached through deeplab_lite0's chain, and fold 0 trained on them
    for an epoch by MONAI's runner with balanced draws: (tile folder, run folder)."""
    root, _ = slides
    out = tmp_path_factory.mktemp("tiles")
    assert tile(root, out, "--folds", "2") == 0
    cache = out / f"cache_{SIZE // SCALE}"
    assert cli.main(["build-lmdb", "--datalist", str(out / "datalist.json"), "--out", str(cache),
                     "--bundle", "deeplab_lite0", "--image-size", str(SIZE // SCALE), "--no-progress"]) == 0
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        run(run_id="training", config_file="bundles/deeplab_lite0.json", dataset_dir=str(out),
            datalist=str(out / "datalist.json"), cache_dir=str(cache), image_size=SIZE // SCALE, epochs=1,
            batch_size=8, encoder_weights="none", device="cpu", amp=False, num_workers=0, balanced_sampling=True,
            output_dir=str(out / "runs"))
    finally:
        os.chdir(cwd)
    return out, out / "runs" / "deeplab_lite0" / "fold0"


def test_the_bundle_trains_on_cached_tiles(slides, trained):
    """build-lmdb cached the tiles (masks as read_tile_mask gives them); the unchanged bundle trained on them."""
    _, made = slides
    out, run_dir = trained
    items = load_decathlon_datalist(str(out / "datalist.json"), True, "training")
    cached = LMDBCacheDataset(items, out / f"cache_{SIZE // SCALE}", Preprocessing.resize(SIZE // SCALE))
    spec = TileSpec(SIZE, SIZE, SCALE)
    for k in (0, len(items) // 2, len(items) - 1):
        t, slide = items[k]["tile"], made[items[k]["group"]]
        expected = read_tile_mask(RLEMask(slide.rle(), (900, 1200)).window, t["y"], t["x"], spec)
        assert np.array_equal(cached[k]["label"][0].numpy(), expected)
        assert cached[k]["image"].shape == (3, SIZE // SCALE, SIZE // SCALE)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and metrics["history"][0]["loss"] > 0


def test_stas_predict_and_evaluate_whole_slides(slides, trained, tmp_path):
    """The datalist's test slide, whole: probability map, level-0 mask, overlay, RLE of that mask; out of fold:
    only the slides of fold 0 (the one run given), scored at every threshold."""
    root, made = slides
    out, run_dir = trained
    pred = tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--datalist", str(out / "datalist.json"),
                     "--tta", "hv", "--batch-size", "4", "--out", str(pred)]) == 0
    assert sorted(p.name for p in pred.iterdir()) == ["predictions.csv", "s3.tif", "s3_overlay.png", "s3_prob.npy"]
    prob = np.load(pred / "s3_prob.npy")
    assert prob.shape == (900 // SCALE, 1200 // SCALE) and prob.dtype == np.uint8 and prob.any()
    with Slide(pred / "s3.tif") as mask:
        level0 = mask.read(0, 0, 900, 1200)[..., 0]
    assert np.array_equal(level0 > 0, np.repeat(np.repeat(prob > 127, SCALE, 0), SCALE, 1))
    rows = (pred / "predictions.csv").read_text().splitlines()
    assert rows[0] == "id,encoding" and rows[1] == f"s3,{encode(level0)}"
    for p_skip, name in ((0.0, "none_skipped"), (1.01, "all_skipped")):  # the auxiliary head's presence is <= 1
        assert cli.main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--datalist",
                         str(out / "datalist.json"), "--tta", "hv", "--batch-size", "4", "--skip-empty", str(p_skip),
                         "--out", str(tmp_path / name)]) == 0
    assert np.array_equal(np.load(tmp_path / "none_skipped" / "s3_prob.npy"), prob)
    assert not np.load(tmp_path / "all_skipped" / "s3_prob.npy").any()
    # a pseudo-label round from the test slide's prediction: confident tiles join training with its mask
    test_tiles = json.loads((out / "datalist.json").read_text())["test"]
    strict = [t["tile"] for t in test_tiles]  # with --low 0 --high 1 and no uncertain pixel allowed: tiles of 0/255
    strict = [t for t in strict if not np.any((prob[t["y"] // SCALE:(t["y"] + SIZE) // SCALE,
                                                     t["x"] // SCALE:(t["x"] + SIZE) // SCALE] % 255) > 0)]
    assert cli.main(["pseudo-label", "--datalist", str(out / "datalist.json"), "--predictions", str(pred),
                     "--high", "1", "--low", "0", "--max-uncertain", "0", "--out", str(tmp_path / "strict.json")]) == 0
    assert json.loads((tmp_path / "strict.json").read_text())["pseudo_rounds"][-1]["tiles_added"] == len(strict)
    assert cli.main(["pseudo-label", "--datalist", str(out / "datalist.json"), "--predictions", str(pred),
                     "--high", "0.6", "--low", "0.4", "--max-uncertain", "1", "--out", str(tmp_path / "r1.json")]) == 0
    round1 = json.loads((tmp_path / "r1.json").read_text())
    pseudo = [e for e in round1["training"] if e.get("source") == "pseudo"]
    record = round1["pseudo_rounds"][-1]
    assert record["round"] == 1 and record["tiles_added"] == len(pseudo) == len(test_tiles)
    assert all("fold" not in e and e["label_id"] == "s3" and e["pseudo_round"] == 1 for e in pseudo)
    (mask_row,) = (tmp_path / "r1_pseudo_masks.csv").read_text().splitlines()[1:]
    expected = np.repeat(np.repeat(prob >= 153, SCALE, 0), SCALE, 1)  # 0.6 x 255 = 153
    assert mask_row == f"s3,{encode(expected)}"
    items = load_decathlon_datalist(str(tmp_path / "r1.json"), True, "training")
    assert cli.main(["build-lmdb", "--datalist", str(tmp_path / "r1.json"), "--out", str(tmp_path / "cache"),
                     "--bundle", "deeplab_lite0", "--image-size", str(SIZE // SCALE), "--no-progress"]) == 0
    cached = LMDBCacheDataset(items, tmp_path / "cache", Preprocessing.resize(SIZE // SCALE))
    k = next(i for i, e in enumerate(items) if e.get("source") == "pseudo")
    t = items[k]["tile"]
    assert np.array_equal(cached[k]["label"][0].numpy(),
                          expected[t["y"]:t["y"] + SIZE:SCALE, t["x"]:t["x"] + SIZE:SCALE].astype(np.uint8))
    datalist = json.loads((out / "datalist.json").read_text())
    fold0 = sorted({e["group"] for e in datalist["training"] if e["fold"] == 0})
    assert cli.main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--datalist", str(out / "datalist.json"),
                     "--out-of-fold", "--out", str(tmp_path / "oof")]) == 0
    assert [r.split(",")[0] for r in (tmp_path / "oof" / "predictions.csv").read_text().splitlines()[1:]] == fold0
    assert cli.main(["evaluate", "--slides", str(tmp_path / "oof"), "--masks", str(root / "masks.csv"),
                     "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for ident in fold0:  # the histogram Dice at 0.5 is the Dice of the written level-0 mask
        with Slide(tmp_path / "oof" / f"{ident}.tif") as mask:
            predicted = mask.read(0, 0, 900, 1200)[..., 0] > 0
        truth = made[ident].mask(0, 0, 900, 1200).astype(bool)
        dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
        assert metrics["dice_at_0.5"][ident] == pytest.approx(dice)
    assert len(metrics["curve"]) == 19 and metrics["mean_dice_at_best"] >= metrics["mean_dice_at_0.5"]
    assert (tmp_path / "eval" / "threshold_dice.png").is_file()
    assert cli.main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--slides", str(root / "slides" / "s1.tif"),
                     str(tmp_path / "missing.tif"), "--out", str(tmp_path / "one")]) == 1
    assert (tmp_path / "one" / "s1.tif").is_file()


@pytest.mark.parametrize("stitch", ["gaussian", "centre"])
def test_stitched_windows_equal_a_pixelwise_model_everywhere_they_reach(slides, stitch, tmp_path):
    """A real 1x1 convolution predicts each pixel from that pixel alone, so however the overlapping windows are
    weighted, the stitched map must equal the model on the whole scaled slide where windows reach, 0 elsewhere."""
    root, _ = slides
    model = torch.nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([0.04, -0.03, 0.01]).reshape(1, 3, 1, 1))
        model.bias.fill_(-1.0)
    out = SIZE // SCALE
    run_spec = SegmentationRun(model.eval(), out, Preprocessing.resize(out), Compose([EnsureTyped("image")]))
    spec = TileSpec(SIZE, SIZE // 2, SCALE)
    settings = SlideSettings(spec, TissueSettings(thumbnail=300, min_tissue=0.05), stitch, "hv", 0.5, 3)
    with Slide(root / "slides" / "s0.tif") as slide:
        plan = plan_tiles(slide.path, spec, settings.tissue)
        stitched = np.zeros((900 // SCALE, 1200 // SCALE), np.uint8)
        assert stitch_probabilities(slide, plan.tiles, [run_spec], settings, stitched, progress=False) == \
            (len(plan.tiles), 0)
        whole = read_tile_image(slide, 0, 0, TileSpec(1200, 1200, SCALE))[:900 // SCALE]
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(whole).permute(2, 0, 1)[None].float()))[0, 0].numpy()
    reached = np.zeros_like(stitched, bool)
    for t in plan.tiles:
        y, x = t["tile"]["y"] // SCALE, t["tile"]["x"] // SCALE
        reached[y:y + out, x:x + out] = True
    assert np.abs(stitched[reached].astype(int) - np.rint(255 * expected[reached])).max() <= 1
    assert not stitched[~reached].any() and reached.mean() > 0.3


@pytest.mark.parametrize("method", TISSUE_METHODS)
def test_each_tissue_method_finds_the_stained_region_on_glass(method):
    """Pink tissue on near-white glass (both noisy): each method's mask is the tissue, not the glass."""
    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal(238, 4, (96, 128, 3)), 0, 255)
    tissue = np.zeros((96, 128), bool)
    tissue[20:70, 30:100] = True
    rgb[tissue] = np.clip(rng.normal((200, 120, 170), 12, (tissue.sum(), 3)), 0, 255)
    mask = tissue_mask(rgb.astype(np.uint8), method)
    assert mask.shape == tissue.shape and mask.dtype == bool
    assert (mask & tissue).sum() / (mask | tissue).sum() > 0.95
