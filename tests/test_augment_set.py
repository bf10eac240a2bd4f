"""The segmentation bundles' augmentation set (``bundles/augment.json``): declared by every segmentation bundle,
today's chain byte for byte at the defaults, each geometric part moving image and mask together with the border
in the background colour, each intensity part changing the image and never the mask; and the three transforms
MONAI lacks (background fill, optical distortion, CLAHE). Real MONAI transforms on 64 px synthetic images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import list_data_collate
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    Rotated,
    ScaleIntensityd,
    SpatialPadd,
)
from scipy import ndimage
from skimage.exposure import equalize_adapthist
from tiny_runs import prepare, train

from stas_pipeline.core.bundles import parsed_content
from stas_pipeline.core.stain import RandStainJitterd, StainNormalized
from stas_pipeline.core.transforms import BackgroundFilld, RandCLAHEd, RandOpticalDistortiond

REPO = Path(__file__).resolve().parents[1]
KEYS = ["image", "label"]
SEGMENTATION = sorted(p.stem for p in (REPO / "bundles").glob("*.json")
                      if '"task": "%bundles/tasks/segmentation.json#task"' in p.read_text())
PROBS = ["rot90_prob", "flip_prob", "rotate_prob", "shift_scale_rotate_prob", "elastic_prob", "grid_prob",
         "optical_prob", "clahe_prob", "blur_prob", "noise_prob", "cutout_prob"]
GEOMETRIC = ["rot90_prob", "flip_prob", "rotate_prob", "shift_scale_rotate_prob", "elastic_prob", "grid_prob",
             "optical_prob"]
OFF = {name: 0.0 for name in PROBS}
RECIPE = "deeplab_lite0_slide"  # the whole-slide recipe: its own probabilities of the set
RECIPE_PROBS = {"rot90_prob": 0.5, "flip_prob": 0.5, "shift_scale_rotate_prob": 0.5, "elastic_prob": 0.1,
                "grid_prob": 0.1, "optical_prob": 0.1, "clahe_prob": 0.1, "blur_prob": 0.1, "noise_prob": 0.1,
                "cutout_prob": 0.2}


def chain(bundle: str = "deeplab_lite0", **knobs) -> Compose:
    (train,) = parsed_content(bundle, ["task#train_transforms"], {"image_size": 64, **knobs})
    return train


def square(h: int = 64, w: int = 64) -> dict[str, torch.Tensor]:
    """White (255) with a dark, off-centre rectangle that is the mask."""
    image = torch.full((3, h, w), 255, dtype=torch.uint8)
    image[:, 12:36, 20:54] = 40
    mask = torch.zeros((1, h, w), dtype=torch.uint8)
    mask[:, 12:36, 20:54] = 1
    return {"image": image, "label": mask}


def samples(transform: Compose, data: dict, n: int = 4, seed: int = 3) -> list[dict]:
    transform.set_random_state(seed=seed)
    out = []
    for _ in range(n):
        result = transform({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in data.items()})
        out.extend(result if isinstance(result, list) else [result])
    return out


def off_edge_mismatches(sample: dict) -> int:
    """Pixels where "the image is dark" and "the mask is set" disagree, away from the mask's outline."""
    dark = (sample["image"].mean(0) < 0.5).numpy()
    mask = (sample["label"][0] > 0.5).numpy()
    outline = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
    return int(((dark != mask) & ~outline).sum())


def test_every_segmentation_bundle_declares_the_set_and_its_defaults():
    """Every segmentation bundle takes the set from augment.json; the slide recipe sets its own probabilities."""
    assert len(SEGMENTATION) == 8 and RECIPE in SEGMENTATION
    for bundle in SEGMENTATION:
        config = json.loads((REPO / "bundles" / f"{bundle}.json").read_text())
        own = set(RECIPE_PROBS) if bundle == RECIPE else set()
        assert all(config[k] == f"%bundles/augment.json#{k}" for k in [*PROBS, "background", "augment"]
                   if k not in own), bundle
        (info,) = parsed_content(bundle, ["task#run_info"], {"image_size": 64})
        expected = {**OFF, "rot90_prob": 0.3, **(RECIPE_PROBS if bundle == RECIPE else {})}
        assert {k: info[k] for k in PROBS} == expected and info["background"] == 255, bundle


def test_the_slide_recipe_chain_applies_its_set_to_image_and_mask_alike():
    """The slide recipe's own chain (its probabilities, every part on) keeps the mask on the shape."""
    train = chain(RECIPE)
    names = {type(t).__name__ for t in train.transforms}
    assert {"RandRotate90d", "RandFlipd", "BackgroundFilld", "RandCoarseDropoutd"} <= names, names
    for sample in samples(train, square(), n=8):
        assert sample["image"].shape[-2:] == sample["label"].shape[-2:]
        assert off_edge_mismatches(sample) < 0.05 * sample["label"][0].numel()


@pytest.mark.parametrize("bundle", ["deeplab_lite0", "deeplab_lite0_crops"])
def test_at_the_defaults_the_chain_is_todays_byte_for_byte(bundle):
    """Today's chain (before the set existed), written out with MONAI's classes, against the bundle's."""
    crops = bundle.endswith("crops")
    knobs = {"crop_size": 32, "crops_per_image": 2} if crops else {}
    zoom, jitter = (0.25, 0.1) if crops else (0.0, 0.0)
    today = [
        StainNormalized("image", None),
        RandStainJitterd("image", hed=0.0, hsv=0.0, brightness_contrast=0.0),
        ScaleIntensityd("image"),
        RandZoomd(KEYS, prob=float(zoom > 0), min_zoom=1 / (1 + zoom), max_zoom=1 + zoom, mode=["area", "nearest"],
                  padding_mode="reflect", keep_size=not crops),
        RandScaleIntensityd("image", prob=float(jitter > 0), factors=jitter, channel_wise=True),
        RandShiftIntensityd("image", prob=float(jitter > 0), offsets=jitter / 2, channel_wise=True),
    ]
    if crops:
        today += [SpatialPadd(KEYS, spatial_size=(32, 32), mode="reflect"),
                  RandCropByPosNegLabeld(KEYS, label_key="label", spatial_size=(32, 32), pos=0.5, neg=0.5,
                                         num_samples=2),
                  RandFlipd(KEYS, prob=0.5, spatial_axis=0), RandFlipd(KEYS, prob=0.5, spatial_axis=1)]
    today += [RandRotate90d(KEYS, prob=0.3), EnsureTyped(KEYS, track_meta=False)]
    rng = np.random.default_rng(0)
    data = {"image": torch.from_numpy(rng.integers(0, 256, (3, 48, 64), dtype=np.uint8)), "label": square(48)["label"]}
    ours = samples(chain(bundle, **knobs), data, n=6)
    theirs = samples(Compose(today), data, n=6)
    assert len(ours) == len(theirs) == (12 if crops else 6)
    for a, b in zip(ours, theirs, strict=True):
        assert a["image"].dtype == b["image"].dtype and torch.equal(a["image"], b["image"])
        assert torch.equal(a["label"], b["label"])


@pytest.mark.parametrize("knob", GEOMETRIC)
def test_each_geometric_part_moves_image_and_mask_together(knob):
    data = square()
    out = samples(chain(**{**OFF, knob: 1.0}), data)
    assert any(not torch.equal(s["label"].to(torch.uint8), data["label"]) for s in out), "the mask never moved"
    for s in out:
        assert set(torch.unique(s["label"]).tolist()) <= {0.0, 1.0}  # nearest for the mask
        assert off_edge_mismatches(s) == 0


def test_every_part_at_once_collates_into_batches():
    """Some samples moved, some not, every part at once: a batch of them collates (with the cache's orig_size)."""
    train = chain(**{name: 0.5 for name in PROBS}, hsv_jitter=0.1, bc_jitter=0.1)
    out = samples(train, {**square(), "orig_size": [64, 64]}, n=8)
    batch = list_data_collate(out)
    assert batch["image"].shape == (8, 3, 64, 64) and batch["label"].shape == (8, 1, 64, 64)
    assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0}


def test_the_border_is_the_background_colour():
    knobs = {**OFF, "rotate_prob": 1.0}
    white = samples(chain(**knobs), square())
    black = samples(chain(**knobs, background=0), square())
    assert all(off_edge_mismatches(s) == 0 for s in white)
    assert sum(off_edge_mismatches(s) for s in black) > 0  # black corners: dark where no mask is
    for w, b in zip(white, black, strict=True):
        assert torch.equal(w["label"], b["label"])


@pytest.mark.parametrize("knob", ["clahe_prob", "blur_prob", "noise_prob", "cutout_prob", "hsv_jitter", "bc_jitter"])
def test_each_intensity_part_changes_the_image_and_never_the_mask(knob):
    spatial = {**OFF, "flip_prob": 0.5, "rotate_prob": 0.5}
    rng = np.random.default_rng(1)
    data = square()
    data["image"] = torch.from_numpy(np.clip(data["image"].numpy() + rng.integers(-30, 1, (3, 64, 64)), 0, 255)
                                     .astype(np.uint8))
    without = samples(chain(**spatial), data)
    with_part = samples(chain(**{**spatial, knob: 1.0 if knob.endswith("prob") else 0.2}), data)
    for a, b in zip(without, with_part, strict=True):
        assert torch.equal(a["label"], b["label"])
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(without, with_part, strict=True))


def test_background_fill_is_constant_padding():
    rng = np.random.default_rng(2)
    image = torch.from_numpy(rng.random((3, 32, 40), dtype=np.float32))
    mask = torch.from_numpy((rng.random((1, 32, 40)) > 0.5).astype(np.float32))
    rotate = Rotated(KEYS, angle=0.6, mode=["bilinear", "nearest"], padding_mode="zeros")
    filled = BackgroundFilld("image", rotate, background=0.7)({"image": image, "label": mask})
    shifted = rotate({"image": image - 0.7, "label": mask})
    torch.testing.assert_close(filled["image"].as_tensor(), shifted["image"].as_tensor() + 0.7, atol=1e-5, rtol=0)
    assert torch.equal(filled["label"], shifted["label"])
    idle = BackgroundFilld("image", RandRotated(KEYS, range_x=1.0, prob=0.0, padding_mode="zeros"), background=1.0)
    assert torch.equal(idle({"image": image, "label": mask})["image"], image)


def test_optical_distortion_without_distortion_is_the_identity():
    data = {k: v.float() for k, v in square(32, 48).items()}
    out = RandOpticalDistortiond(KEYS, prob=1.0, distort_limit=0.0, shift_limit=0.0, mode=["bilinear", "nearest"])(data)
    torch.testing.assert_close(out["image"], data["image"], atol=1e-3, rtol=0)
    assert torch.equal(out["label"], data["label"])
    bent = RandOpticalDistortiond(KEYS, prob=1.0, distort_limit=0.3, mode=["bilinear", "nearest"])
    bent.set_random_state(0)
    assert not torch.equal(bent(data)["label"], data["label"])


def test_clahe_is_scikit_images():
    rng = np.random.default_rng(3)
    image = rng.random((3, 32, 32)).astype(np.float32) * 0.5 + 0.25
    out = RandCLAHEd("image", prob=1.0, clip_limit=0.02)({"image": torch.from_numpy(image)})["image"]
    expected = np.moveaxis(equalize_adapthist(np.moveaxis(image, 0, -1), clip_limit=0.02), -1, 0)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    assert torch.equal(RandCLAHEd("image", prob=0.0)({"image": torch.from_numpy(image)})["image"],
                       torch.from_numpy(image))


def test_the_slide_recipe_trains_through_monais_runner(tmp_path):
    """Every part of the recipe on at once (Dice per image plus BCE, deep supervision scored by BCE + Lovasz, the
    set; hypercolumns off, measured to cost): two epochs through MONAI's runner; its record says so and its losses
    are finite."""
    prepare(tmp_path, RECIPE)
    run = train(tmp_path, RECIPE, epochs=2, balanced_sampling=False)  # images here, not tiles with mask shares
    info = json.loads((run / "best.json").read_text())
    assert (info["mask_loss"], info["network"]["deep_supervision"], info["network"]["hypercolumns"]) == \
        ("dice", True, False)
    assert (info["bce_weight"], info["dice_batch"]) == (1.0, False)  # Dice per image plus BCE
    assert {k: info[k] for k in RECIPE_PROBS} == RECIPE_PROBS
    assert (info["early_stop_patience"], info["plateau_patience"]) == (0, 0)  # both measured to cost
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
