"""Where the tissue is: a thumbnail of the slide read from a low pyramid level (by row strips when the slide has
none small enough), thresholded.

- ``saturation`` (default): tissue where the HSV saturation exceeds ``threshold`` (0..1; default 0.1) and the
  pixel is not near black (value above 0.15): stained tissue is coloured, glass is grey or white, pen marks and
  scanner borders are dark.
- ``otsu``: MONAI's ``ForegroundMask`` with Otsu thresholds on the RGB channels (tissue darker than glass) and on
  the HSV saturation.

Components smaller than ``min_size`` thumbnail pixels are dropped (dust, debris).
"""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2hsv
from skimage.morphology import remove_small_objects

from stas_pipeline.tasks.slide.reader import Slide
from stas_pipeline.tasks.slide.task import TISSUE_METHODS

STRIP_ROWS = 1024  # level rows read at a time when a thumbnail has to be averaged down


def thumbnail(slide: Slide, max_side: int = 2048) -> tuple[np.ndarray, float]:
    """An (h, w, 3) uint8 thumbnail (by :meth:`Slide.read_rgb`) whose longer side is at most ``max_side``, and its
    downsample from level 0.

    Read from the smallest level at least ``max_side`` long, then averaged over integer blocks, a strip of rows
    at a time, so memory stays bounded even for a slide without a pyramid."""
    level = slide.smallest_level_at_least(max_side)
    rows, cols = slide.level_shape(level)
    factor = max(1, -(-max(rows, cols) // max_side))
    out_rows, out_cols = -(-rows // factor), -(-cols // factor)
    out = np.empty((out_rows, out_cols, 3), dtype=np.uint8)
    step = max(1, STRIP_ROWS // factor) * factor
    for y in range(0, out_rows * factor, step):
        strip = slide.read_rgb(y, 0, step, out_cols * factor, level=level).astype(np.float32)
        blocks = strip.reshape(step // factor, factor, out_cols, factor, -1).mean(axis=(1, 3))
        out[y // factor:y // factor + step // factor] = np.rint(blocks[:out_rows - y // factor])
    return out, slide.downsample(level) * factor


def tissue_mask(rgb: np.ndarray, method: str = "saturation", threshold: float = 0.1, min_size: int = 16) -> np.ndarray:
    """Boolean (h, w) tissue mask of an (h, w, 3) uint8 image (see the module doc for the methods)."""
    if method not in TISSUE_METHODS:
        raise ValueError(f"unknown tissue method {method!r}; known: {', '.join(TISSUE_METHODS)}")
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"tissue detection needs an RGB image, got shape {rgb.shape}")
    if method == "saturation":
        hsv = rgb2hsv(rgb)
        mask = (hsv[..., 1] > threshold) & (hsv[..., 2] > 0.15)
    else:
        from monai.transforms import ForegroundMask  # here: importing MONAI takes seconds, saturation needs none

        mask = np.asarray(ForegroundMask(threshold="otsu", hsv_threshold={"S": "otsu"})(np.moveaxis(rgb, -1, 0)))[0]
        mask = mask.astype(bool)
    return remove_small_objects(mask, max_size=min_size) if min_size > 1 else mask
