"""Tiles of whole slides as samples of the shared LMDB cache.

A tile entry of a datalist is an ordinary segmentation entry whose ``image`` is the slide file and whose
``label`` is the mask source, plus the window::

    {"image": "slides/a.tif", "label": "train.csv", "label_id": "a",
     "tile": {"y": 512, "x": 1024, "size": 1024, "scale": 4}, "fold": 0, "group": "a",
     "tissue": 0.83, "mask_fraction": 0.021}

``size`` is the window's side in level-0 pixels, ``scale`` the downscaling: the cached tile is
``size / scale`` pixels across (read from the largest pyramid level at most ``scale`` times smaller, then
averaged down), its mask the window's mask averaged down and cut at 0.5. Tiles cut at a physical resolution
(``TileSpec.mpp``, microns per pixel; :meth:`TileSpec.at`) have each slide's own scale, ``mpp / Slide.mpp``: an
integer when within 1 % of one (read as above), else a float (``size / scale`` pixels across all the same), for
which the window is resized by exact area averaging from the coarsest level at least as fine as the target,
and its mask likewise. The mask source (:func:`open_mask`) is
an RLE CSV (``label_id`` names the row; Kaggle's convention, ``tasks/slide/rle.py``), a mask image of the slide's
size (a TIFF read by window, or a PNG), or polygons (GeoJSON features with their holes, read exactly as
``stas predict --geojson`` writes them, or a LabelMe file) rasterised per window. :func:`load_tile` is what
the cache builder calls for entries with a ``tile``; the cache keys them by slide and window and checks the
slide's and the mask file's identity like any other source.

:func:`tile_grid` lays out overlapping windows (``stride`` apart; optionally the grid again shifted by a quarter
of a tile, the recipe's extra tiles); :func:`plan_tiles` keeps those over tissue and records their tissue and
mask fractions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import shapely
from PIL import Image, ImageDraw

from stas_pipeline.core.errors import StasError
from stas_pipeline.core.geojson import polygonal, rasterize
from stas_pipeline.core.images import SLIDE_MASK_SUFFIXES, SLIDE_SUFFIXES, has_suffix
from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.slide.reader import Slide, SlideError
from stas_pipeline.tasks.slide.rle import RLEError, RLEMask, file_id, read_rle_csv
from stas_pipeline.tasks.slide.tissue import thumbnail, tissue_mask

MaskWindow = Callable[[int, int, int, int], np.ndarray]  # (y, x, h, w) -> (h, w) uint8 0/1


def scaled(level0: int, scale: int | float) -> int:
    """A level-0 coordinate in the pixels of an image ``scale`` times smaller (a float scale: the nearest)."""
    return level0 // scale if isinstance(scale, int) else round(level0 / scale)


@dataclass(frozen=True)
class TileSpec:
    """Tiles of ``size`` level-0 pixels, ``stride`` apart, cached ``scale`` times smaller (an integer, or a slide's
    own float scale by mpp). With ``mpp`` (microns per pixel), ``size`` and ``stride`` are pixels at that
    resolution and :meth:`at` gives each slide's level-0 spec."""

    size: int = 1024
    stride: int = 512
    scale: int | float = 4
    quarter_shift: bool = False
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.size <= 0 or self.stride <= 0 or self.scale <= 0 or abs(self.size / self.scale - self.out) > 1e-6 \
                or (self.mpp is not None and self.mpp <= 0):
            raise ValueError(f"tile size {self.size}, stride {self.stride}, scale {self.scale}, mpp {self.mpp}: "
                             "positive, and the size a multiple of the scale")

    @property
    def out(self) -> int:
        """The cached tile's side."""
        return round(self.size / self.scale)

    def scaled(self, level0: int) -> int:
        """A level-0 coordinate in cached-tile pixels (:func:`scaled`)."""
        return scaled(level0, self.scale)

    def scaled_shape(self, height: int, width: int) -> tuple[int, int]:
        """A level-0 (height, width) in cached-tile pixels, rounded up: the shape of a slide's prediction map."""
        return math.ceil(height / self.scale), math.ceil(width / self.scale)

    def at(self, slide: Slide) -> TileSpec:
        """This spec in ``slide``'s level-0 pixels: itself without ``mpp``; with it, the scale ``mpp /
        slide.mpp`` (an integer when within 1 % of one; else ``size`` rounded to level-0 pixels and the scale made
        exact). SlideError: the slide has no mpp, or is coarser than ``mpp``."""
        if self.mpp is None:
            return self
        if slide.mpp is None:
            raise SlideError(f"{slide.path}: no physical pixel size in its metadata (TIFF resolution, Aperio MPP, "
                             "OME PhysicalSizeX, OpenSlide mpp-x); use --scale for it instead of --mpp")
        scale = self.mpp / slide.mpp
        if scale < 0.99:
            raise SlideError(f"{slide.path}: scanned at {slide.mpp:.4g} um/px, coarser than the {self.mpp:g} um/px "
                             "asked (slides are not upsampled)")
        if abs(scale - round(scale)) <= 0.01 * scale:
            n = round(scale)
            return TileSpec(self.size * n, self.stride * n, n, self.quarter_shift)
        size = round(self.size * scale)
        return TileSpec(size, max(1, round(self.stride * size / self.size)), size / self.size, self.quarter_shift)


def tile_grid(height: int, width: int, spec: TileSpec) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of windows covering a ``height`` x ``width`` slide, ``spec.stride`` apart (the last
    row and column may reach past the edge); with ``quarter_shift`` also the grid shifted by size / 4 both ways."""
    def axis(n: int, offset: int) -> list[int]:
        return list(range(offset, max(n - spec.size, 0) + spec.stride, spec.stride)) if offset < n else []

    corners = [(y, x) for y in axis(height, 0) for x in axis(width, 0)]
    if spec.quarter_shift:
        q = spec.size // 4
        corners += [(y, x) for y in axis(height, q) for x in axis(width, q)]
    return corners


def _area_down(window: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks of an (h, w[, C]) array (h, w multiples of ``factor``)."""
    if factor == 1:
        return window.astype(np.float32)
    h, w = window.shape[:2]
    return window.reshape(h // factor, factor, w // factor, factor, *window.shape[2:]).mean(axis=(1, 3))


# ---------------------------------------------------------------------------- mask sources


class MaskError(StasError, ValueError):
    """A slide's mask source that cannot be used: unreadable, not JSON, a size (declared or actual) that is not the
    slide's, a bad RLE row. ``source`` names it (the file, or the CSV and the row's id), ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


def _ring(points: object, where: str) -> np.ndarray:
    """The (n, 2) float64 (x, y) vertices of one polygon; ValueError naming ``where`` for anything else."""
    try:
        ring = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        ring = None
    if ring is None or ring.ndim != 2 or ring.shape[1] < 2:
        raise ValueError(f"{where}: points are not a list of (x, y) pairs")
    return ring[:, :2]


def _check_labelme_size(data: dict, shape: tuple[int, int]) -> None:
    """ValueError when a LabelMe file's ``imageHeight``/``imageWidth`` are not the slide's level-0 size."""
    declared = (data.get("imageHeight"), data.get("imageWidth"))
    if declared != (None, None) and declared != tuple(shape):
        raise ValueError(f"LabelMe imageWidth x imageHeight {declared[1]}x{declared[0]}, the slide {shape[1]}x"
                         f"{shape[0]} (level 0): its polygons were drawn on another image (a downscaled copy?)")


def _polygons_of(data: object, shape: tuple[int, int]) -> tuple[list[shapely.Polygon], bool]:
    """The polygons of parsed JSON, and whether they are GeoJSON: LabelMe shapes (whose declared size must be
    ``shape``), or GeoJSON Polygon/MultiPolygon features with their interior rings (holes)."""
    if isinstance(data, dict) and "shapes" in data:  # LabelMe
        _check_labelme_size(data, shape)
        shapes = data["shapes"] if isinstance(data["shapes"], list) else []
        return [shapely.Polygon(_ring(s["points"], f"shape {k + 1}")) for k, s in enumerate(shapes)
                if isinstance(s, dict) and len(s.get("points") or []) >= 3], False
    features = data.get("features", [data]) if isinstance(data, dict) else data
    if not isinstance(features, list):
        raise ValueError("neither GeoJSON features nor LabelMe shapes")
    polygons = []
    for k, feature in enumerate(f for f in features if isinstance(f, dict)):
        geometry = feature.get("geometry", feature)
        kind, coordinates = (geometry.get("type"), geometry.get("coordinates")) if isinstance(geometry, dict) \
            else (None, None)
        try:
            parts = [coordinates] if kind == "Polygon" else list(coordinates) if kind == "MultiPolygon" else []
            parts = [[_ring(ring, f"feature {k + 1}") for ring in rings] for rings in parts]
        except (TypeError, IndexError, KeyError):
            parts = [[]]
        if not all(parts):
            raise ValueError(f"feature {k + 1}: {kind} without coordinates")
        polygons += [shapely.Polygon(shell, [h for h in holes if len(h) >= 3]) for shell, *holes in parts
                     if len(shell) >= 3]
    return polygons, True


def _made_valid(polygons: list[shapely.Polygon], holes: bool) -> tuple[list[shapely.Polygon], list[str]]:
    """The polygons with each invalid one (self-intersecting, ...) replaced by the polygonal parts of shapely's
    ``make_valid`` of it (with ``holes``, else their outer rings), and why each replaced one was invalid; valid
    polygons are kept as they are."""
    out, repairs = [], []
    for k, polygon in enumerate(polygons):
        if polygon.is_valid:
            out.append(polygon)
            continue
        repairs.append(f"polygon {k + 1}: {shapely.is_valid_reason(polygon)}")
        parts = polygonal(shapely.make_valid(polygon))
        out += parts if holes else [shapely.Polygon(part.exterior) for part in parts]
    return out, repairs


def _read_polygons(path: Path, shape: tuple[int, int]) -> PolygonMask:
    """The polygon mask of a GeoJSON or LabelMe file, invalid polygons repaired (see :func:`_made_valid`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not JSON ({err})") from None
    polygons, geojson = _polygons_of(data, shape)
    return PolygonMask(*_made_valid(polygons, geojson), pixel_edges=geojson)


class PolygonMask:
    """Polygons rasterised per window (only those whose bounding box meets it); ``repairs`` says which were
    invalid and repaired. GeoJSON (``pixel_edges``): vertices on pixel edges, a pixel inside when its centre is,
    holes honoured (:func:`~stas_pipeline.core.geojson.rasterize`, the inverse of ``stas predict --geojson``);
    LabelMe: vertices at pixel centres, outer rings drawn by PIL, as LabelMe draws its own masks."""

    def __init__(self, polygons: Sequence[shapely.Polygon], repairs: Sequence[str] = (), pixel_edges: bool = True):
        self.polygons = list(polygons)
        self.repairs = list(repairs)
        self.pixel_edges = pixel_edges
        self.boxes = shapely.bounds(np.asarray(self.polygons, dtype=object)).reshape(-1, 4)

    def window(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        b = self.boxes
        chosen = [self.polygons[k] for k in
                  np.flatnonzero((b[:, 2] >= x) & (b[:, 0] < x + w) & (b[:, 3] >= y) & (b[:, 1] < y + h))]
        if self.pixel_edges:
            return rasterize(chosen, y, x, h, w)
        canvas = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon in chosen:
            draw.polygon([(px - x, py - y) for px, py in shapely.get_coordinates(polygon.exterior).tolist()], fill=1)
        return np.asarray(canvas, dtype=np.uint8)


def polygon_repairs(mask: MaskWindow) -> list[str]:
    """The invalid polygons repaired in a mask of :func:`open_mask` (none for a mask that is not polygons)."""
    owner = getattr(mask, "__self__", None)
    return owner.repairs if isinstance(owner, PolygonMask) else []


class ImageMask:
    """A mask image of the slide's size: a TIFF read by window, anything else PIL reads whole."""

    def __init__(self, path: Path):
        self.slide = Slide(path) if path.suffix.lower() in (".tif", ".tiff") else None
        self.array = None if self.slide else (np.asarray(Image.open(path).convert("L")) > 0).astype(np.uint8)
        self.shape = self.slide.level_shape(0) if self.slide else self.array.shape

    def window(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        if self.slide is not None:
            return (self.slide.read(y, x, h, w)[..., 0] > 0).astype(np.uint8)
        padded = np.zeros((h, w), np.uint8)
        part = self.array[max(y, 0):y + h, max(x, 0):x + w]
        padded[max(y, 0) - y:max(y, 0) - y + part.shape[0], max(x, 0) - x:max(x, 0) - x + part.shape[1]] = part
        return padded


def _rle_row(path: Path, mask_id: str) -> str:
    for ident, rle in read_rle_csv(path):
        if ident == mask_id:
            return rle
    raise ValueError(f"no row with id {mask_id!r}")


def _mask_window(p: Path, mask_id: str | None, shape: tuple[int, int]) -> MaskWindow:
    if p.suffix.lower() == ".csv":
        if not mask_id:
            raise ValueError("an RLE CSV needs the entry's label_id")
        try:
            return RLEMask(_rle_row(p, mask_id), shape).window
        except RLEError as err:
            raise ValueError(f"{str(err).removeprefix(f'{p}: ')} (slide {shape[1]}x{shape[0]}, WxH)") from None
    if p.suffix.lower() in (".json", ".geojson"):
        return _read_polygons(p, shape).window
    mask = ImageMask(p)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH), the slide {shape[1]}x{shape[0]}")
    return mask.window


@lru_cache(maxsize=8)
def _open_mask(path: str, mask_id: str | None, shape: tuple[int, int], identity: tuple) -> MaskWindow:
    p = Path(path)
    try:
        return _mask_window(p, mask_id, shape)
    except (ValueError, OSError) as err:  # RLEError and SlideError included
        source = f"{p} id {mask_id}" if p.suffix.lower() == ".csv" and mask_id else str(p)
        raise MaskError(source, str(err).removeprefix(f"{p}: ")) from None


def open_mask(path: str | Path, mask_id: str | None, shape: tuple[int, int]) -> MaskWindow:
    """The window function of a slide's mask (see the module doc); the last few are kept open per process.
    :class:`MaskError` names a source that cannot be used."""
    st = Path(path).stat()
    return _open_mask(str(Path(path).resolve()), mask_id, tuple(shape), (st.st_size, st.st_mtime_ns))


@lru_cache(maxsize=8)
def _open_slide(path: str, identity: tuple) -> Slide:
    return Slide(path)


def open_slide(path: str | Path) -> Slide:
    """The slide at ``path``, kept open per process (reopened when the file changes)."""
    st = Path(path).stat()
    return _open_slide(str(Path(path).resolve()), (st.st_size, st.st_mtime_ns))


# ---------------------------------------------------------------------------- reading tiles


def read_level(slide: Slide, scale: int) -> tuple[int, int]:
    """(level, factor): the smallest pyramid level whose downsample divides ``scale`` (within 1 %), and the
    factor left to average down; level 0 and ``scale`` when none does."""
    best = (0, scale)
    for k in range(1, slide.level_count):
        f = scale / slide.downsample(k)
        if f > 0.99 and abs(f - round(f)) < 0.01 * f and round(f) < best[1]:
            best = (k, max(1, round(f)))
    return best


def _area_axis(a: np.ndarray, start: float, extent: float, out: int, axis: int) -> np.ndarray:
    """Means of ``a`` along ``axis`` over ``out`` equal spans covering [start, start + extent) (pixel i covers
    [i, i + 1)): area averaging, exact for fractional spans (from the integral of the piecewise-constant row)."""
    a = np.moveaxis(a, axis, 0).astype(np.float64)
    integral = np.concatenate([np.zeros_like(a[:1]), np.cumsum(a, axis=0)])
    edges = start + extent / out * np.arange(out + 1)
    i = np.clip(np.floor(edges).astype(int), 0, len(a) - 1)
    at = integral[i] + (edges - i).reshape(-1, *[1] * (a.ndim - 1)) * a[i]
    return np.moveaxis(np.diff(at, axis=0) * (out / extent), 0, axis)


def _resized(read: Callable[[int, int, int, int], np.ndarray], top: float, left: float, extent: float,
             out: int) -> np.ndarray:
    """The square of side ``extent`` at (top, left) (fractional pixels of ``read(y, x, h, w)``'s image) resized
    by area to (out, out[, C]), float."""
    y0, x0 = math.floor(top), math.floor(left)
    window = read(y0, x0, math.ceil(top + extent) - y0, math.ceil(left + extent) - x0)
    return _area_axis(_area_axis(window, top - y0, extent, out, 0), left - x0, extent, out, 1)


def read_tile_image(slide: Slide, y: int, x: int, spec: TileSpec) -> np.ndarray:
    """The (out, out, 3) uint8 tile at level-0 corner (y, x) (an integer scale: see :func:`read_level`; a float
    one: tile pixels ``spec.scaled(y)`` on, resized from the coarsest level at least as fine); outside the slide
    white."""
    if not isinstance(spec.scale, int):
        level = max((k for k in range(slide.level_count) if slide.downsample(k) <= 1.01 * spec.scale), default=0)
        down = slide.downsample(level)
        window = _resized(lambda *w: slide.read_rgb(*w, level=level), spec.scaled(y) * spec.scale / down,
                          spec.scaled(x) * spec.scale / down, spec.size / down, spec.out)
        return np.rint(window).astype(np.uint8)
    level, factor = read_level(slide, spec.scale)
    down = spec.scale / factor
    window = slide.read_rgb(round(y / down), round(x / down), spec.out * factor, spec.out * factor, level=level)
    return np.rint(_area_down(window, factor)).astype(np.uint8)


def read_tile_mask(mask: MaskWindow, y: int, x: int, spec: TileSpec) -> np.ndarray:
    """The (out, out) uint8 0/1 mask of the tile: the level-0 window averaged down (resized by area for a float
    scale, as :func:`read_tile_image`), cut at 0.5."""
    if not isinstance(spec.scale, int):
        window = _resized(mask, spec.scaled(y) * spec.scale, spec.scaled(x) * spec.scale, spec.size, spec.out)
        return (window >= 0.5).astype(np.uint8)
    return (_area_down(mask(y, x, spec.size, spec.size), spec.scale) >= 0.5).astype(np.uint8)


def load_tile(item: dict) -> dict:
    """What the cache builder's loading step gives for a tile entry: ``image`` (out, out, C) and ``label``
    (out, out) arrays (see the module doc)."""
    t = item["tile"]
    spec = TileSpec(size=t["size"], stride=t["size"], scale=t["scale"])
    slide = open_slide(item["image"])
    out = {"image": read_tile_image(slide, t["y"], t["x"], spec)}
    if isinstance(item.get("label"), str):
        mask = open_mask(item["label"], item.get("label_id"), slide.level_shape(0))
        out["label"] = read_tile_mask(mask, t["y"], t["x"], spec)
    return out


def window_spec(tiles: dict, image_size: int, scale: int | None = None, mpp: float | None = None,
                size: int | None = None, stride: int | None = None) -> TileSpec:
    """The windows of slide prediction: the options given, else ``tiles`` (a tile datalist's settings, as a run
    trained on it records them), else windows of ``image_size`` (the run's) x 4 level-0 pixels, half a window
    apart. By mpp (``mpp``, or the
    datalist's unless ``scale`` is given) windows are ``image_size`` pixels at that resolution, each slide at its
    own scale (:meth:`TileSpec.at`)."""
    mpp = mpp or (None if scale else tiles.get("mpp"))
    same_units = (mpp is None) == (tiles.get("mpp") is None)  # the datalist's stride is in these pixels
    scale = 1 if mpp else scale or tiles.get("scale", 4)
    size = size or image_size * scale
    return TileSpec(size, stride or (tiles.get("stride") if same_units else None) or size // 2, scale, mpp=mpp)


# ---------------------------------------------------------------------------- planning


@dataclass
class TissueSettings:
    method: str = "saturation"
    threshold: float = 0.1
    thumbnail: int = 2048  # longer side of the thumbnail tissue is found on
    min_tissue: float = 0.05  # a tile is kept when at least this share of it is tissue


@dataclass
class SlidePlan:
    """The kept tiles of one slide, and what they were chosen on: the thumbnail, its tissue, its downsample; and
    the slide's own spec (:meth:`TileSpec.at`)."""

    tiles: list[dict]
    thumbnail: np.ndarray
    tissue: np.ndarray
    downsample: float
    spec: TileSpec


def plan_tiles(slide_path: str | Path, spec: TileSpec, tissue: TissueSettings,
               mask: MaskWindow | None = None) -> SlidePlan:
    """The tiles of one slide over tissue, as ``{"tile": ..., "tissue": share, "mask_fraction": share}`` (the
    mask fraction only with ``mask``), in the slide's own spec (by mpp: SlideError for a slide without one)."""
    with Slide(slide_path) as slide:
        spec = spec.at(slide)
        height, width = slide.level_shape(0)
        thumb, down = thumbnail(slide, tissue.thumbnail)
    if thumb.shape[-1] != 3:
        raise SlideError(f"{slide_path}: tissue detection needs an RGB slide, got {thumb.shape[-1]} channel(s)")
    found = tissue_mask(thumb, tissue.method, tissue.threshold)
    integral = np.pad(found.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    tiles = []
    for y, x in tile_grid(height, width, spec):
        r0, c0 = min(int(y / down), found.shape[0] - 1), min(int(x / down), found.shape[1] - 1)
        r1 = min(max(r0 + 1, int(np.ceil((y + spec.size) / down))), found.shape[0])
        c1 = min(max(c0 + 1, int(np.ceil((x + spec.size) / down))), found.shape[1])
        share = (integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]) / ((r1 - r0) * (c1 - c0))
        if share < tissue.min_tissue:
            continue
        entry = {"tile": {"y": y, "x": x, "size": spec.size, "scale": spec.scale}, "tissue": round(float(share), 4)}
        if mask is not None:
            entry["mask_fraction"] = round(float(mask(y, x, spec.size, spec.size).mean()), 5)
        tiles.append(entry)
    return SlidePlan(tiles, thumb, found, down, spec)


# ---------------------------------------------------------------------------- slides and their masks


def find_slides(paths: list[Path], problems: Problems) -> list[Path]:
    """Slide files given directly or found in folders (by suffix), sorted, each id once."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if has_suffix(p, SLIDE_SUFFIXES))
        elif path.exists():
            found.append(path)
        else:
            problems.skip(path, "no such file or folder")
    seen: dict[str, Path] = {}
    for path in found:
        if file_id(path) in seen:
            problems.skip(path, f"same id {file_id(path)!r} as {seen[file_id(path)]}")
        else:
            seen[file_id(path)] = path
    return list(seen.values())


def mask_sources(masks: Path | None) -> dict[str, tuple[Path, str | None]]:
    """Slide id -> (mask file, RLE row id or None): the masks of a folder, or the rows of an RLE CSV."""
    if masks is None:
        return {}
    if masks.is_dir():
        return {file_id(p): (p, None) for p in sorted(masks.iterdir()) if has_suffix(p, SLIDE_MASK_SUFFIXES)}
    return {ident: (masks, ident) for ident, _ in read_rle_csv(masks)}
