"""Stain conversions, RandStainJitterd, deterministic stain shifts and Reinhard / Macenko normalisation.

Real images: a synthetic H&E-like image composed from smooth random H and E concentration fields, and
scikit-image's bundled H-DAB photograph (``skimage.data.immunohistochemistry``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image
from skimage import data
from skimage.color import hsv2rgb, rgb2hed, rgb2hsv
from skimage.filters import gaussian

from stas_pipeline.core.datalist import write_datalist
from stas_pipeline.core.images import read_rgb
from stas_pipeline.core.options import STAIN_SHIFTS, parse_stain_shift
from stas_pipeline.core.stain import (
    RandStainJitterd,
    StainNormalized,
    StainShiftd,
    _hsv_to_rgb,
    _rgb_to_hsv,
    fit_stain_target,
    fit_stain_target_to,
    hed_to_rgb,
    normalize_stain,
    read_stain_target,
    rgb_to_hed,
    stain_shift,
)

LN_1E6 = np.log(1e6)
HE_OD = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])  # unit H and E OD vectors


def he_image(seed: int = 0, shape: tuple[int, int] = (96, 128)) -> np.ndarray:
    """(H, W, 3) uint8 H&E-like tissue: smooth random H in [0.2, 1.0] and E in [0.2, 0.8] (ln OD) composed with
    the H&E optical-density vectors of Macenko's reference (``HE_OD``), I = 255 exp(-C HE_OD); every pixel is
    mid-range (about 75..210).

    Not skimage's ``hed2rgb``: its eosin vector absorbs almost no red or blue, so eosin-rich pixels fall under
    Macenko's OD threshold in those channels and the eosin vector is misestimated (measured with such an image:
    Macenko took the (1.3, 0.8, 1) shift's error only from 7.35 to 5.52)."""
    rng = np.random.default_rng(seed)
    h, e = (gaussian(rng.random(shape), sigma=6) for _ in range(2))
    h, e = ((f - f.min()) / np.ptp(f) for f in (h, e))
    conc = np.stack([0.2 + 0.8 * h, 0.2 + 0.6 * e], -1)
    return np.round(255 * np.exp(-conc @ HE_OD)).astype(np.uint8)


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    return he_image()


@pytest.fixture(scope="module")
def ihc() -> np.ndarray:
    return data.immunohistochemistry()  # (512, 512, 3) uint8, shipped inside scikit-image


def chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))


# --- conversions ---------------------------------------------------------------------------------------------------


def test_rgb_to_hed_matches_skimage_and_round_trips(ihc):
    x = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 254 + 1
    for image in (x, chw(ihc).double()):
        hed = rgb_to_hed(image)
        ours = hed.permute(1, 2, 0).numpy()
        ref = rgb2hed(image.permute(1, 2, 0).numpy() / 255) * LN_1E6
        positive = ref > 0
        np.testing.assert_allclose(ours[positive], ref[positive], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(np.maximum(ours, 0), ref, rtol=1e-9, atol=1e-9)
        assert (ours < 0).any()  # unclamped
    x32 = x.float()
    assert (hed_to_rgb(rgb_to_hed(x32)) - x32).abs().max() <= 1e-3
    batch = torch.stack([x32, x32.flip(-1)])
    assert torch.allclose(rgb_to_hed(batch)[1], rgb_to_hed(x32.flip(-1)))
    assert (hed_to_rgb(rgb_to_hed(batch)) - batch).abs().max() <= 1e-3
    assert hed_to_rgb(torch.full((3, 2, 2), -5.0)).max() == 255  # clipped


def test_hsv_helpers_match_skimage():
    x = torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[:, :5] = x[:1, :5]  # grey pixels: hue and saturation 0
    hsv = _rgb_to_hsv(x)
    np.testing.assert_allclose(hsv.permute(1, 2, 0).numpy(), rgb2hsv(x.permute(1, 2, 0).numpy()), atol=1e-12)
    back = _hsv_to_rgb(hsv).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, hsv2rgb(hsv.permute(1, 2, 0).numpy()), atol=1e-12)
    np.testing.assert_allclose(back, x.permute(1, 2, 0).numpy(), atol=1e-12)


# --- RandStainJitterd ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uint8 tensor", "float32 array", "float64 MetaTensor"])
def test_jitter_with_zero_ranges_is_identity(he, kind):
    img = {"uint8 tensor": chw(he), "float32 array": np.moveaxis(he, -1, 0).astype(np.float32) + 0.25,
           "float64 MetaTensor": MetaTensor(chw(he).double())}[kind]
    before = img.clone() if isinstance(img, torch.Tensor) else img.copy()
    out = RandStainJitterd("image")({"image": img})["image"]
    assert out is img and type(out) is type(img) and out.dtype == before.dtype
    assert (out == before).all()


def test_hed_jitter_keeps_mean_concentrations_in_range_and_label_untouched(he):
    """alpha ~ U(0.95, 1.05), beta ~ U(-0.05, 0.05) per stain: the mean H and E of each jittered image lie in
    [(1 - r) m - r, (1 + r) m + r] (float image, no clipping at these mid-range pixels)."""
    r = 0.05
    img = chw(he).float()
    m = rgb_to_hed(img).mean((-2, -1))[:2]
    label = torch.from_numpy(np.random.default_rng(0).integers(0, 2, (1, *he.shape[:2]), dtype=np.uint8))
    label_before = label.clone()
    jitter = RandStainJitterd("image", hed=r)
    jitter.set_random_state(3)
    means = []
    for _ in range(50):
        out = jitter({"image": img, "label": label})
        assert out["label"] is label and torch.equal(label, label_before)
        assert out["image"].dtype == torch.float32 and out["image"].shape == img.shape
        assert 0 < out["image"].min() and out["image"].max() < 255
        means.append(rgb_to_hed(out["image"]).mean((-2, -1))[:2])
    means = torch.stack(means)
    assert ((1 - r) * m - r - 1e-4 <= means).all() and (means <= (1 + r) * m + r + 1e-4).all()
    assert (means.std(0) > 0.01).all()  # the draws spread


def test_jitter_reproducible_typed_and_prob(he):
    img = chw(he)
    jitter = RandStainJitterd("image", hed=0.05, hsv=0.1, brightness_contrast=0.1)
    runs = []
    for _ in range(2):
        jitter.set_random_state(7)
        runs.append([jitter({"image": img})["image"] for _ in range(3)])
    for a, b in zip(*runs, strict=True):
        assert a.dtype == torch.uint8 and a.shape == img.shape and torch.equal(a, b)
        assert not torch.equal(a, img)
    assert not torch.equal(runs[0][0], runs[0][1])
    meta = MetaTensor(img.float(), meta={"filename_or_obj": "x.png"})
    out = jitter({"image": meta})["image"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and out.meta["filename_or_obj"] == "x.png"
    arr = np.moveaxis(he, -1, 0)
    out = jitter({"image": arr})["image"]
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == arr.shape
    never = RandStainJitterd("image", hed=0.5, hsv=0.5, brightness_contrast=0.5, prob=0.0)
    assert never({"image": img})["image"] is img


def test_hsv_and_brightness_contrast_jitter(he):
    grey = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    jitter = RandStainJitterd("image", hsv=0.3)
    jitter.set_random_state(0)
    for _ in range(5):
        out = jitter({"image": grey})["image"]
        assert (out == out[:1]).all()  # no saturation to scale, no hue to turn: grey stays grey
    bc = RandStainJitterd("image", brightness_contrast=0.3)
    bc.set_random_state(0)
    outs = torch.stack([bc({"image": chw(he).float()})["image"].mean() for _ in range(20)])
    assert outs.std() > 1 and ((outs - chw(he).float().mean()).abs() <= 0.3 * 255).all()


@pytest.mark.parametrize("name, value", [("hed", -0.1), ("hsv", "0.1"), ("brightness_contrast", True),
                                         ("hed", float("nan")), ("prob", 1.5)])
def test_jitter_rejects_bad_ranges(name, value):
    with pytest.raises(ValueError, match=f"RandStainJitterd: {name}"):
        RandStainJitterd("image", **{name: value})


def test_jitter_rejects_non_rgb():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        RandStainJitterd("image", hed=0.1)({"image": torch.zeros(1, 4, 4)})


# --- deterministic shifts ------------------------------------------------------------------------------------------


def test_stain_shifts(he, ihc):
    for image in (he, ihc):
        same = stain_shift(image, STAIN_SHIFTS["none"])
        assert same.dtype == np.uint8 and same.shape == image.shape
        assert np.abs(same.astype(int) - image).max() <= 1
        assert stain_shift(image, STAIN_SHIFTS["darker"]).mean() < image.mean() < stain_shift(image, (0.8,) * 3).mean()
    assert stain_shift(he, STAIN_SHIFTS["more_h"])[..., 0].mean() < he[..., 0].mean()  # more H absorbs red
    assert all(isinstance(f, float) for v in STAIN_SHIFTS.values() for f in v)


def test_stain_shift_transform_is_the_function_on_chw_and_leaves_the_label(he):
    label = torch.zeros(1, *he.shape[:2])
    chw = torch.from_numpy(np.moveaxis(he, -1, 0).copy())
    out = StainShiftd("image", STAIN_SHIFTS["more_e"])({"image": chw, "label": label})
    assert out["image"].dtype == torch.uint8 and out["label"] is label
    assert np.array_equal(np.moveaxis(out["image"].numpy(), 0, -1), stain_shift(he, STAIN_SHIFTS["more_e"]))
    as_float = StainShiftd("image", STAIN_SHIFTS["more_e"])({"image": chw.float()})["image"]
    assert as_float.dtype == torch.float32 and torch.equal(as_float, out["image"].float())
    assert StainShiftd("image", STAIN_SHIFTS["none"])({"image": chw})["image"] is chw


def test_parse_stain_shift():
    assert parse_stain_shift("darker") == (1.25, 1.25, 1.25)
    assert parse_stain_shift("h=1.2,e=0.9") == (1.2, 0.9, 1.0)
    assert parse_stain_shift(" d = 0.5 ") == (1.0, 1.0, 0.5)
    for bad in ("purple", "h=abc", "x=1", "h=1,h=2", "h=-1", "h=1.2;e=1", ""):
        with pytest.raises(ValueError, match="none, darker, lighter, more_h, less_h, more_e, less_e"):
            parse_stain_shift(bad)


# --- normalisation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_name", ["he", "ihc"])
@pytest.mark.parametrize("method", ["reinhard", "macenko"])
@pytest.mark.parametrize("shift", [(1.3, 0.8, 1.0), STAIN_SHIFTS["darker"]])
def test_normalisation_undoes_a_stain_shift(request, image_name, method, shift):
    """A target fitted on the original; a stain-shifted copy normalised to it. Mean absolute RGB error to the
    original, before -> after normalising, as measured:

    =========  ====================  ==============  ====================  ==============
    image      reinhard (1.3, 0.8)   reinhard dark   macenko (1.3, 0.8)    macenko dark
    =========  ====================  ==============  ====================  ==============
    he         4.93 -> 0.63          17.66 -> 0.11   4.93 -> 1.90          17.66 -> 1.82
    ihc        7.83 -> 3.36          14.99 -> 1.47   7.83 -> 1.78          14.99 -> 1.47
    =========  ====================  ==============  ====================  ==============
    """
    image = request.getfixturevalue(image_name)
    target = fit_stain_target(method, [image])
    shifted = stain_shift(image, shift)
    normalised = normalize_stain(shifted, target)
    assert normalised.dtype == np.uint8 and normalised.shape == image.shape
    before = np.abs(shifted.astype(float) - image).mean()
    after = np.abs(normalised.astype(float) - image).mean()
    assert after <= before / 2


def test_fit_stain_target_values(he):
    for method, keys in (("reinhard", {"mean", "std"}), ("macenko", {"stain_matrix", "max_concentrations"})):
        target = fit_stain_target(method, [he, he[::2]])
        assert set(target) == {"method"} | keys and json.loads(json.dumps(target)) == target
        assert all(type(v) is float for k in keys for v in np.ravel(target[k]).tolist())
        assert read_stain_target(target) is target
    macenko = fit_stain_target("macenko", [he])
    h, e = np.asarray(macenko["stain_matrix"])
    assert h[0] > e[0] and np.allclose(np.linalg.norm([h, e], axis=1), 1)
    with pytest.raises(ValueError, match="reinhard, macenko"):
        fit_stain_target("vahadane", [he])
    with pytest.raises(ValueError, match="too little tissue"):
        fit_stain_target("macenko", [np.full((32, 32, 3), 250, np.uint8)])


def test_macenko_leaves_an_image_without_tissue_unchanged(he):
    blank = np.full((32, 32, 3), 250, np.uint8)
    assert normalize_stain(blank, fit_stain_target("macenko", [he])) is blank


def test_stain_normalized_transform(he):
    img = chw(he)
    for none in (None, "none"):
        assert StainNormalized("image", target=none)({"image": img})["image"] is img
    target = fit_stain_target("reinhard", [he_image(seed=1)])
    expected = normalize_stain(he, target)
    transform = StainNormalized("image", target=target)
    for img in (chw(he), MetaTensor(chw(he).float()), np.moveaxis(he, -1, 0).astype(np.float64)):
        out = transform({"image": img, "label": "x"})
        assert type(out["image"]) is type(img) and out["image"].dtype == img.dtype and out["image"].shape == img.shape
        assert out["label"] == "x"
        assert (np.asarray(out["image"]) == np.moveaxis(expected, -1, 0)).all()


def test_read_stain_target(tmp_path, he):
    target = fit_stain_target("macenko", [he])
    path = tmp_path / "target.json"
    path.write_text(json.dumps(target))
    assert read_stain_target(str(path)) == target
    assert read_stain_target(json.dumps(target, sort_keys=True)) == target
    for none in (None, "", "none", " None "):
        assert read_stain_target(none) is None
    with pytest.raises(ValueError, match="'max_concentrations'"):
        read_stain_target({"method": "macenko", "stain_matrix": target["stain_matrix"]})
    with pytest.raises(ValueError, match="'stain_matrix' must be 2 x 3"):
        read_stain_target({**target, "stain_matrix": [1, 2, 3]})
    with pytest.raises(ValueError, match="'method' must be one of reinhard, macenko"):
        read_stain_target('{"mean": [0, 0, 0]}')
    Image.fromarray(he).save(tmp_path / "ref.png")
    with pytest.raises(ValueError, match="fit_stain_target"):
        read_stain_target(str(tmp_path / "ref.png"))
    with pytest.raises(ValueError, match="cannot read"):
        read_stain_target(str(tmp_path / "missing.json"))


def test_fit_stain_target_to(tmp_path, he):
    assert fit_stain_target_to("none", "", "", 0) == "" and fit_stain_target_to(None, "", "", 0) == ""
    Image.fromarray(he).save(tmp_path / "ref.png")
    assert fit_stain_target_to("macenko", str(tmp_path / "ref.png"), "", 0) == json.dumps(
        fit_stain_target("macenko", [he]), sort_keys=True)

    folder = tmp_path / "images"
    folder.mkdir()

    def write_fold0(colour):
        for i in range(2):
            Image.fromarray(np.full((24, 32, 3), colour, np.uint8)).save(folder / f"f0_{i}.png")

    training = [{"image": f"images/f0_{i}.png", "label": 0, "fold": 0} for i in range(2)]
    for k in (1, 2):
        for i in range(2):
            Image.fromarray(he_image(seed=10 * k + i, shape=(24, 32))).save(folder / f"f{k}_{i}.png")
            training.append({"image": f"images/f{k}_{i}.png", "label": 1, "fold": k})
    datalist = tmp_path / "datalist.json"
    write_datalist(datalist, {"training": training, "test": []}, "classification", "number")

    write_fold0((20, 200, 20))
    green = fit_stain_target_to("reinhard", "", str(datalist), 0)
    all_green = fit_stain_target_to("reinhard", "", str(datalist), -1)
    write_fold0((20, 20, 200))
    assert fit_stain_target_to("reinhard", "", str(datalist), 0) == green  # fold 0 is left out
    assert fit_stain_target_to("reinhard", "", str(datalist), -1) != all_green
    seen = []

    def loader(entry):
        seen.append(entry["image"])
        return {"image": read_rgb(entry["image"])}

    assert fit_stain_target_to("reinhard", "", str(datalist), 0, loader=loader) == green
    assert sorted(seen) == sorted(str(folder / f"f{k}_{i}.png") for k in (1, 2) for i in range(2))
    one = json.loads(fit_stain_target_to("reinhard", "", str(datalist), 0, max_images=1, seed=5))
    assert one != json.loads(green) and one["method"] == "reinhard"
    with pytest.raises(ValueError, match="reinhard, macenko"):
        fit_stain_target_to("vahadane", "", str(datalist), 0)
