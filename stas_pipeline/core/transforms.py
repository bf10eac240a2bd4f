"""Transforms that MONAI has no ready-made equivalent for.

Every chain a bundle declares starts with :class:`LoadRGBImaged`: MONAI's ``LoadImaged`` with the image policy of
:func:`stas_pipeline.core.images.to_rgb` (every image 8-bit RGB) on the image key, masks read as stored.

Fundus photographs (the glaucoma classification task) are preprocessed by a chain that a bundle declares::

    LoadRGBImaged(reverse_indexing=False) -> EnsureChannelFirstd
      -> FundusBorderCropd(threshold=10)      crop to the bounding box of the non-black pixels
      -> CenterScaleCropd(roi_scale=f)        MONAI's own: the centre f x H by f x W (ceil), f = 1.0 keeps the image
      -> Resized(spatial_size=(512, 512))

on (C, H, W) images on the 0..255 scale (uint8 or floats); intensity scaling comes after the cache. Every
parameter is an attribute of the transform or of its members, so the cache's description of the chain
(:func:`stas_pipeline.core.lmdb_cache.describe`) changes with it. ``CenterScaleCropd`` is used as MONAI ships it:
a fraction <= 0 means 1.0 and a fraction > 1 crops nothing (it never pads).

:class:`RandAugMixd` (timm's AugMix) and :class:`RandColorJitterd` (torchvision's ColorJitter) are MONAI randomizable
dictionary transforms for the training chain (after the cache, before intensity scaling).

The segmentation bundles' augmentation set (``bundles/augment.json``, after the crops, on images scaled to 0..1)
is MONAI's own transforms plus three that MONAI lacks: :class:`BackgroundFilld` (a spatial transform whose border
is the slide's background colour, not black), :class:`RandOpticalDistortiond` (lens distortion) and
:class:`RandCLAHEd` (scikit-image's CLAHE).
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor, PILReader
from monai.transforms import CropForegroundd, LoadImaged, MapTransform, Randomizable, RandomizableTransform
from monai.utils import convert_to_dst_type, ensure_tuple, ensure_tuple_rep
from PIL import Image
from skimage.exposure import equalize_adapthist
from timm.data.auto_augment import augment_and_mix_transform
from torchvision.transforms import functional as TF

from stas_pipeline.core.images import to_rgb


class RGBReader(PILReader):
    """MONAI's ``PILReader`` with the image policy: every image it reads comes out 8-bit RGB (:func:`to_rgb`)."""

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs) -> Image.Image | list[Image.Image]:
        images = super().read(data, **kwargs)
        rgb = [to_rgb(img, name) for img, name in zip(ensure_tuple(images), ensure_tuple(data), strict=True)]
        return rgb if isinstance(images, list) else rgb[0]


class LoadRGBImaged(LoadImaged):
    """MONAI's ``LoadImaged`` (PIL, ``image_only``) reading ``rgb_keys`` (the image) by the image policy
    (:class:`RGBReader`: 8-bit RGB) and every other key (a mask) as stored (``PILReader``). On an RGB image it gives
    exactly what ``LoadImaged(reader="PILReader")`` gives."""

    def __init__(self, keys: KeysCollection, rgb_keys: KeysCollection = "image", reverse_indexing: bool = True,
                 allow_missing_keys: bool = False):
        super().__init__(keys, reader="PILReader", image_only=True, allow_missing_keys=allow_missing_keys,
                         reverse_indexing=reverse_indexing)
        self.rgb_keys = ensure_tuple(rgb_keys)
        self.rgb_reader = RGBReader(reverse_indexing=reverse_indexing)

    def __call__(self, data: dict, reader: PILReader | None = None) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._loader(d[key], self.rgb_reader if key in self.rgb_keys else reader)
        return d


class ResizeLiked(MapTransform):
    """Resize ``keys`` (C x H x W) of one decollated sample to the spatial size of ``data[like]``: a prediction
    made at the training size is brought back to the original resolution of the mask it is scored against."""

    def __init__(self, keys: KeysCollection, like: str = "label", mode: str = "bilinear"):
        super().__init__(keys)
        self.like, self.mode = like, mode

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        size = tuple(d[self.like].shape[-2:])
        align = False if self.mode in ("bilinear", "bicubic") else None
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            d[key] = F.interpolate(x[None].float(), size=size, mode=self.mode, align_corners=align)[0]
        return d


class ChannelThreshold:
    """``select_fn`` for MONAI's ``CropForeground``: a (1, H, W) mask of the pixels whose ``reduction`` ("max" or
    "mean") over the channels of a (C, H, W) image is > ``threshold``. When no pixel is, the mask is all true, so
    that the crop keeps the whole image instead of cutting it to nothing."""

    def __init__(self, threshold: float = 10.0, reduction: str = "max"):
        if isinstance(threshold, bool) or not isinstance(threshold, Real):
            raise ValueError(f"threshold must be a number, got {threshold!r}")
        if reduction not in ("max", "mean"):
            raise ValueError(f"reduction must be 'max' or 'mean', got {reduction!r}")
        self.threshold = float(threshold)
        self.reduction = reduction

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        if isinstance(img, np.ndarray):
            reduced = img.max(0, keepdims=True) if self.reduction == "max" else img.mean(0, keepdims=True)
            mask = reduced > self.threshold
            return mask if mask.any() else np.ones_like(mask)
        if isinstance(img, MetaTensor):
            img = img.as_tensor()  # the mask needs no metadata
        reduced = img.amax(0, keepdim=True) if self.reduction == "max" else img.float().mean(0, keepdim=True)
        mask = reduced > self.threshold
        return mask if bool(mask.any()) else torch.ones_like(mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold}, reduction={self.reduction!r})"


class FundusBorderCropd(CropForegroundd):
    """Black-border removal: crop ``keys`` to the bounding box of the pixels of ``data[source_key]`` whose max (or
    mean, ``reduction``) over channels is > ``threshold`` (0..255 scale), widened by ``margin`` pixels but never
    past the image edges. An image with no such pixel (all black) is kept whole. A mask under ``label`` listed in
    ``keys`` gets the same crop. MONAI's ``CropForegroundd`` with :class:`ChannelThreshold` as ``select_fn``;
    the box is recorded in the data under ``start_coord_key`` / ``end_coord_key`` only when they are given."""

    def __init__(
        self,
        keys: KeysCollection,
        threshold: float = 10.0,
        reduction: str = "max",
        margin: Sequence[int] | int = 0,
        source_key: str = "image",
        start_coord_key: str | None = None,
        end_coord_key: str | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(
            keys,
            source_key=source_key,
            select_fn=ChannelThreshold(threshold, reduction),
            margin=margin,
            allow_smaller=True,
            start_coord_key=start_coord_key,
            end_coord_key=end_coord_key,
            allow_missing_keys=allow_missing_keys,
        )

    @property
    def threshold(self) -> float:
        return self.cropper.select_fn.threshold

    @property
    def reduction(self) -> str:
        return self.cropper.select_fn.reduction


class RandAugMixd(RandomizableTransform, MapTransform):
    """AugMix (Hendrycks et al. 2020) by timm's ``augment_and_mix_transform("augmix-m{severity}-w{width}...")``
    on ``keys``: (C, H, W) images on the 0..255 scale (uint8 or floats; C = 1 or 3), as tensors, MetaTensors or
    arrays; each comes back with its type, dtype, device and shape (floats come back rounded to integers).

    - ``severity`` 0..10: the ops' magnitude, sampled uniformly in [0, severity] per op (timm's default);
      0 turns AugMix off (the images are returned as they are).
    - ``width`` chains (>= 1) of ``depth`` ops each (1.. or -1: 1 to 3 at random), mixed with Dirichlet(``alpha``)
      weights and blended with the original by Beta(``alpha``, ``alpha``).
    - ``prob``: the chance that a sample is augmented at all.
    - ``fill``: the grey level that rotations, shears and translations bring in (timm's default is 128; a fundus
      photograph's background is black, hence 0).

    Randomness: timm draws from python's ``random`` and numpy's global generator. Each call seeds both from this
    transform's ``self.R`` (so ``set_random_state`` / MONAI's per-worker seeding make runs reproducible) and
    restores their previous states afterwards. All ``keys`` of one sample get the same augmentation. Not safe to
    call from several threads at once (the global generators are shared); DataLoader worker processes are fine.
    """

    def __init__(
        self,
        keys: KeysCollection,
        severity: int = 3,
        width: int = 3,
        depth: int = -1,
        alpha: float = 1.0,
        prob: float = 1.0,
        fill: int = 0,
        allow_missing_keys: bool = False,
    ):
        def integer(name, value, ok, what):
            if isinstance(value, bool) or not isinstance(value, Integral) or not ok(value):
                raise ValueError(f"RandAugMixd: {name} must be {what}, got {value!r}")
            return int(value)

        self.severity = integer("severity", severity, lambda v: 0 <= v <= 10, "an integer in 0..10 (0 = off)")
        self.width = integer("width", width, lambda v: v >= 1, "an integer >= 1")
        self.depth = integer("depth", depth, lambda v: v == -1 or v >= 1, "-1 (random 1..3) or an integer >= 1")
        self.fill = integer("fill", fill, lambda v: 0 <= v <= 255, "an integer in 0..255")
        if isinstance(alpha, bool) or not isinstance(alpha, Real) or not alpha > 0 or not np.isfinite(alpha):
            raise ValueError(f"RandAugMixd: alpha must be a number > 0, got {alpha!r}")
        if isinstance(prob, bool) or not isinstance(prob, Real) or not 0.0 <= prob <= 1.0:
            raise ValueError(f"RandAugMixd: prob must be a number in [0, 1], got {prob!r}")
        self.alpha = float(alpha)
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.config = f"augmix-m{self.severity}-w{self.width}-a{np.format_float_positional(self.alpha, trim='-')}"
        if self.depth != -1:  # timm's parser splits on "-": "d-1" cannot be written, and -1 is its default
            self.config += f"-d{self.depth}"
        hparams = {"translate_const": 250, "img_mean": (self.fill,) * 3}
        self.augmix = augment_and_mix_transform(self.config, hparams)
        self._seed = 0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._seed = int(self.R.randint(2**32, dtype=np.int64))

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform or self.severity == 0:
            return d
        for key in self.key_iterator(d):
            d[key] = self._augment(d[key])
        return d

    def _augment(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        _check_chw(img, "RandAugMixd")
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        hwc = np.ascontiguousarray(np.broadcast_to(np.moveaxis(arr, 0, -1), arr.shape[1:] + (3,)))
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(self._seed)
            np.random.seed(self._seed)
            out = np.asarray(self.augmix(Image.fromarray(hwc)))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        out = np.moveaxis(out, -1, 0)[: arr.shape[0]]  # a grey image stays grey through every op: keep one channel
        return convert_to_dst_type(np.ascontiguousarray(out), dst=img)[0]


class RandColorJitterd(Randomizable, MapTransform):
    """Brightness, contrast and saturation jitter of ``strength`` s, as torchvision's ``ColorJitter(s, s, s)``
    computes it: each factor drawn uniformly in [max(0, 1 - s), 1 + s], the three ``adjust_*`` functions of
    ``torchvision.transforms.functional`` applied in a random order to the image scaled to [0, 1] (clipped there).
    ``keys``: (C, H, W) images on the 0..255 scale (C = 1 or 3; saturation leaves a grey image alone), as
    tensors, MetaTensors or arrays; each comes back with its type, dtype and shape (integers rounded).
    ``strength`` 0 turns it off (the images are returned as they are).

    The factors and order are drawn from this transform's ``self.R`` (ColorJitter would use torch's global
    generator), so ``set_random_state`` / MONAI's per-worker seeding make runs reproducible; all ``keys`` of one
    sample get the same jitter."""

    ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)

    def __init__(self, keys: KeysCollection, strength: float = 0.2, allow_missing_keys: bool = False):
        if isinstance(strength, bool) or not isinstance(strength, Real) or not 0 <= strength < np.inf:
            raise ValueError(f"RandColorJitterd: strength must be a number >= 0 (0 = off), got {strength!r}")
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.strength = float(strength)
        self._factors, self._order = np.ones(3), np.arange(3)

    def randomize(self, data=None) -> None:
        self._factors = self.R.uniform(max(0.0, 1.0 - self.strength), 1.0 + self.strength, size=3)
        self._order = self.R.permutation(3)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict:
        d = dict(data)
        self.randomize()
        if self.strength == 0:
            return d
        for key in self.key_iterator(d):
            d[key] = self._jitter(d[key])
        return d

    def _jitter(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        _check_chw(img, "RandColorJitterd")
        x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        integral, x = not torch.is_floating_point(x), x.float() / 255
        for k in self._order:
            x = self.ADJUST[k](x, float(self._factors[k]))
        return convert_to_dst_type(torch.round(x * 255) if integral else x * 255, dst=img)[0]


class BackgroundFilld(Randomizable, MapTransform):
    """A spatial dictionary ``transform`` (declared with ``padding_mode="zeros"``) whose pixels from outside the
    image are ``background`` on ``keys`` (the image; 1.0 is white on the 0..1 scale) instead of 0; its other keys
    (the mask) keep 0. Each image travels through ``transform`` with an extra channel of ones, which comes out as
    the share of each pixel that came from inside the image (v); the image gets ``background * (1 - v)`` added:
    exactly constant padding for the linear and nearest interpolations. An image the transform leaves in place
    comes back unchanged. Only ``transform``'s own keys go through it: a MONAI spatial transform that skips a
    sample turns every value of the dict into a tensor (the cache's ``orig_size`` too), which then fails to
    collate with the samples it moved. Randomness is ``transform``'s (``set_random_state`` is passed on)."""

    def __init__(self, keys: KeysCollection, transform: MapTransform, background: float = 1.0,
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform, self.background = transform, float(background)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None
                         ) -> BackgroundFilld:
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        if isinstance(self.transform, Randomizable):
            self.transform.randomize(data)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            image = torch.as_tensor(d[key])
            d[key] = torch.cat([image, torch.ones_like(image[:1])])
        d.update(self.transform({k: d[k] for k in self.transform.keys if k in d}))
        for key in keys:
            image, inside = d[key][:-1], d[key][-1:]
            outside = bool((inside < 1).any())
            d[key] = image + self.background * (1 - inside) if self.background and outside else image
        return d


class RandOpticalDistortiond(RandomizableTransform, MapTransform):
    """Lens (barrel or pincushion) distortion of ``keys`` (C, H, W), as albumentations' ``OpticalDistortion``:
    with positions normalised to [-1, 1] and the centre c shifted by up to ``shift_limit`` (a fraction of the
    half-size, uniform per axis), the output pixel at p samples the input at ``c + (p - c)(1 + k |p - c|^2)``,
    k uniform in [-``distort_limit``, ``distort_limit``] (k > 0 pulls the borders in: barrel). ``mode`` (per key,
    ``bilinear`` for the image, ``nearest`` for a mask) and zeros outside the image (:class:`BackgroundFilld` for
    another colour), by ``torch.nn.functional.grid_sample``; each comes back with its type and dtype (integers
    rounded)."""

    def __init__(self, keys: KeysCollection, prob: float = 0.1, distort_limit: float = 0.1, shift_limit: float = 0.05,
                 mode: str | Sequence[str] = "bilinear", allow_missing_keys: bool = False):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.distort_limit, self.shift_limit = float(distort_limit), float(shift_limit)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self._k, self._centre = 0.0, np.zeros(2)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._k = self.R.uniform(-self.distort_limit, self.distort_limit)
        self._centre = self.R.uniform(-self.shift_limit, self.shift_limit, size=2)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self._distort(d[key], mode)
        return d

    def _distort(self, img: NdarrayOrTensor, mode: str) -> NdarrayOrTensor:
        x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        h, w = x.shape[-2:]
        ys, xs = (torch.linspace(-1 + 1 / n, 1 - 1 / n, n, device=x.device) for n in (h, w))
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2): x then y, as grid_sample
        centre = torch.as_tensor(self._centre, dtype=grid.dtype, device=x.device)
        offset = grid - centre
        grid = centre + offset * (1 + self._k * offset.square().sum(-1, keepdim=True))
        out = F.grid_sample(x[None].float(), grid[None], mode=mode, padding_mode="zeros", align_corners=False)[0]
        return convert_to_dst_type(out if torch.is_floating_point(x) else out.round(), dst=img)[0]


class RandCLAHEd(RandomizableTransform, MapTransform):
    """Contrast-limited adaptive histogram equalisation (scikit-image's ``equalize_adapthist``: on the HSV value
    of an RGB image, tiles of ``kernel_size``, 1/8 of the image by default) of ``keys``, (C, H, W) images on the
    0..1 scale (clipped there first; C = 1 or 3), with probability ``prob``; each comes back with its type and
    dtype, on 0..1."""

    def __init__(self, keys: KeysCollection, prob: float = 0.1, clip_limit: float = 0.01,
                 kernel_size: int | None = None, allow_missing_keys: bool = False):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.clip_limit, self.kernel_size = float(clip_limit), kernel_size

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            _check_chw(img, "RandCLAHEd")
            arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
            hwc = np.clip(np.moveaxis(arr, 0, -1), 0, 1).astype(np.float32)
            out = equalize_adapthist(hwc[..., 0] if hwc.shape[-1] == 1 else hwc, kernel_size=self.kernel_size,
                                     clip_limit=self.clip_limit)
            out = out[None] if out.ndim == 2 else np.moveaxis(out, -1, 0)
            d[key] = convert_to_dst_type(np.ascontiguousarray(out, dtype=np.float32), dst=img)[0]
        return d


def _check_chw(img: NdarrayOrTensor, transform: str) -> None:
    """A (C, H, W) image with C = 1 or 3, or ValueError naming ``transform`` and the shape."""
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"{transform} expects a (C, H, W) image with C = 1 or 3, got shape {tuple(img.shape)}")
