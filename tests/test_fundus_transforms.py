"""Fundus preprocessing (black-border crop, centre crop, resize) as a bundle declares it; RandAugMixd,
RandColorJitterd and the image-level training chain with its augmentation knobs.

Real images: scikit-image's bundled fundus photograph (``skimage.data.retina``, no download) written as a JPEG,
and made discs on black with known borders; everything runs through MONAI's own LoadImaged/Compose."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import CenterScaleCropd, Compose, RandFlipd
from PIL import Image

from stas_pipeline.core.lmdb_cache import Preprocessing
from stas_pipeline.core.transforms import ChannelThreshold, FundusBorderCropd, RandAugMixd, RandColorJitterd

THRESHOLD = 10


def declared_chain(keys=("image",), threshold=THRESHOLD, fraction=1.0, size=512, margin=0) -> Compose:
    """The preprocessing chain as a bundle's JSON declares it, resolved by MONAI's ConfigParser."""
    keys = list(keys)
    modes = ["nearest" if k == "label" else "area" for k in keys]
    config = {"chain": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": keys, "reader": "PILReader", "reverse_indexing": False,
         "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
        {"_target_": "stas_pipeline.core.transforms.FundusBorderCropd", "keys": keys, "threshold": threshold,
         "margin": margin},
        {"_target_": "CenterScaleCropd", "keys": keys, "roi_scale": fraction},
        {"_target_": "Resized", "keys": keys, "spatial_size": [size, size], "mode": modes},
    ]}}
    parser = ConfigParser(config)
    return parser.get_parsed_content("chain")


def without_resize(chain: Compose) -> Compose:
    return Compose(chain.transforms[:-1])


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1), ends exclusive, of the true pixels of a 2-D mask."""
    rows, cols = np.where(mask)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    from skimage import data

    try:
        return data.retina()  # (1411, 1411, 3) uint8, shipped inside scikit-image
    except Exception as exc:  # pragma: no cover - only if a future scikit-image fetches it with pooch
        pytest.skip(f"skimage.data.retina() is not available offline: {exc}")


# (top, bottom, left, right) black added around the photograph, to make it a wide 4:3-like frame
PAD = (40, 60, 230, 170)


@pytest.fixture(scope="module")
def retina_jpeg(retina, tmp_path_factory) -> tuple[str, np.ndarray]:
    """The photograph on a wider black frame, saved as a JPEG; with the pixels PIL decodes from it."""
    top, bottom, left, right = PAD
    canvas = np.zeros((retina.shape[0] + top + bottom, retina.shape[1] + left + right, 3), np.uint8)
    canvas[top:top + retina.shape[0], left:left + retina.shape[1]] = retina
    path = tmp_path_factory.mktemp("retina") / "retina.jpg"
    Image.fromarray(canvas).save(path, quality=95)
    return str(path), np.asarray(Image.open(path).convert("RGB"))


def made_disc(height=120, width=160, centre=(59, 69), radius=40, colour=(200, 80, 40)) -> np.ndarray:
    """A coloured disc on black, (H, W, 3) uint8: its bounding box is rows cy-r..cy+r, cols cx-r..cx+r."""
    yy, xx = np.mgrid[:height, :width]
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    image = np.zeros((height, width, 3), np.uint8)
    image[inside] = colour
    return image


# --- the border crop on the real photograph -----------------------------------------------------------------


def test_retina_border_is_cropped_to_the_disc(retina, retina_jpeg):
    path, decoded = retina_jpeg
    out = without_resize(declared_chain())({"image": path})["image"]
    assert isinstance(out, MetaTensor) and out.shape[0] == 3  # LoadImaged gives float32 on the 0..255 scale

    # independently: the box of the pixels brighter than the threshold, in the decoded JPEG ...
    r0, r1, c0, c1 = bbox(decoded.max(axis=-1) > THRESHOLD)
    assert tuple(out.shape[1:]) == (r1 - r0, c1 - c0)
    np.testing.assert_array_equal(out.numpy(), np.moveaxis(decoded[r0:r1, c0:c1], -1, 0))
    # ... and in the original photograph before JPEG, shifted by the frame: the same disc within a few pixels
    top, _, left, _ = PAD
    q0, q1, p0, p1 = bbox(retina.max(axis=-1) > THRESHOLD)
    assert np.allclose((r0, r1, c0, c1), (q0 + top, q1 + top, p0 + left, p1 + left), atol=3)

    # the black frame is gone: wide 1751-pixel frame -> the ~1400-pixel disc; every edge of the crop touches it
    assert decoded.shape[:2] == (1511, 1811)
    assert 1380 <= out.shape[1] <= 1411 and 1380 <= out.shape[2] <= 1411
    bright = out.amax(0) > THRESHOLD
    assert bright[0].any() and bright[-1].any() and bright[:, 0].any() and bright[:, -1].any()


@pytest.mark.parametrize("fraction", [0.9, 0.75])
def test_retina_centre_fraction_crop_size(retina_jpeg, fraction):
    path, decoded = retina_jpeg
    r0, r1, c0, c1 = bbox(decoded.max(axis=-1) > THRESHOLD)
    out = without_resize(declared_chain(fraction=fraction))({"image": path})["image"]
    h, w = r1 - r0, c1 - c0
    assert tuple(out.shape[1:]) == (math.ceil(fraction * h), math.ceil(fraction * w))
    # the centre of the border-cropped disc
    top, left = (h - out.shape[1]) // 2, (w - out.shape[2]) // 2
    expected = decoded[r0 + top:r0 + top + out.shape[1], c0 + left:c0 + left + out.shape[2]]
    np.testing.assert_array_equal(out.numpy(), np.moveaxis(expected, -1, 0))


@pytest.mark.parametrize("size", [512, 224])
def test_retina_resized_to_the_model_size(retina_jpeg, size):
    path, _ = retina_jpeg
    out = declared_chain(fraction=0.9, size=size)({"image": path})["image"]
    assert tuple(out.shape) == (3, size, size)
    assert float(out.min()) >= 0 and float(out.max()) <= 255
    # the cropped disc fills the frame: the centre is bright, the corners of the square are the disc's black corners
    centre = out[:, size // 2 - 8:size // 2 + 8, size // 2 - 8:size // 2 + 8]
    assert float(centre.amax(0).float().mean()) > 50


# --- made images: exact boxes --------------------------------------------------------------------------------


def test_disc_crop_box_is_exact_and_mask_gets_the_same_crop(tmp_path):
    image = made_disc()  # rows 19..99, cols 29..109 inclusive
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[50:70, 60:64] = 255
    Image.fromarray(image).save(tmp_path / "disc.png")
    Image.fromarray(mask).save(tmp_path / "disc_mask.png")
    chain = without_resize(declared_chain(keys=("image", "label")))
    out = chain({"image": str(tmp_path / "disc.png"), "label": str(tmp_path / "disc_mask.png")})
    assert tuple(out["image"].shape) == (3, 81, 81)
    assert tuple(out["label"].shape) == (1, 81, 81)
    np.testing.assert_array_equal(out["image"].numpy(), np.moveaxis(image[19:100, 29:110], -1, 0))
    np.testing.assert_array_equal(out["label"][0].numpy(), mask[19:100, 29:110])

    resized = declared_chain(keys=("image", "label"), size=64)(
        {"image": str(tmp_path / "disc.png"), "label": str(tmp_path / "disc_mask.png")})
    assert tuple(resized["image"].shape) == (3, 64, 64) and tuple(resized["label"].shape) == (1, 64, 64)
    assert set(np.unique(resized["label"].numpy())) == {0, 255}  # nearest keeps the mask binary


def test_margin_widens_the_box_but_not_past_the_image():
    image = torch.as_tensor(np.moveaxis(made_disc(centre=(42, 69)), -1, 0))  # rows 2..82, cols 29..109
    crop = FundusBorderCropd("image", margin=5, start_coord_key="box_start", end_coord_key="box_end")
    out = crop({"image": image})
    assert list(out["box_start"]) == [0, 24] and list(out["box_end"]) == [88, 115]
    assert tuple(out["image"].shape) == (3, 88, 91)


def test_threshold_and_channel_reduction():
    image = np.zeros((3, 40, 50), np.uint8)
    image[:, 10:20, 10:20] = 100
    image[0, 30:35, 40:45] = 12  # dim red patch: max 12 > 10, mean 4 <= 10
    by_max = FundusBorderCropd("image")({"image": image})["image"]
    by_mean = FundusBorderCropd("image", reduction="mean")({"image": image})["image"]
    high = FundusBorderCropd("image", threshold=12)({"image": image})["image"]
    assert tuple(by_max.shape) == (3, 25, 35)
    assert tuple(by_mean.shape) == (3, 10, 10)
    assert tuple(high.shape) == (3, 10, 10)  # strictly greater than the threshold
    float_image = torch.as_tensor(image, dtype=torch.float32)
    assert tuple(FundusBorderCropd("image")({"image": float_image})["image"].shape) == (3, 25, 35)


@pytest.mark.parametrize("make", [np.zeros, lambda shape, dtype: torch.zeros(shape, dtype=torch.uint8)])
def test_all_black_image_is_kept_whole(make):
    out = FundusBorderCropd("image", margin=4)({"image": make((3, 30, 40), np.uint8)})["image"]
    assert tuple(out.shape) == (3, 30, 40)


def test_all_black_photograph_through_the_chain(tmp_path):
    Image.fromarray(np.full((90, 120, 3), 6, np.uint8)).save(tmp_path / "black.png")  # dark but not 0
    item = {"image": str(tmp_path / "black.png")}
    assert tuple(without_resize(declared_chain())(item)["image"].shape) == (3, 90, 120)
    assert tuple(declared_chain(size=224)(item)["image"].shape) == (3, 224, 224)


def test_centre_fraction_one_is_a_no_op_and_other_fractions_take_the_centre():
    image = torch.arange(3 * 101 * 80, dtype=torch.float32).reshape(3, 101, 80)
    same = CenterScaleCropd("image", roi_scale=1.0)({"image": image})["image"]
    torch.testing.assert_close(same.as_tensor(), image)
    half = CenterScaleCropd("image", roi_scale=0.5)({"image": image})["image"]
    assert tuple(half.shape) == (3, 51, 40)  # ceil(0.5 * 101), 0.5 * 80
    torch.testing.assert_close(half.as_tensor(), image[:, 25:76, 20:60])


def test_parameters_are_visible_to_the_cache_description():
    def spec(**kw):
        return Preprocessing(declared_chain(**kw).transforms).spec

    assert spec() == spec()
    assert spec(threshold=20) != spec() and spec(margin=2) != spec() and spec(fraction=0.9) != spec()
    crop = FundusBorderCropd("image", threshold=7, reduction="mean")
    assert vars(crop.cropper.select_fn) == {"threshold": 7.0, "reduction": "mean"}
    assert crop.threshold == 7.0 and crop.reduction == "mean"
    restored = pickle.loads(pickle.dumps(crop))
    assert vars(restored.cropper.select_fn) == vars(crop.cropper.select_fn)


def test_bad_crop_arguments():
    with pytest.raises(ValueError, match="reduction"):
        ChannelThreshold(10, reduction="min")
    with pytest.raises(ValueError, match="threshold"):
        FundusBorderCropd("image", threshold="10")


# --- AugMix ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo(retina) -> torch.Tensor:
    """The photograph at 128 x 128 as the cache yields it: (3, H, W) uint8."""
    small = Image.fromarray(retina).resize((128, 128), Image.BILINEAR)
    return torch.as_tensor(np.moveaxis(np.asarray(small), -1, 0).copy())


def augmix(image, seed, **kw):
    t = RandAugMixd("image", **kw)
    t.set_random_state(seed=seed)
    return t({"image": image})["image"]


def test_augmix_severity_zero_and_prob_zero_are_identity(photo):
    assert augmix(photo, 0, severity=0) is photo
    assert augmix(photo, 0, severity=5, prob=0.0) is photo


def test_augmix_same_seed_same_output_different_seed_different_output(photo):
    a, b = augmix(photo, 1, severity=3), augmix(photo, 1, severity=3)
    c = augmix(photo, 2, severity=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, photo)
    # one transform called twice: two different augmentations, the same pair again after re-seeding
    t = RandAugMixd("image", severity=3).set_random_state(seed=3)
    first = [t({"image": photo})["image"] for _ in range(2)]
    t.set_random_state(seed=3)
    again = [t({"image": photo})["image"] for _ in range(2)]
    assert not torch.equal(first[0], first[1])
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))


def test_augmix_in_a_seeded_compose_with_flips_is_reproducible(photo):
    def run(seed):
        chain = Compose([RandFlipd("image", prob=0.5, spatial_axis=1), RandFlipd("image", prob=0.5, spatial_axis=0),
                         RandAugMixd("image", severity=3)])
        chain.set_random_state(seed=seed)
        return [chain({"image": photo})["image"] for _ in range(3)]

    assert all(torch.equal(x, y) for x, y in zip(run(7), run(7), strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(run(7), run(8), strict=True))


def test_augmix_leaves_the_global_generators_alone(photo):
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    augmix(photo, 0, severity=4)
    assert (random.random(), np.random.rand()) == expected


KINDS = ["tensor", "meta", "numpy", "float", "grey"]


def as_kind(photo: torch.Tensor, kind: str):
    """The (3, H, W) uint8 photograph as each image type a transform may meet."""
    return {
        "tensor": lambda: photo,
        "meta": lambda: MetaTensor(photo, meta={"filename_or_obj": "retina.jpg"}),
        "numpy": lambda: photo.numpy(),
        "float": lambda: photo.float(),
        "grey": lambda: photo[1:2].numpy().astype(np.float32),
    }[kind]()


@pytest.mark.parametrize("kind", KINDS)
def test_augmix_keeps_type_dtype_and_shape(photo, kind):
    image = as_kind(photo, kind)
    out = augmix(image, 5, severity=6, width=2, depth=2, alpha=0.5)
    assert type(out) is type(image) and out.dtype == image.dtype and tuple(out.shape) == tuple(image.shape)
    values = np.asarray(out)
    assert values.min() >= 0 and values.max() <= 255 and np.array_equal(values, np.round(values))
    if kind == "meta":
        assert out.meta["filename_or_obj"] == "retina.jpg"


def test_augmix_uses_timms_augmix_with_the_given_parameters():
    t = RandAugMixd("image", severity=7, width=4, depth=2, alpha=0.25)
    assert t.config == "augmix-m7-w4-a0.25-d2"
    assert (t.augmix.width, t.augmix.depth, t.augmix.alpha) == (4, 2, 0.25)
    assert all(op.magnitude == 7 for op in t.augmix.ops)
    assert RandAugMixd("image").augmix.depth == -1
    assert pickle.loads(pickle.dumps(t)).config == t.config


@pytest.mark.parametrize("kwargs", [
    {"severity": 11}, {"severity": -1}, {"severity": 2.5}, {"severity": True}, {"width": 0}, {"depth": 0},
    {"alpha": 0.0}, {"prob": 1.5}, {"fill": 300},
])
def test_augmix_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RandAugMixd("image", **kwargs)


def test_augmix_refuses_other_channel_counts():
    with pytest.raises(ValueError, match="C = 1 or 3"):
        augmix(torch.zeros(4, 16, 16, dtype=torch.uint8), 0, severity=3)


def test_augmentation_declared_in_a_bundle(photo):
    config = {"flip_prob": 0.5, "augmix_severity": 3, "augment": {"_target_": "Compose", "transforms": [
        {"_target_": "RandFlipd", "keys": "image", "prob": "@flip_prob", "spatial_axis": 1},
        {"_target_": "RandFlipd", "keys": "image", "prob": "@flip_prob", "spatial_axis": 0},
        {"_target_": "stas_pipeline.core.transforms.RandAugMixd", "keys": "image", "severity": "@augmix_severity"},
    ]}}
    chain = ConfigParser(config).get_parsed_content("augment")
    chain.set_random_state(seed=0)
    out = chain({"image": photo})["image"]
    assert out.shape == photo.shape and out.dtype == torch.uint8


# --- colour jitter ----------------------------------------------------------------------------------------------


def jitter(image, seed, strength=0.2):
    return RandColorJitterd("image", strength).set_random_state(seed=seed)({"image": image})["image"]


def test_jitter_strength_zero_is_identity(photo):
    assert jitter(photo, 0, strength=0) is photo


def test_jitter_same_seed_same_output_different_seed_different_output(photo):
    assert torch.equal(jitter(photo, 1), jitter(photo, 1))
    assert not torch.equal(jitter(photo, 1), jitter(photo, 2))
    assert not torch.equal(jitter(photo, 1), photo)
    state = torch.get_rng_state()
    jitter(photo, 3)
    assert torch.equal(torch.get_rng_state(), state)  # drawn from the transform's own generator


def test_jitter_is_torchvisions_adjustments_with_the_drawn_factors(photo):
    from torchvision.transforms import functional as TF

    t = RandColorJitterd("image", 0.4).set_random_state(seed=4)
    out = t({"image": photo})["image"]
    assert sorted(t._order) == [0, 1, 2] and all(0.6 <= f <= 1.4 for f in t._factors)
    expected = photo.float() / 255
    for k in t._order:
        expected = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)[k](expected, t._factors[k])
    assert torch.equal(out, torch.round(expected * 255).to(torch.uint8))


def test_jitter_brightness_factor_stays_in_range():
    """A grey constant image: contrast and saturation leave it alone, brightness scales it by its factor."""
    grey = torch.full((3, 8, 8), 100.0)
    factors = [float(jitter(grey, seed, strength=0.3)[0, 0, 0]) / 100 for seed in range(40)]
    assert all(0.7 - 1e-6 <= f <= 1.3 + 1e-6 for f in factors)
    assert min(factors) < 0.9 and max(factors) > 1.1


@pytest.mark.parametrize("kind", KINDS)
def test_jitter_keeps_type_dtype_and_shape(photo, kind):
    image = as_kind(photo, kind)
    out = jitter(image, 5, strength=0.5)
    assert type(out) is type(image) and out.dtype == image.dtype and tuple(out.shape) == tuple(image.shape)
    assert 0 <= np.asarray(out).min() and np.asarray(out).max() <= 255


@pytest.mark.parametrize("strength", [-0.1, float("inf"), True, "0.2"])
def test_jitter_bad_strength(strength):
    with pytest.raises(ValueError, match="strength"):
        RandColorJitterd("image", strength)


# --- the training chain the image-level bundles declare --------------------------------------------------------


def train_chain(**knobs) -> tuple[Compose, dict]:
    from stas_pipeline.core.bundles import parsed_content

    return parsed_content("fundus_lite0", ["task#train_transforms", "task#run_info"], {"image_size": 128, **knobs})


def chain_names(chain: Compose) -> list[str]:
    return [type(t).__name__ for t in chain.transforms]


def augmented(chain: Compose, photo: torch.Tensor, seed: int) -> torch.Tensor:
    chain.set_random_state(seed=seed)
    return torch.stack([chain({"image": photo, "label": torch.tensor(1.0)})["image"] for _ in range(8)])


NORMALIZE = ["ScaleIntensityRanged", "NormalizeIntensityd", "EnsureTyped"]
STAIN = ["StainNormalized", "RandStainJitterd"]  # off by default (tests/test_stain_bundles.py)


def test_new_augmentation_knobs_are_off_by_default_and_recorded(photo):
    chain, info = train_chain()
    assert chain_names(chain) == [*STAIN, "RandFlipd", "RandFlipd", "RandRotate90d", "RandAugMixd", *NORMALIZE]
    assert (info["rotate_degrees"], info["crop_scale"], info["color_jitter"]) == (0, 1.0, 0.0)
    off, _ = train_chain(flip_prob=0.0)  # nothing random left: the cached image, normalised
    expected = Compose(off.transforms[-3:])({"image": photo})["image"]
    assert torch.equal(augmented(off, photo, 0)[0], expected)


@pytest.mark.parametrize(("knobs", "added"), [
    ({"rotate_degrees": 15}, ["RandRotated"]),
    ({"crop_scale": 0.7}, ["RandScaleCropd", "Resized"]),
    ({"color_jitter": 0.2}, ["RandColorJitterd"]),
    ({"rotate_degrees": 15, "crop_scale": 0.7, "color_jitter": 0.2},
     ["RandRotated", "RandScaleCropd", "Resized", "RandColorJitterd"]),
])
def test_each_knob_adds_its_transform_in_order_keeps_the_shape_and_is_seeded(photo, knobs, added):
    chain, info = train_chain(flip_prob=0.0, **knobs)
    assert chain_names(chain) == [*STAIN, "RandFlipd", "RandFlipd", "RandRotate90d", *added, "RandAugMixd",
                                  *NORMALIZE]
    assert all(info[k] == v for k, v in knobs.items())
    out = augmented(chain, photo, 1)
    assert out.shape == (8, 3, 128, 128)
    assert torch.equal(out, augmented(chain, photo, 1))
    assert not torch.equal(out, augmented(chain, photo, 2))
    plain, _ = train_chain(flip_prob=0.0)
    assert not torch.equal(out, augmented(plain, photo, 1))


def test_rotation_and_crop_parameters():
    chain, _ = train_chain(rotate_degrees=30, crop_scale=0.75)
    rotate, crop, resize = chain.transforms[5:8]
    assert rotate.prob == 0.5 and rotate.rand_rotate.range_x == pytest.approx((-math.pi / 6, math.pi / 6))
    assert rotate.padding_mode == ("zeros",)
    rotate.set_random_state(seed=0)
    corners = [float(rotate({"image": torch.full((3, 128, 128), 200.0)})["image"][:, 0, 0].max()) for _ in range(8)]
    assert 0.0 in corners and 200.0 in corners  # black corners where rotated, half of the time
    sizes = set()
    for seed in range(20):
        crop.set_random_state(seed=seed)
        sizes.update(crop({"image": torch.zeros(3, 128, 128)})["image"].shape[1:])
    assert min(sizes) >= 96 and max(sizes) <= 128 and len(sizes) > 5
    assert tuple(resize.resizer.spatial_size) == (128, 128)
