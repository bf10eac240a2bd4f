"""H&E stain augmentation, deterministic stain shifts and stain normalisation (Reinhard, Macenko).

Units. RGB is on the 0..255 scale. Stain concentrations (H, E, D) are natural-log optical densities unmixed with
scikit-image's own matrices (``hed_from_rgb`` / ``rgb_from_hed`` of ``skimage.color.colorconv``, Ruifrok &
Johnston 2001): ``c = -ln(max(rgb / 255, 1e-6)) @ hed_from_rgb``, which is exactly
``skimage.color.rgb2hed(rgb / 255) * ln(1e6)`` before skimage's clamp at 0 (skimage divides by ln(1e-6) and
clamps; here nothing is clamped), and ``rgb = 255 * exp(-c @ rgb_from_hed)`` back, clipped to 0..255.

- :class:`RandStainJitterd`: random HED jitter (Tellez et al. 2018), HSV jitter and brightness/contrast jitter
  for the training chain.
- :func:`stain_shift`, :class:`StainShiftd`: fixed multiplicative shifts of the concentrations (named in
  core/options.py's ``STAIN_SHIFTS``, read by its ``parse_stain_shift``), to re-score a model on stain-shifted
  copies of its test images (``stas predict --stain-shift``, ``benchmarks/shift_check.py``).
- :func:`fit_stain_target`, :func:`normalize_stain`, :class:`StainNormalized`, :func:`read_stain_target`,
  :func:`fit_stain_target_to`: Reinhard (LAB mean/std) and Macenko (stain vectors and max concentrations)
  normalisation to a target fitted on reference images; a target is a JSON-able dict.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type
from skimage.color import lab2rgb, rgb2lab
from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

from stas_pipeline.core.datalist import load_fold
from stas_pipeline.core.images import read_rgb

RGB_FLOOR = 1e-6  # skimage's floor on rgb / 255 before the log
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale

METHODS = ("reinhard", "macenko")
TARGET_KEYS = {"reinhard": ("mean", "std"), "macenko": ("stain_matrix", "max_concentrations")}
MACENKO_IO, MACENKO_ALPHA, MACENKO_BETA = 240.0, 1.0, 0.15
MIN_TISSUE_PIXELS = 100  # fewer OD-thresholded pixels: no stain vectors can be estimated
MAX_FIT_PIXELS = 2_000_000


def _mix(x: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """``x`` (..., 3, H, W) with its channel vector v at each pixel replaced by ``v @ matrix``."""
    m = torch.as_tensor(matrix.T, dtype=x.dtype, device=x.device)
    return (m @ x.flatten(-2)).reshape(x.shape)


def rgb_to_hed(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) RGB on 0..255 -> HED concentrations (ln OD) of the same shape, unclamped."""
    x = image if torch.is_floating_point(image) else image.float()
    return _mix(-torch.log(torch.clamp(x / 255, min=RGB_FLOOR)), hed_from_rgb)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """HED concentrations (ln OD), (3, H, W) or (B, 3, H, W) -> RGB on 0..255 (float, clipped)."""
    return torch.clamp(255 * torch.exp(-_mix(hed, rgb_from_hed)), 0, 255)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB on [0, 1] -> HSV on [0, 1] (hue as a fraction of the circle)."""
    r, g, b = x.unbind(-3)
    maxc, minc = x.amax(-3), x.amin(-3)
    delta = maxc - minc
    grey = delta == 0
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(grey, torch.ones_like(delta), delta)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = torch.where(grey, torch.zeros_like(h), torch.remainder(h / 6, 1.0))
    return torch.stack((h, s, maxc), -3)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(3, H, W) HSV on [0, 1] -> RGB on [0, 1]: channel n (R, G, B: n = 5, 3, 1) is
    v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6."""
    h, s, v = hsv.unbind(-3)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device).view(3, 1, 1)
    k = torch.remainder(n + 6 * h, 6)
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _range(transform: str, name: str, value: object) -> float:
    """``value`` as a float >= 0, or ValueError naming ``transform`` and ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < math.inf:
        raise ValueError(f"{transform}: {name} must be a number >= 0 (0 = off), got {value!r}")
    return float(value)


def _check_rgb_chw(img: NdarrayOrTensor, transform: str) -> None:
    """A (3, H, W) image, or ValueError naming ``transform`` and the shape."""
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"{transform} expects a (3, H, W) RGB image, got shape {tuple(img.shape)}")


class RandStainJitterd(RandomizableTransform, MapTransform):
    """Stain colour jitter of ``keys``: (3, H, W) RGB images on the 0..255 scale (uint8 or floats), as tensors,
    MetaTensors or arrays; each comes back with its type, dtype and shape (integers rounded), clipped to 0..255.

    In this order, each skipped when its range is 0 (all 0: the images are returned as they are):

    - ``hed``: per stain channel, c' = alpha c + beta on the concentrations of :func:`rgb_to_hed`, with
      alpha ~ U(1 - hed, 1 + hed) and beta ~ U(-hed, hed) (Tellez et al. 2018).
    - ``hsv``: hue shifted by U(-hsv / 2, hsv / 2) of the circle, saturation and value multiplied by factors
      ~ U(1 - hsv, 1 + hsv) (each clipped to [0, 1]).
    - ``brightness_contrast``: the image multiplied by a factor ~ U(1 - bc, 1 + bc), then blended with its mean
      grey by a contrast factor ~ U(1 - bc, 1 + bc) (torchvision's ``adjust_contrast``).

    ``prob``: the chance that a sample is jittered at all. Every number is drawn from ``self.R`` (the same count
    per call), so ``set_random_state`` / MONAI's per-worker seeding make runs reproducible; all ``keys`` of one
    sample get the same jitter."""

    def __init__(
        self,
        keys: KeysCollection,
        hed: float = 0.0,
        hsv: float = 0.0,
        brightness_contrast: float = 0.0,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ):
        name = type(self).__name__
        self.hed = _range(name, "hed", hed)
        self.hsv = _range(name, "hsv", hsv)
        self.brightness_contrast = _range(name, "brightness_contrast", brightness_contrast)
        if isinstance(prob, bool) or not isinstance(prob, Real) or not 0.0 <= prob <= 1.0:
            raise ValueError(f"{name}: prob must be a number in [0, 1], got {prob!r}")
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        self._alpha, self._beta = np.ones(3), np.zeros(3)
        self._hue, self._sat, self._val, self._brightness, self._contrast = 0.0, 1.0, 1.0, 1.0, 1.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        r, h, bc = self.hed, self.hsv, self.brightness_contrast
        self._alpha, self._beta = self.R.uniform(1 - r, 1 + r, size=3), self.R.uniform(-r, r, size=3)
        self._hue = float(self.R.uniform(-h / 2, h / 2))
        self._sat, self._val = (float(f) for f in self.R.uniform(1 - h, 1 + h, size=2))
        self._brightness, self._contrast = (float(f) for f in self.R.uniform(1 - bc, 1 + bc, size=2))

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform or self.hed == self.hsv == self.brightness_contrast == 0:
            return d
        for key in self.key_iterator(d):
            d[key] = self._jitter(d[key])
        return d

    def _jitter(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        _check_rgb_chw(img, type(self).__name__)
        x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        integral, x = not torch.is_floating_point(x), x.float()
        if self.hed:
            alpha = torch.as_tensor(self._alpha, dtype=x.dtype, device=x.device).view(3, 1, 1)
            beta = torch.as_tensor(self._beta, dtype=x.dtype, device=x.device).view(3, 1, 1)
            x = hed_to_rgb(alpha * rgb_to_hed(x) + beta)
        if self.hsv:
            h, s, v = _rgb_to_hsv(torch.clamp(x / 255, 0, 1)).unbind(-3)
            h = torch.remainder(h + self._hue, 1.0)
            hsv = torch.stack((h, torch.clamp(s * self._sat, 0, 1), torch.clamp(v * self._val, 0, 1)), -3)
            x = 255 * _hsv_to_rgb(hsv)
        if self.brightness_contrast:
            x = torch.clamp(x * self._brightness, 0, 255)
            weights = torch.tensor(GREY_WEIGHTS, dtype=x.dtype, device=x.device).view(3, 1, 1)
            mean = (x * weights).sum(-3).mean()
            x = self._contrast * x + (1 - self._contrast) * mean
        x = torch.clamp(x, 0, 255)
        return convert_to_dst_type(torch.round(x) if integral else x, dst=img)[0]


def stain_shift(image: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    """(H, W, 3) uint8 with its (H, E, D) concentrations multiplied by ``factors``: (H, W, 3) uint8 (rounded)."""
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0))).float()
    f = torch.tensor(factors, dtype=x.dtype).view(3, 1, 1)
    out = torch.round(hed_to_rgb(rgb_to_hed(x) * f)).to(torch.uint8)
    return np.ascontiguousarray(np.moveaxis(out.numpy(), 0, -1))


def _on_uint8_hwc(img: NdarrayOrTensor, fn: Callable[[np.ndarray], np.ndarray], transform: str) -> NdarrayOrTensor:
    """``fn`` of a (3, H, W) image on the 0..255 scale as (H, W, 3) uint8 (rounded, clipped), back in the image's
    type, dtype and layout."""
    _check_rgb_chw(img, transform)
    chw = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    out = fn(_as_uint8_hwc(np.moveaxis(chw, 0, -1)))
    return convert_to_dst_type(np.ascontiguousarray(np.moveaxis(out, -1, 0)), dst=img)[0]


class StainShiftd(MapTransform):
    """:func:`stain_shift` of ``keys`` by ``factors``: (3, H, W) images on the 0..255 scale (rounded and clipped
    to uint8 first), each returned with its type, dtype and shape; factors (1, 1, 1) return the data as it is."""

    def __init__(self, keys: KeysCollection, factors: tuple[float, float, float],
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.factors = tuple(float(f) for f in factors)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict:
        d = dict(data)
        if self.factors == (1.0, 1.0, 1.0):
            return d
        for key in self.key_iterator(d):
            d[key] = _on_uint8_hwc(d[key], lambda hwc: stain_shift(hwc, self.factors), type(self).__name__)
        return d


def _as_uint8_hwc(image: object) -> np.ndarray:
    """An (H, W, 3) image (array or tensor, 0..255) as a uint8 array (rounded, clipped)."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    return arr if arr.dtype == np.uint8 else np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _pooled_pixels(images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, 3) uint8 pixels of all ``images``, every k-th one when there are more than MAX_FIT_PIXELS in all."""
    pixels = [_as_uint8_hwc(img).reshape(-1, 3) for img in images]
    step = max(1, math.ceil(sum(len(p) for p in pixels) / MAX_FIT_PIXELS))
    return np.concatenate([p[::step] for p in pixels])


def _lab_stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of skimage's ``rgb2lab`` of (N, 3) uint8 pixels."""
    lab = rgb2lab(pixels).reshape(-1, 3)
    return lab.mean(0), lab.std(0)


def _macenko(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Macenko et al. 2009 on (N, 3) uint8 pixels: (stain matrix (2, 3) H first, concentrations (N, 2), their
    99th percentiles), or None when fewer than MIN_TISSUE_PIXELS pixels have every OD channel > beta or a 99th
    percentile is not > 0 (too little tissue to rescale by)."""
    od = -np.log((pixels.astype(np.float64) + 1) / MACENKO_IO)
    tissue = od[(od > MACENKO_BETA).all(1)]
    if len(tissue) < MIN_TISSUE_PIXELS:
        return None
    plane = np.linalg.eigh(np.cov(tissue.T))[1][:, [2, 1]]  # the two principal axes, largest first
    if plane[:, 0] @ tissue.mean(0) < 0:  # the tissue projects on the positive side: its angles do not wrap at pi
        plane[:, 0] *= -1
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [MACENKO_ALPHA, 100 - MACENKO_ALPHA])
    v1, v2 = (plane @ np.array([np.cos(a), np.sin(a)]) for a in (lo, hi))
    stains = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1])  # haematoxylin: the larger red component
    conc = np.linalg.lstsq(stains.T, od.T, rcond=None)[0].T
    max_conc = np.percentile(conc, 99, axis=0)
    return (stains, conc, max_conc) if (max_conc > 0).all() else None


def fit_stain_target(method: str, images: Sequence[np.ndarray]) -> dict:
    """A normalisation target fitted to the pooled pixels of ``images`` ((H, W, 3) uint8; at most about
    MAX_FIT_PIXELS of them, every k-th): ``{"method": "reinhard", "mean": [L, a, b], "std": [L, a, b]}`` (skimage's
    ``rgb2lab``) or ``{"method": "macenko", "stain_matrix": [[H], [E]], "max_concentrations": [H, E]}`` (unit OD
    vectors with Io = 240; the concentrations' 99th percentiles)."""
    if method not in METHODS:
        raise ValueError(f"stain normalisation method {method!r}: expected one of {', '.join(METHODS)}")
    if not images:
        raise ValueError("fit_stain_target: no images to fit a target to")
    pixels = _pooled_pixels(images)
    if method == "reinhard":
        mean, std = _lab_stats(pixels)
        return {"method": method, "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    fitted = _macenko(pixels)
    if fitted is None:
        raise ValueError(f"fit_stain_target: too little tissue in the reference images for a Macenko target (at "
                         f"least {MIN_TISSUE_PIXELS} pixels with every optical density > {MACENKO_BETA}, and "
                         "positive 99th-percentile concentrations)")
    stains, _, max_conc = fitted
    return {"method": method, "stain_matrix": [[float(v) for v in row] for row in stains],
            "max_concentrations": [float(v) for v in max_conc]}


def normalize_stain(image: np.ndarray, target: dict) -> np.ndarray:
    """(H, W, 3) uint8 normalised to ``target`` (:func:`fit_stain_target`): (H, W, 3) uint8 (rounded).

    Reinhard: each LAB channel's mean and std (the image's std floored at 1e-6) moved to the target's. Macenko:
    the image's own stain matrix and max concentrations; concentrations rescaled to the target's max and
    recomposed with the target's matrix, I = 240 exp(-C M). An image with too little tissue for that (fewer than 100
    stained pixels, or a max concentration not > 0) is returned unchanged by Macenko."""
    pixels = _as_uint8_hwc(image).reshape(-1, 3)
    if target["method"] == "reinhard":
        mean, std = _lab_stats(pixels)
        lab = (rgb2lab(pixels) - mean) / np.maximum(std, 1e-6) * np.asarray(target["std"]) + np.asarray(target["mean"])
        with warnings.catch_warnings():  # colours out of the RGB gamut are clipped, as intended
            warnings.filterwarnings("ignore", message=".*negative Z values.*", category=UserWarning)
            rgb = lab2rgb(lab) * 255
    else:
        fitted = _macenko(pixels)
        if fitted is None:
            return image
        _, conc, max_conc = fitted
        conc = conc * (np.asarray(target["max_concentrations"]) / max_conc)
        rgb = MACENKO_IO * np.exp(-conc @ np.asarray(target["stain_matrix"]))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(image.shape)


def _check_target(target: dict) -> dict:
    """``target`` itself when it has a known method and that method's keys; ValueError naming what is missing."""
    method = target.get("method")
    if method not in METHODS:
        raise ValueError(f"stain target: 'method' must be one of {', '.join(METHODS)}, got {method!r}")
    missing = [k for k in TARGET_KEYS[method] if k not in target]
    if missing:
        raise ValueError(f"stain target ({method}): missing {', '.join(repr(k) for k in missing)}")
    shapes = {"mean": (3,), "std": (3,), "stain_matrix": (2, 3), "max_concentrations": (2,)}
    for key in TARGET_KEYS[method]:
        try:
            value = np.asarray(target[key], dtype=np.float64)
        except (TypeError, ValueError):
            value = np.empty(0)
        if value.shape != shapes[key] or not np.isfinite(value).all():
            raise ValueError(f"stain target ({method}): {key!r} must be {' x '.join(map(str, shapes[key]))} "
                             f"numbers, got {target[key]!r}")
    return target


def read_stain_target(target: str | dict | None) -> dict | None:
    """A normalisation target: None for None, "" or "none"; a dict (checked) as it is; a string starting with
    "{" as JSON text; else the path of a ``.json`` file holding one. ValueError for anything else (an image's
    path included: fit a target to it with :func:`fit_stain_target`)."""
    if target is None:
        return None
    if isinstance(target, dict):
        return _check_target(target)
    text = target.strip()
    if text.lower() in ("", "none"):
        return None
    if text.startswith("{"):
        try:
            return _check_target(json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"stain target: not valid JSON: {err}") from None
    path = Path(text)
    if path.suffix.lower() != ".json":
        raise ValueError(f"stain target {text!r}: expected a .json file with a target (an image does not say the "
                         "method: fit one with fit_stain_target), JSON text, or 'none'")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"stain target {text!r}: cannot read it: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"stain target {text!r}: not a JSON object")
    return _check_target(raw)


class StainNormalized(MapTransform):
    """:func:`normalize_stain` of ``keys`` to ``target`` (anything :func:`read_stain_target` reads; None: the
    data is returned as it is). ``keys``: (3, H, W) images on the 0..255 scale (uint8 or floats, rounded and
    clipped to uint8 first) as tensors, MetaTensors or arrays; each comes back with its type, dtype and shape."""

    def __init__(self, keys: KeysCollection, target: str | dict | None = None, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.target = read_stain_target(target)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict:
        d = dict(data)
        if self.target is None:
            return d
        for key in self.key_iterator(d):
            d[key] = _on_uint8_hwc(d[key], lambda hwc: normalize_stain(hwc, self.target), type(self).__name__)
        return d


def fit_stain_target_to(method: str | None, reference: str, datalist: str, fold: int,
                        loader: Callable[[dict], Mapping] | None = None, max_images: int = 32, seed: int = 0) -> str:
    """The target a bundle normalises to, as ``json.dumps(target, sort_keys=True)``; "" for method None, "" or
    "none". Fitted to the image at ``reference`` when given, else to up to ``max_images`` entries of the
    datalist's training section outside ``fold`` (every entry when ``fold`` < 0), picked by
    ``random.Random(seed).sample``; each read by ``loader(entry)["image"]`` ((H, W, 3), paths resolved against
    the datalist's folder) or else by :func:`read_rgb`."""
    if method is None or method.strip().lower() in ("", "none"):
        return ""
    if method not in METHODS:
        raise ValueError(f"stain normalisation method {method!r}: expected one of none, {', '.join(METHODS)}")
    if reference:
        images = [read_rgb(reference)]
    else:
        train, _ = load_fold(datalist, -1 if fold < 0 else fold)
        picked = random.Random(seed).sample(train, min(max_images, len(train)))
        images = [_as_uint8_hwc(loader(e)["image"]) if loader else read_rgb(e["image"]) for e in picked]
    return json.dumps(fit_stain_target(method, images), sort_keys=True)
