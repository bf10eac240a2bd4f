"""Whole-slide images read and written by window, never a whole level in memory.

:class:`Slide` opens a tiled (and usually pyramidal) TIFF, OME-TIFF or Aperio SVS with tifffile and reads any
window of any pyramid level through tifffile's zarr store, which decodes only the tiles the window touches.
(MONAI's ``WSIReader(backend="tifffile")`` decodes the whole level for every patch, MONAI issue 6513;
``benchmarks/slide_reads.py`` measures both.) Windows are (y, x, height, width) in the level's own pixels; the
part of a window outside the level is filled with ``fill``. :meth:`Slide.read` gives the stored samples, (H, W, C)
(C = 1 for grey; masks are read so); :meth:`Slide.read_rgb` gives (H, W, 3) uint8 by the image policy of
:func:`stas_pipeline.core.images.rgb_array` (16-bit, grey, RGBA, CMYK slides), which every image read goes through.

:func:`write_slide` writes a pyramidal tiled TIFF from a function that returns any window of level 0 (level k is
level 0 averaged over 2**k x 2**k blocks), tile by tile, so a 40,000 x 40,000 slide is written in bounded memory;
the file appears only when complete.

A file that tifffile cannot parse, a level that the slide lacks, or a tile that cannot be decoded (a truncated
file) raises :class:`SlideError` naming the file and the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile
import zarr

from stas_pipeline.core.errors import StasError
from stas_pipeline.core.fileio import atomic_path
from stas_pipeline.core.images import ImageModeError, rgb_array


class SlideError(StasError, ValueError):
    """A slide that cannot be read as asked (not a TIFF, no such level, undecodable tiles)."""


class Slide:
    """A slide opened for windowed reads (a context manager; :meth:`close` releases the file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            axes = series.axes
        except Exception as err:  # noqa: BLE001 - any unreadable file is one clear error
            raise SlideError(f"{self.path}: cannot read as a TIFF slide ({type(err).__name__}: {err})") from err
        if axes not in ("YXS", "YX", "CYX", "SYX"):
            self.close()
            raise SlideError(f"{self.path}: image axes {axes!r} (a slide is YXS, YX or CYX)")
        self._axes = axes
        self._levels = series.levels
        self._cmyk = series.keyframe.photometric == tifffile.PHOTOMETRIC.SEPARATED
        self._arrays: dict[int, zarr.Array] = {}

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._tif.close()

    @property
    def level_count(self) -> int:
        return len(self._levels)

    def level_shape(self, level: int = 0) -> tuple[int, int]:
        """(height, width) of ``level``."""
        shape = self._level(level).shape
        return (shape[0], shape[1]) if self._axes[0] == "Y" else (shape[1], shape[2])

    @property
    def channels(self) -> int:
        shape = self._levels[0].shape
        return 1 if self._axes == "YX" else shape[2] if self._axes == "YXS" else shape[0]

    def downsample(self, level: int) -> float:
        """How many level-0 pixels one pixel of ``level`` spans (along the width)."""
        return self.level_shape(0)[1] / self.level_shape(level)[1]

    def _level(self, level: int):
        if not isinstance(level, int) or not 0 <= level < len(self._levels):
            sizes = ", ".join(f"{k}: {s.shape[1]}x{s.shape[0]}" if self._axes[0] == "Y" else f"{k}: {s.shape}"
                              for k, s in enumerate(self._levels))
            raise SlideError(f"{self.path}: no level {level!r}; levels (width x height) {sizes}")
        return self._levels[level]

    def _array(self, level: int) -> zarr.Array:
        if level not in self._arrays:
            self._level(level)
            self._arrays[level] = zarr.open_array(self._tif.series[0].aszarr(level=level), mode="r")
        return self._arrays[level]

    def read(self, y: int, x: int, height: int, width: int, level: int = 0, fill: int = 0) -> np.ndarray:
        """The window at (y, x) of ``height`` x ``width`` pixels of ``level`` as (height, width, C) stored samples
        (uint8 for most slides); pixels outside the level are ``fill``."""
        if height <= 0 or width <= 0:
            raise ValueError(f"window of {height} x {width} pixels")
        rows, cols = self.level_shape(level)
        out = np.full((height, width, self.channels), fill, dtype=self._levels[0].dtype)
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + height, rows), min(x + width, cols)
        if y0 < y1 and x0 < x1:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._window(y, x, y0, x0, y1, x1, level, height, width)
        return out

    def read_rgb(self, y: int, x: int, height: int, width: int, level: int = 0, fill: int = 255) -> np.ndarray:
        """:meth:`read` by the image policy: (height, width, 3) uint8, outside the level ``fill`` (white)."""
        rows, cols = self.level_shape(level)
        out = np.full((height, width, 3), fill, dtype=np.uint8)
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + height, rows), min(x + width, cols)
        if y0 < y1 and x0 < x1:
            window = self._window(y, x, y0, x0, y1, x1, level, height, width)
            try:
                out[y0 - y:y1 - y, x0 - x:x1 - x] = rgb_array(window, self.path, cmyk=self._cmyk)
            except ImageModeError as err:
                raise SlideError(str(err)) from err
        return out

    def _window(self, y: int, x: int, y0: int, x0: int, y1: int, x1: int, level: int, height: int,
                width: int) -> np.ndarray:
        """The stored samples of rows y0:y1, columns x0:x1 of ``level`` as (h, w, C)."""
        array = self._array(level)
        try:
            if self._axes[0] == "Y":
                window = array[y0:y1, x0:x1]
            else:
                window = np.moveaxis(array[:, y0:y1, x0:x1], 0, -1)
        except Exception as err:  # noqa: BLE001 - a truncated or corrupt tile
            raise SlideError(f"{self.path}: cannot decode level {level} window at y={y}, x={x}, {height} x "
                             f"{width} ({type(err).__name__}: {err})") from err
        return window.reshape(y1 - y0, x1 - x0, -1)

    def smallest_level_at_least(self, long_side: int) -> int:
        """The smallest level whose longer side is at least ``long_side`` pixels (level 0 when none is)."""
        fits = [k for k in range(self.level_count) if max(self.level_shape(k)) >= long_side]
        return max(fits) if fits else 0


def _block_mean(window: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return window
    h, w, c = window.shape
    return window.reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3)).round().astype(np.uint8)


def _tiles(source: Callable[..., np.ndarray], shape: tuple[int, int], channels: int, tile: int, factor: int,
           drawn: bool) -> Iterator[np.ndarray]:
    """Tiles of the level ``factor`` times smaller than level 0 (rows, then columns), each (tile, tile, C)."""
    rows, cols = shape
    for ty in range(0, rows, tile):
        for tx in range(0, cols, tile):
            if drawn:
                level_tile = np.asarray(source(ty, tx, tile, tile, factor), dtype=np.uint8).reshape(tile, tile, -1)
            else:
                window = np.asarray(source(ty * factor, tx * factor, tile * factor, tile * factor), dtype=np.uint8)
                level_tile = _block_mean(window.reshape(tile * factor, tile * factor, channels), factor)
            yield level_tile if channels > 1 else level_tile[..., 0]


def write_slide(
    path: str | Path,
    source: Callable[[int, int, int, int], np.ndarray],
    height: int,
    width: int,
    channels: int = 3,
    levels: int = 1,
    tile: int = 256,
    compression: str | None = "zlib",
    overwrite: bool = False,
    drawn: bool = False,
) -> Path:
    """Write a pyramidal tiled TIFF of ``height`` x ``width`` from ``source(y, x, h, w)`` (a level-0 window,
    (h, w, C) uint8; windows reach past the slide's edges, where the source returns anything, e.g. zeros).

    ``levels`` levels (level k: 2**k times smaller, as SubIFDs of level 0, which tifffile, OpenSlide-style readers
    and MONAI's WSIReader read as the pyramid); ``tile`` a multiple of 16; ``compression`` as tifffile takes it
    (``"zlib"`` lossless, ``"jpeg"`` for RGB like scanners write, None). Written atomically. With ``drawn``,
    ``source(y, x, h, w, factor)`` draws a window of the level ``factor`` times smaller itself (in that level's
    pixels) instead of level k being averaged from level 0.
    """
    if tile % 16:
        raise ValueError(f"tile {tile} is not a multiple of 16 (TIFF tiles must be)")
    shapes = [(-(-height // 2**k), -(-width // 2**k)) for k in range(levels)]
    photometric = "rgb" if channels == 3 else "minisblack"
    with atomic_path(path, overwrite=overwrite) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, shape in enumerate(shapes):
            extra = {"subifds": levels - 1} if k == 0 else {"subfiletype": 1}
            tw.write(_tiles(source, shape, channels, tile, 2**k, drawn), shape=(*shape, channels)[:2 + (channels > 1)],
                     dtype=np.uint8,
                     tile=(tile, tile), photometric=photometric, compression=compression, **extra)
    return Path(path)
