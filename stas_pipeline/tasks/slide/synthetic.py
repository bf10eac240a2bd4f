"""A procedural whole slide of any size, for tests, the demo and the scale benchmark: any window of the image or
of its mask is computed on demand (nothing of slide size is ever held in memory).

White glass with pink tissue regions (ellipses) holding round purple "glomeruli" (the mask) and fine
per-pixel texture; the texture is a hash of the pixel's coordinates, so overlapping windows agree pixel for
pixel, as windows of a real slide do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stas_pipeline.tasks.slide.reader import write_slide
from stas_pipeline.tasks.slide.rle import encode_strips

GLASS, TISSUE, GLOMERULUS = (242, 242, 244), (232, 170, 200), (150, 80, 160)


@dataclass
class SyntheticSlide:
    """A slide of ``height`` x ``width`` with tissue regions and ``glomeruli`` per million tissue pixels."""

    height: int
    width: int
    seed: int = 0
    tissue_regions: int = 3
    glomeruli: float = 30.0
    radius: tuple[float, float] = (20.0, 45.0)
    tissue: np.ndarray = field(init=False, repr=False)  # (n, 4): centre y, x, semi-axes ry, rx
    discs: np.ndarray = field(init=False, repr=False)  # (m, 3): centre y, x, radius

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        h, w = self.height, self.width
        self.tissue = np.column_stack([rng.uniform(0.25, 0.75, self.tissue_regions) * h,
                                       rng.uniform(0.2, 0.8, self.tissue_regions) * w,
                                       rng.uniform(0.15, 0.3, self.tissue_regions) * h,
                                       rng.uniform(0.1, 0.25, self.tissue_regions) * w])
        area = float(np.pi * (self.tissue[:, 2] * self.tissue[:, 3]).sum())
        n = max(1, round(self.glomeruli * area / 1e6))
        candidates = np.column_stack([rng.uniform(0, h, 4 * n), rng.uniform(0, w, 4 * n),
                                      rng.uniform(*self.radius, 4 * n)])
        inside = self._in_tissue(candidates[:, 0], candidates[:, 1], margin=0.85)
        self.discs = candidates[inside][:n]

    def _in_tissue(self, y: np.ndarray, x: np.ndarray, margin: float = 1.0) -> np.ndarray:
        t = self.tissue[:, :, None, None] if y.ndim == 2 else self.tissue[:, :, None]
        d = ((y - t[:, 0]) / (margin * t[:, 2])) ** 2 + ((x - t[:, 1]) / (margin * t[:, 3])) ** 2
        return (d <= 1).any(axis=0)

    def mask(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The (h, w) uint8 mask window (1 = glomerulus; 0 outside the slide)."""
        yy, xx = np.mgrid[y:y + h, x:x + w].astype(np.float32)
        out = np.zeros((h, w), dtype=bool)
        cy, cx, r = self.discs.T
        near = (cy + r >= y) & (cy - r < y + h) & (cx + r >= x) & (cx - r < x + w)
        for dy, dx, dr in self.discs[near]:
            out |= (yy - dy) ** 2 + (xx - dx) ** 2 <= dr * dr
        out &= (yy < self.height) & (xx < self.width)
        return out.astype(np.uint8)

    def image(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The (h, w, 3) uint8 RGB window (black outside the slide)."""
        yy, xx = np.mgrid[y:y + h, x:x + w]
        noise = ((yy.astype(np.int64) * 92837111) ^ (xx.astype(np.int64) * 689287499) ^ self.seed) % 23 - 11
        colour = np.where(self._in_tissue(yy.astype(np.float32), xx.astype(np.float32))[..., None],
                          np.array(TISSUE), np.array(GLASS))
        colour = np.where(self.mask(y, x, h, w)[..., None].astype(bool), np.array(GLOMERULUS), colour)
        out = np.clip(colour + noise[..., None], 0, 255).astype(np.uint8)
        out[(yy >= self.height) | (xx >= self.width)] = 0
        return out

    def write(self, path: str | Path, levels: int = 3, tile: int = 256, compression: str | None = "jpeg",
              overwrite: bool = False) -> Path:
        """The slide as a pyramidal tiled TIFF (see :func:`write_slide`)."""
        return write_slide(path, self.image, self.height, self.width, levels=levels, tile=tile,
                           compression=compression, overwrite=overwrite)

    def rle(self, strip: int = 512) -> str:
        """The mask's RLE string, computed column strip by column strip."""
        strips = (self.mask(0, x, self.height, min(strip, self.width - x)) for x in range(0, self.width, strip))
        return encode_strips(strips, self.height)
