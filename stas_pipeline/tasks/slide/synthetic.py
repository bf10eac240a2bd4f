"""A procedural whole slide of any size, for tests, the demo and the scale benchmark: any window of the image or
of its mask is computed on demand (nothing of slide size is ever held in memory).

White glass with pink tissue regions (ellipses) holding round purple "glomeruli" (the mask) and fine
per-pixel texture; the texture depends on the pixel's coordinates only, so overlapping windows agree pixel for
pixel, as windows of a real slide do. Lower pyramid levels are drawn at their own scale (as a scanner's are),
not averaged from level 0, so a slide of any size is written in time proportional to its level 0.
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
    _noise: np.ndarray = field(init=False, repr=False)  # texture, indexed by (row, column) modulo 256

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
        self._noise = np.random.default_rng(self.seed + 1).integers(-11, 12, (256, 256), dtype=np.int16)

    def _in_tissue(self, y: np.ndarray, x: np.ndarray, margin: float = 1.0) -> np.ndarray:
        t = self.tissue[:, :, None, None] if y.ndim == 2 else self.tissue[:, :, None]
        d = ((y - t[:, 0]) / (margin * t[:, 2])) ** 2 + ((x - t[:, 1]) / (margin * t[:, 3])) ** 2
        return (d <= 1).any(axis=0)

    def _grid(self, y: int, x: int, h: int, w: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 coordinates (centres of ``factor``-wide pixels) of a window's rows (h, 1) and columns (1, w)."""
        rows = ((y + np.arange(h)) * factor + (factor - 1) / 2).astype(np.float32)[:, None]
        cols = ((x + np.arange(w)) * factor + (factor - 1) / 2).astype(np.float32)[None, :]
        return rows, cols

    def _tissue_window(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        out = np.zeros((rows.shape[0], cols.shape[1]), dtype=bool)
        for cy, cx, ry, rx in self.tissue:  # each region only where its bounding box meets the window
            r = (rows[:, 0] >= cy - ry) & (rows[:, 0] <= cy + ry)
            c = (cols[0] >= cx - rx) & (cols[0] <= cx + rx)
            if r.any() and c.any():
                sub = np.ix_(r, c)
                out[sub] |= ((rows[r] - cy) / ry) ** 2 + ((cols[:, c] - cx) / rx) ** 2 <= 1
        return out

    def _disc_window(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        out = np.zeros((rows.shape[0], cols.shape[1]), dtype=bool)
        r0, r1, c0, c1 = rows[0, 0], rows[-1, 0], cols[0, 0], cols[0, -1]
        cy, cx, rad = self.discs.T
        for dy, dx, dr in self.discs[(cy + rad >= r0) & (cy - rad <= r1) & (cx + rad >= c0) & (cx - rad <= c1)]:
            r = (rows[:, 0] >= dy - dr) & (rows[:, 0] <= dy + dr)
            c = (cols[0] >= dx - dr) & (cols[0] <= dx + dr)
            if r.any() and c.any():
                out[np.ix_(r, c)] |= (rows[r] - dy) ** 2 + (cols[:, c] - dx) ** 2 <= dr * dr
        return out

    def _inside(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return (rows < self.height) & (cols < self.width)

    def mask(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The (h, w) uint8 mask window (1 = glomerulus; 0 outside the slide)."""
        rows, cols = self._grid(y, x, h, w, 1)
        return (self._disc_window(rows, cols) & self._inside(rows, cols)).astype(np.uint8)

    def image(self, y: int, x: int, h: int, w: int, factor: int = 1) -> np.ndarray:
        """The (h, w, 3) uint8 RGB window of the slide drawn ``factor`` times smaller (black outside the slide)."""
        rows, cols = self._grid(y, x, h, w, factor)
        out = np.empty((h, w, 3), np.uint8)
        out[:] = GLASS
        out[self._tissue_window(rows, cols)] = TISSUE
        out[self._disc_window(rows, cols)] = GLOMERULUS
        noise = self._noise[(y + np.arange(h))[:, None] % 256, (x + np.arange(w))[None, :] % 256]
        out = np.clip(out.astype(np.int16) + noise[..., None], 0, 255).astype(np.uint8)
        out[~self._inside(rows, cols)] = 0
        return out

    def write(self, path: str | Path, levels: int = 3, tile: int = 256, compression: str | None = "jpeg",
              overwrite: bool = False) -> Path:
        """The slide as a pyramidal tiled TIFF (see :func:`write_slide`), each level drawn at its own scale."""
        return write_slide(path, self.image, self.height, self.width, levels=levels, tile=tile,
                           compression=compression, overwrite=overwrite, drawn=True)

    def rle(self, strip: int = 512) -> str:
        """The mask's RLE string, computed column strip by column strip."""
        strips = (self.mask(0, x, self.height, min(strip, self.width - x)) for x in range(0, self.width, strip))
        return encode_strips(strips, self.height)
