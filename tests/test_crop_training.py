"""Crop training (a segmentation bundle's ``crop_size``): the cache at an aspect-keeping scale, foreground-biased
random crops in training, Gaussian-weighted windows of the crop size in validation and inference, out-of-fold
prediction of the training images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import load_decathlon_datalist
from monai.transforms import Compose
from PIL import Image
from test_bundles import history, run_bundle

from stas_pipeline import cli
from stas_pipeline.core.bundles import parsed_content
from stas_pipeline.core.lmdb_cache import LMDBCacheDataset, Preprocessing, build_cache, to_uint8
from stas_pipeline.tasks.segmentation.inference import load_run_model, predict_probabilities

KNOBS = {"image_size": 64, "crop_size": 32, "encoder_weights": "none"}


def crop_chain(**knobs) -> tuple[Preprocessing, object]:
    pre, train = parsed_content("deeplab_lite0_crops", ["task#preprocessing", "task#train_transforms"],
                                {**KNOBS, **knobs})
    return Preprocessing.of(pre), train


def items_of(datalist: Path) -> list[dict]:
    return load_decathlon_datalist(str(datalist), True, "training")


def cached_first(dataset: Path, tmp_path: Path, pre: Preprocessing) -> tuple[list[dict], dict]:
    """The tiny datalist's items, cached by ``pre`` under ``tmp_path/cache``, and the first cached item."""
    items = items_of(dataset / "tiny.json")
    build_cache(items, tmp_path / "cache", pre, progress=False)
    return items, LMDBCacheDataset(items, tmp_path / "cache", pre)[0]


def test_cache_keeps_the_aspect_and_training_draws_foreground_crops(synthetic_dataset, tmp_path):
    pre, train = crop_chain(crops_per_image=3, crop_pos_ratio=1.0, color_jitter=0.0)
    items, cached = cached_first(synthetic_dataset, tmp_path, pre)
    assert tuple(cached["image"].shape) == (3, 53, 64)  # 80 x 96 with its longer side at 64: 53.3 x 64
    assert cached["orig_size"] == (80, 96)

    crops = LMDBCacheDataset(items, tmp_path / "cache", pre, train)[0]
    assert isinstance(crops, list) and len(crops) == 3
    for crop in crops:
        assert tuple(crop["image"].shape) == (3, 32, 32) and tuple(crop["label"].shape) == (1, 32, 32)
        assert crop["label"].sum() > 0  # every crop is centred on a foreground pixel at pos ratio 1
        assert 0.0 <= float(crop["image"].min()) and float(crop["image"].max()) <= 1.0


def test_zoom_and_colour_jitter_augment_before_the_crops(synthetic_dataset, tmp_path):
    """``zoom_range`` rescales image and mask together (a new size before the crops; the same size on whole images),
    ``color_jitter`` scales and shifts each channel on its own; both at 0 leave the cached image as it is."""
    _, cached = cached_first(synthetic_dataset, tmp_path, crop_chain()[0])
    scaled = {"image": cached["image"].float() / 255.0, "label": cached["label"]}
    (none,) = parsed_content("deeplab_lite0_crops", ["task#augment"], {**KNOBS, "zoom_range": 0, "color_jitter": 0})
    for step in none:
        assert torch.equal(torch.as_tensor(step(dict(scaled))["image"]), scaled["image"])

    (augment,) = parsed_content("deeplab_lite0_crops", ["task#augment"], {**KNOBS, "zoom_range": 0.5,
                                                                         "color_jitter": 0.2})
    zoom, *jitter = augment
    zoom.set_random_state(0)
    sizes = {tuple(zoom(dict(scaled))["image"].shape[1:]) for _ in range(8)}
    assert len(sizes) > 1 and all(53 / 1.5 - 1 <= h <= 53 * 1.5 + 1 and w / h == pytest.approx(64 / 53, rel=0.1)
                                  for h, w in sizes)
    zoomed = zoom(dict(scaled))
    assert set(torch.unique(torch.as_tensor(zoomed["label"])).tolist()) <= {0.0, 1.0}
    assert zoomed["image"].shape[1:] == zoomed["label"].shape[1:]
    (whole_zoom, *_), = parsed_content("deeplab_lite0", ["task#augment"], {**KNOBS, "crop_size": 0, "zoom_range": 0.5})
    assert whole_zoom(dict(scaled))["image"].shape == scaled["image"].shape

    x = scaled["image"]
    y = torch.as_tensor(Compose(jitter)(dict(scaled))["image"])
    fits = [np.polyfit(x[c].flatten().numpy(), y[c].flatten().numpy(), 1) for c in range(3)]
    assert all(0.8 - 1e-4 <= a <= 1.2 + 1e-4 and abs(b) <= 0.1 + 1e-4 for a, b in fits)
    assert len({round(float(a), 4) for a, _ in fits}) == 3  # each channel its own factor

    (train,) = parsed_content("deeplab_lite0_crops", ["task#train_transforms"], KNOBS)
    names = [type(t).__name__ for t in train.transforms]
    assert names.index("ScaleIntensityd") < names.index("RandZoomd") < names.index("RandCropByPosNegLabeld")


def test_crop_bundle_trains_validates_and_predicts_by_windows(synthetic_dataset, tmp_path):
    """MONAI's runner trains the crop bundle; the run is rebuilt with its window and aspect-keeping chain;
    every forward pass of inference sees one window of the crop size; out-of-fold prediction writes each
    training image that a run of its fold exists for, as predicting it alone does."""
    datalist = synthetic_dataset / "tiny.json"
    pre, _ = crop_chain()
    build_cache(items_of(datalist), tmp_path / "cache", pre, progress=False)
    run_bundle("deeplab_lite0_crops", dataset_dir=str(synthetic_dataset), datalist=str(datalist), val_interval=1,
               cache_dir=str(tmp_path / "cache"), crops_per_image=2, epochs=1, batch_size=2,
               output_dir=str(tmp_path / "runs"), frozen_stages=2, decoder_channels=64, **KNOBS)
    run_dir = tmp_path / "runs" / "deeplab_lite0_crops" / "fold0"
    (row,) = history(run_dir)
    assert 0.0 <= row["val_dice"] <= 1.0 and row["loss"] > 0
    info = json.loads((run_dir / "best.json").read_text())
    assert info["crop_size"] == 32 and info["keep_aspect"] is True and info["image_size"] == 64
    assert (info["network"]["frozen_stages"], info["network"]["decoder_channels"]) == (2, 64)

    seg_run = load_run_model(run_dir / "best.pt")  # rebuilt frozen and narrow, so that the checkpoint loads
    assert type(seg_run.model.model.encoder.model.bn1).__name__ == "FrozenBatchNormAct2d"
    assert seg_run.window == 32 and seg_run.preprocessing.spec == pre.spec
    seen = []
    seg_run.model.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
    val = json.loads(datalist.read_text())["training"][-1]
    image = synthetic_dataset / val["image"]
    prob = predict_probabilities([seg_run], [image], mode="resize", tta="hv")[0]
    assert prob.shape == (1, 80, 96) and {shape[1:] for shape in seen} == {(3, 32, 32)}
    assert sum(shape[0] for shape in seen) == 4 * 2 * 3  # 4 flips x 2 x 3 windows over the 53 x 64 scale

    out = tmp_path / "oof"
    assert cli.main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--datalist", str(datalist),
                     "--out-of-fold", "--out", str(out / "masks"), "--save-probs", str(out / "probs"),
                     "--probs-format", "npy", "--tta", "hv", "--device", "cpu", "--workers", "0"]) == 0
    assert [p.stem for p in (out / "masks").glob("*.png")] == [Path(val["image"]).stem]  # only fold 0 has a run
    np.testing.assert_allclose(np.load(out / "probs" / f"{image.stem}.npy"), prob[0].numpy(), atol=1e-6)
    mask = np.asarray(Image.open(out / "masks" / f"{image.stem}.png"))
    assert np.array_equal(mask > 0, prob[0].numpy() > 0.5)


def test_windows_cover_the_scaled_image_and_come_back_at_the_original_size(synthetic_dataset):
    """A pointwise model run by windows over the aspect-kept scale: the same as that model over the whole scaled
    image (Gaussian weights sum to one everywhere), resized back; the resize mode of a whole-image run differs."""
    pre, _ = crop_chain()
    val = json.loads((synthetic_dataset / "tiny.json").read_text())["training"][-1]
    image = synthetic_dataset / val["image"]
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 1, kernel_size=1).eval()
    _, transform = parsed_content("deeplab_lite0_crops", ["task#preprocessing", "task#val_transforms"], KNOBS)
    windowed = predict_probabilities([[model, 64, pre, transform, 32]], [image])[0]
    scaled = transform({"image": torch.from_numpy(to_uint8(pre({"image": str(image)})["image"]))})["image"]
    with torch.no_grad():
        whole = F.interpolate(torch.sigmoid(model(scaled[None].float())), size=(80, 96), mode="bilinear",
                              align_corners=False)[0]
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=0)
    squashed = predict_probabilities([[model, 64, Preprocessing.resize(64), transform]], [image])[0]
    assert not torch.allclose(windowed, squashed, atol=1e-3)


def test_a_recipe_bundle_takes_crops_of_its_square_image(synthetic_dataset, tmp_path):
    """The 800 px GPU bundles' option: crops of the cached square image, validated by windows."""
    run_bundle("deeplab_effb6", dataset_dir=str(synthetic_dataset), datalist=str(synthetic_dataset / "tiny.json"),
               image_size=64, crop_size=32, crops_per_image=2, epochs=1, batch_size=2, encoder_weights="none",
               output_dir=str(tmp_path))
    run_dir = tmp_path / "deeplab_effb6" / "fold0"
    (row,) = history(run_dir)
    assert 0.0 <= row["val_dice"] <= 1.0
    info = json.loads((run_dir / "best.json").read_text())
    assert info["crop_size"] == 32 and info["keep_aspect"] is False and info["network"]["image_size"] == 32
    assert load_run_model(run_dir / "best.pt").window == 32
