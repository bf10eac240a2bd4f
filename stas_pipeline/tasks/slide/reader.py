"""Whole-slide images read and written by window, never a whole level in memory.

:class:`Slide` opens a tiled (and usually pyramidal) TIFF, OME-TIFF or Aperio SVS with tifffile and reads any
window of any pyramid level by decoding only the tiles (or strips) the window touches, in parallel threads when
it touches several (imagecodecs releases the GIL); NDPI, MRXS, SCN, BIF and the other formats of
:data:`~stas_pipeline.core.images.OPENSLIDE_SUFFIXES` (and a TIFF that tifffile cannot read as a slide) are read
through OpenSlide's ``read_region`` behind the same interface, when openslide-python is installed
(``pip install 'stas_pipeline[openslide]'``). (MONAI's ``WSIReader(backend="tifffile")`` decodes the whole level
for every patch, MONAI issue 6513; ``benchmarks/slide_reads.py`` measures both, and OpenSlide.) Windows are
(y, x, height, width) in the level's own pixels; the part of a window outside the level is filled with
``fill``. :meth:`Slide.read` gives the stored samples, (H, W, C) (C = 1 for grey; masks are read so);
:meth:`Slide.read_rgb` gives (H, W, 3) uint8 by the image policy of
:func:`stas_pipeline.core.images.rgb_array` (16-bit, grey, RGBA, CMYK slides), which every image read goes through.

:attr:`Slide.mpp` is the physical size of a level-0 pixel in microns, from the file's metadata: OME-XML
``PhysicalSizeX`` (with ``PhysicalSizeXUnit``), Aperio's ``MPP =`` in the SVS ImageDescription, the TIFF
``XResolution`` with its ``ResolutionUnit`` (inch or centimetre), or OpenSlide's ``openslide.mpp-x``; None when
the file has none. Level k's is ``mpp x downsample(k)`` (:meth:`Slide.level_mpp`).

:func:`write_slide` writes a pyramidal tiled TIFF from a function that returns any window of level 0 (level k is
level 0 averaged over 2**k x 2**k blocks), tile by tile, so a 40,000 x 40,000 slide is written in bounded memory;
the file appears only when complete.

A file that neither tifffile nor OpenSlide can read (or an OpenSlide format without openslide-python), a level
that the slide lacks, or a tile that cannot be decoded (a truncated file) raises :class:`SlideError` naming the
file and the reason.
"""

from __future__ import annotations

import os
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np
import tifffile

from stas_pipeline.core.errors import StasError
from stas_pipeline.core.fileio import atomic_path
from stas_pipeline.core.images import OPENSLIDE_SUFFIXES, ImageModeError, has_suffix, rgb_array

INSTALL_OPENSLIDE = "pip install 'stas_pipeline[openslide]'"
BACKENDS = ("tifffile", "openslide")
DECODE_THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
MICRONS = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6,
           "Å": 1e-4, "in": 25400.0}  # OME length units in microns
RESOLUTION_UNIT = {tifffile.RESUNIT.INCH: 25400.0, tifffile.RESUNIT.CENTIMETER: 1e4,
                   tifffile.RESUNIT.MILLIMETER: 1e3, tifffile.RESUNIT.MICROMETER: 1.0}  # microns per unit


class SlideError(StasError, ValueError):
    """A slide that cannot be read as asked (no backend reads it, no such level, undecodable tiles)."""


@lru_cache(maxsize=2)
def _decoder(pid: int, threads: int) -> ThreadPoolExecutor:
    """The process's pool of tile decoders (a forked process makes its own)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="slide-decode")


def _ome_mpp(xml: str) -> float | None:
    """``PhysicalSizeX`` of the first image of OME-XML, in microns."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    size = pixels.get("PhysicalSizeX") if pixels is not None else None
    unit = MICRONS.get(pixels.get("PhysicalSizeXUnit", "µm")) if pixels is not None else None
    return float(size) * unit if size and unit else None


def _tiff_mpp(tif: tifffile.TiffFile) -> float | None:
    """Microns per level-0 pixel from OME-XML, Aperio's ``MPP =`` or the resolution tags (in that order)."""
    page = tif.pages.first
    mpp = _ome_mpp(tif.ome_metadata) if tif.is_ome and tif.ome_metadata else None
    if mpp is None and tif.is_svs:
        found = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", page.description)
        mpp = float(found[1]) if found else None
    if mpp is None and page.resolutionunit in RESOLUTION_UNIT and page.resolution[0] > 0:
        mpp = RESOLUTION_UNIT[page.resolutionunit] / page.resolution[0]
    return mpp if mpp and mpp > 0 else None


class _TiffLevels:
    """A slide's levels as tifffile reads them; windows decoded tile by tile, in parallel threads."""

    def __init__(self, path: Path, threads: int):
        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
            axes = series.axes
        except Exception as err:  # noqa: BLE001 - any unreadable file is one clear error
            raise SlideError(f"{path}: cannot read as a TIFF slide ({type(err).__name__}: {err})") from err
        if axes not in ("YXS", "YX", "CYX", "SYX"):
            self.close()
            raise SlideError(f"{path}: image axes {axes!r} (a slide is YXS, YX or CYX)")
        self._series = series.levels
        self.levels = [s.shape[:2] if axes[0] == "Y" else s.shape[1:] for s in series.levels]
        self.channels = 1 if axes == "YX" else series.shape[2] if axes == "YXS" else series.shape[0]
        self.dtype = series.dtype
        self.cmyk = series.keyframe.photometric == tifffile.PHOTOMETRIC.SEPARATED
        self.mpp = _tiff_mpp(self._tif)
        self._threads = threads
        self._lock = threading.Lock()  # one seek-and-read at a time on the file

    def close(self) -> None:
        self._tif.close()

    def _segments(self, level: int, y0: int, x0: int, y1: int, x1: int) -> list[tuple]:
        """(keyframe, its bytes or None when not stored, index, (top, left), first channel) of each tile or strip
        of ``level`` (each of its pages, each plane) that the window touches."""
        found = []
        pages = self._series[level].pages
        for p, page in enumerate(pages):
            key = page.keyframe
            th, tw = (key.tilelength, key.tilewidth) if key.is_tiled else (min(key.rowsperstrip, key.imagelength),
                                                                            key.imagewidth)
            rows, cols = -(-key.imagelength // th), -(-key.imagewidth // tw)
            planes = key.samplesperpixel if key.planarconfig == tifffile.PLANARCONFIG.SEPARATE else 1
            for plane in range(planes):
                for r in range(y0 // th, (y1 - 1) // th + 1):
                    for c in range(x0 // tw, (x1 - 1) // tw + 1):
                        index = (plane * rows + r) * cols + c
                        offset = page.dataoffsets[index] if index < len(page.dataoffsets) else 0
                        count = page.databytecounts[index] if offset else 0
                        data = None
                        if count:
                            with self._lock:
                                self._tif.filehandle.seek(offset)
                                data = self._tif.filehandle.read(count)
                        found.append((key, data, index, (r * th, c * tw), p * planes + plane))
        return found

    def window(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        out = np.zeros((y1 - y0, x1 - x0, self.channels), self.dtype)

        def paste(segment: tuple) -> None:
            key, data, index, (ty, tx), channel = segment
            if data is None:  # a tile the file does not store: zeros
                return
            tables = {"jpegtables": key.jpegtables} if key.jpegtables is not None else {}
            if key.jpegheader is not None:
                tables["jpegheader"] = key.jpegheader
            decoded = key.decode(data, index, _fullsize=True, **tables)[0]
            decoded = decoded.reshape(decoded.shape[-3], decoded.shape[-2], -1)
            ya, yb, xa, xb = max(y0, ty), min(y1, ty + decoded.shape[0]), max(x0, tx), min(x1, tx + decoded.shape[1])
            out[ya - y0:yb - y0, xa - x0:xb - x0, channel:channel + decoded.shape[2]] = \
                decoded[ya - ty:yb - ty, xa - tx:xb - tx]

        segments = self._segments(level, y0, x0, y1, x1)
        if self._threads > 1 and len(segments) > 1:
            list(_decoder(os.getpid(), self._threads).map(paste, segments))
        else:
            for segment in segments:
                paste(segment)
        return out


def _openslide() -> ModuleType | None:
    """The openslide module, or None when openslide-python (or its library) is not installed."""
    try:
        import openslide
    except (ImportError, OSError):
        return None
    return openslide


class _OpenSlideLevels:
    """A slide's levels as OpenSlide reads them (RGBA composited on the slide's background colour)."""

    def __init__(self, path: Path):
        openslide = _openslide()
        if openslide is None:
            raise SlideError(f"{path}: {path.suffix or 'these'} slides are read by OpenSlide, which is not "
                             f"installed: {INSTALL_OPENSLIDE}")
        try:
            self._slide = openslide.OpenSlide(path)
        except (openslide.OpenSlideError, OSError) as err:
            raise SlideError(f"{path}: OpenSlide cannot read it ({type(err).__name__}: {err})") from err
        properties = self._slide.properties
        self.levels = [(h, w) for w, h in self._slide.level_dimensions]
        self.channels, self.dtype, self.cmyk = 3, np.dtype(np.uint8), False
        mpp = properties.get(openslide.PROPERTY_NAME_MPP_X)
        self.mpp = float(mpp) if mpp and float(mpp) > 0 else None
        colour = properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR) or "FFFFFF"
        self._background = np.array([int(colour[k:k + 2], 16) for k in (0, 2, 4)], np.uint16)

    def close(self) -> None:
        self._slide.close()

    def window(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        down = self._slide.level_downsamples[level]
        rgba = np.asarray(self._slide.read_region((round(x0 * down), round(y0 * down)), level, (x1 - x0, y1 - y0)))
        alpha = rgba[..., 3:].astype(np.uint16)
        if alpha.min() == 255:
            return rgba[..., :3].copy()
        return ((rgba[..., :3] * alpha + self._background * (255 - alpha) + 127) // 255).astype(np.uint8)


def _open_levels(path: Path, threads: int, backend: str | None) -> _TiffLevels | _OpenSlideLevels:
    """The reader of ``path``: ``backend``; by default OpenSlide for its formats, tifffile for TIFF, OME-TIFF and
    SVS, and OpenSlide for a file tifffile cannot read as a slide."""
    if backend not in (None, *BACKENDS):
        raise ValueError(f"unknown slide backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "tifffile":
        return _TiffLevels(path, threads)
    if backend == "openslide" or has_suffix(path, OPENSLIDE_SUFFIXES):
        return _OpenSlideLevels(path)
    try:
        return _TiffLevels(path, threads)
    except SlideError as tiff_error:
        if _openslide() is None:
            raise SlideError(f"{tiff_error}; other slide formats need OpenSlide: {INSTALL_OPENSLIDE}") from None
        try:
            return _OpenSlideLevels(path)
        except SlideError as openslide_error:
            raise SlideError(f"{tiff_error}; {str(openslide_error).removeprefix(f'{path}: ')}") from None


class Slide:
    """A slide opened for windowed reads (a context manager; :meth:`close` releases the file). ``threads``:
    how many tiles of one window are decoded at once (tifffile; default :data:`DECODE_THREADS`); ``backend``:
    ``"tifffile"`` or ``"openslide"`` instead of the choice by format (see the module doc)."""

    def __init__(self, path: str | Path, threads: int | None = None, backend: str | None = None):
        self.path = Path(path)
        self._levels = _open_levels(self.path, threads or DECODE_THREADS, backend)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._levels.close()

    @property
    def backend(self) -> str:
        """``"tifffile"`` or ``"openslide"``: what reads the slide."""
        return "openslide" if isinstance(self._levels, _OpenSlideLevels) else "tifffile"

    @property
    def level_count(self) -> int:
        return len(self._levels.levels)

    def level_shape(self, level: int = 0) -> tuple[int, int]:
        """(height, width) of ``level``."""
        self._check_level(level)
        return tuple(self._levels.levels[level])

    @property
    def channels(self) -> int:
        return self._levels.channels

    @property
    def mpp(self) -> float | None:
        """Microns per level-0 pixel from the file's metadata (see the module doc); None when it has none."""
        return self._levels.mpp

    def level_mpp(self, level: int) -> float | None:
        """Microns per pixel of ``level`` (``mpp x downsample``); None without :attr:`mpp`."""
        return None if self.mpp is None else self.mpp * self.downsample(level)

    def downsample(self, level: int) -> float:
        """How many level-0 pixels one pixel of ``level`` spans (along the width)."""
        return self.level_shape(0)[1] / self.level_shape(level)[1]

    def _check_level(self, level: int) -> None:
        if not isinstance(level, int) or not 0 <= level < self.level_count:
            sizes = ", ".join(f"{k}: {w}x{h}" for k, (h, w) in enumerate(self._levels.levels))
            raise SlideError(f"{self.path}: no level {level!r}; levels (width x height) {sizes}")

    def read(self, y: int, x: int, height: int, width: int, level: int = 0, fill: int = 0) -> np.ndarray:
        """The window at (y, x) of ``height`` x ``width`` pixels of ``level`` as (height, width, C) stored samples
        (uint8 for most slides); pixels outside the level are ``fill``."""
        if height <= 0 or width <= 0:
            raise ValueError(f"window of {height} x {width} pixels")
        rows, cols = self.level_shape(level)
        out = np.full((height, width, self.channels), fill, dtype=self._levels.dtype)
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
                out[y0 - y:y1 - y, x0 - x:x1 - x] = rgb_array(window, self.path, cmyk=self._levels.cmyk)
            except ImageModeError as err:
                raise SlideError(str(err)) from err
        return out

    def _window(self, y: int, x: int, y0: int, x0: int, y1: int, x1: int, level: int, height: int,
                width: int) -> np.ndarray:
        """The stored samples of rows y0:y1, columns x0:x1 of ``level`` as (h, w, C)."""
        try:
            return self._levels.window(level, y0, x0, y1, x1)
        except Exception as err:  # noqa: BLE001 - a truncated or corrupt tile
            raise SlideError(f"{self.path}: cannot decode level {level} window at y={y}, x={x}, {height} x "
                             f"{width} ({type(err).__name__}: {err})") from err

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
    metadata: dict | None = None,
    mpp: float | None = None,
) -> Path:
    """Write a pyramidal tiled TIFF of ``height`` x ``width`` from ``source(y, x, h, w)`` (a level-0 window,
    (h, w, C) uint8; windows reach past the slide's edges, where the source returns anything, e.g. zeros).

    ``levels`` levels (level k: 2**k times smaller, as SubIFDs of level 0, which tifffile and MONAI's WSIReader
    read as the pyramid; OpenSlide sees level 0 only); ``tile`` a multiple of 16; ``compression`` as tifffile
    takes it (``"zlib"`` lossless, ``"jpeg"`` for RGB like scanners write, None). Written atomically. With
    ``drawn``, ``source(y, x, h, w, factor)`` draws a window of the level ``factor`` times smaller itself (in that
    level's pixels) instead of level k being averaged from level 0. ``metadata``: JSON-able items written into
    level 0's ImageDescription (tifffile's ``shaped_metadata``); ``mpp``: level 0's microns per pixel, written
    into each level's resolution tags (so that :attr:`Slide.mpp` and OpenSlide read it back).
    """
    if tile % 16:
        raise ValueError(f"tile {tile} is not a multiple of 16 (TIFF tiles must be)")
    shapes = [(-(-height // 2**k), -(-width // 2**k)) for k in range(levels)]
    photometric = "rgb" if channels == 3 else "minisblack"
    with atomic_path(path, overwrite=overwrite) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, shape in enumerate(shapes):
            extra = {"subifds": levels - 1, "metadata": metadata or {}} if k == 0 else {"subfiletype": 1}
            if mpp is not None:
                extra |= {"resolution": (1e4 / (mpp * 2**k),) * 2, "resolutionunit": "CENTIMETER"}
            tw.write(_tiles(source, shape, channels, tile, 2**k, drawn), shape=(*shape, channels)[:2 + (channels > 1)],
                     dtype=np.uint8,
                     tile=(tile, tile), photometric=photometric, compression=compression, **extra)
    return Path(path)
