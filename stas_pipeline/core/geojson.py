"""Binary masks as GeoJSON in QuPath's format, and GeoJSON polygons back to masks, both exact to the pixel.

Coordinates are level-0 pixel units, origin top-left, on pixel edges: pixel (r, c) is the square x in [c, c + 1],
y in [r, r + 1]. A mask's polygons are the outlines of its pixels' squares, traced along the pixel edges (every
boundary edge of the mask chained into rings, in numpy), so :func:`rasterize` (a pixel is inside when its centre
is) gives the same pixels back. A mask traced at a scale (the slide's probability map, ``scale`` times smaller,
made level-0 by repeating each pixel ``scale`` x ``scale`` times) has its vertices multiplied by the scale and
clipped to the level-0 size: the outline of that level-0 mask, exactly.

Connectivity: a feature is an 8-connected component, as ``stas postprocess`` counts objects. Its polygons are
its 4-connected pieces (an OGC polygon's interior is connected: two pixels meeting at a corner are two polygons
of one ``MultiPolygon``), each with the background it encloses as interior rings (holes); rings meet at most at
corner points, so every geometry is valid (checked; ``shapely.make_valid`` would repair one, polygonal parts
kept). Exteriors run counter-clockwise, holes clockwise (RFC 7946, in the numbers).

Each feature: ``{"type": "Feature", "geometry": ..., "properties": {"objectType": "annotation" | "detection",
"classification": {"name": NAME, "color": [r, g, b]}, "measurements": {"area": level-0 pixels,
"mean_probability": over its pixels (when a probability map is given)}}}``, in a ``FeatureCollection``.
A mask too large for memory is given by bands of rows (:func:`band_features`): each band is traced alone, and
the pieces that touch a band border are merged with their neighbours across it (shapely's union) before they
are written.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from scipy import ndimage
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from stas_pipeline.core.fileio import atomic_path

OBJECT_TYPES = ("annotation", "detection")
DEFAULT_CLASS, DEFAULT_COLOR = "foreground", (255, 0, 0)
BAND_PIXELS = 1 << 24  # pixels per band of :func:`band_features` by default
RASTER_CELLS = 1 << 22  # window cells accumulated at once by :func:`rasterize`
_DX, _DY = np.array([1, 0, -1, 0]), np.array([0, 1, 0, -1])  # edge directions: east, south, west, north
_FOUR, _EIGHT = ndimage.generate_binary_structure(2, 1), np.ones((3, 3), bool)

BandReader = Callable[[int, int], tuple[np.ndarray, np.ndarray | None]]  # (y0, y1) -> mask rows, probabilities


@dataclass(frozen=True)
class GeoJSONStyle:
    """What the features are in QuPath: object type, class name and colour; ``simplify``: the tolerance (level-0
    pixels) of shapely's topology-preserving simplification, 0 for the exact pixel outlines."""

    object_type: str = "annotation"
    name: str = DEFAULT_CLASS
    color: tuple[int, int, int] = DEFAULT_COLOR
    simplify: float = 0.0


def add_geojson_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--geojson`` (``what`` says which files it adds), ``--geojson-type``, ``--geojson-class``, ``--simplify``."""
    parser.add_argument("--geojson", action="store_true",
                        help=f"also write {what} as QuPath GeoJSON: one feature per 8-connected object, outlines "
                             "on pixel edges in level-0 pixels, holes as interior rings")
    parser.add_argument("--geojson-type", choices=OBJECT_TYPES, default="annotation",
                        help="QuPath object type of the features (annotation)")
    parser.add_argument("--geojson-class", default=DEFAULT_CLASS, metavar="NAME",
                        help=f"QuPath classification of the features ({DEFAULT_CLASS})")
    parser.add_argument("--simplify", type=_tolerance, default=0.0, metavar="TOL",
                        help="simplify the outlines by this tolerance in level-0 pixels, topology kept (0: exact)")


def _tolerance(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def style_of(args: argparse.Namespace) -> GeoJSONStyle | None:
    """The style the options of :func:`add_geojson_options` ask for; None without ``--geojson``."""
    return GeoJSONStyle(args.geojson_type, args.geojson_class, simplify=args.simplify) if args.geojson else None


# ---------------------------------------------------------------------------- tracing


def _boundary_edges(mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """The unit edges between foreground and background: start vertex (x, y), direction (0 east, 1 south,
    2 west, 3 north; the foreground pixel on the left in (x, y) axes) and that pixel (row, column)."""
    p = np.pad(mask, 1)
    above, below = p[:-1, 1:-1], p[1:, 1:-1]  # either side of the horizontal grid lines y = 0..H
    left, right = p[1:-1, :-1], p[1:-1, 1:]  # either side of the vertical grid lines x = 0..W
    parts = []
    r, c = np.nonzero(below & ~above)  # top edges, eastward
    parts.append((c, r, 0, r, c))
    r, c = np.nonzero(left & ~right)  # right edges, southward
    parts.append((c, r, 1, r, c - 1))
    r, c = np.nonzero(above & ~below)  # bottom edges, westward
    parts.append((c + 1, r, 2, r - 1, c))
    r, c = np.nonzero(right & ~left)  # left edges, northward
    parts.append((c, r + 1, 3, r, c))
    return tuple(np.concatenate([np.broadcast_to(part[k], part[0].shape) for part in parts]).astype(np.int64)
                 for k in range(5))


def _cycles(x: np.ndarray, y: np.ndarray, d: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edges chained into closed rings: the edges in ring order (grouped by ring), each one's ring, and each
    edge's predecessor. Where two rings meet at a corner (a saddle: two foreground pixels touching diagonally),
    the ring turns left, towards its own pixel, so the two pixels stay in separate rings (4-connected pieces)."""
    n = len(x)
    key = (y * (width + 1) + x) * 4 + d
    order = np.argsort(key)
    keys = key[order]
    end = (y + _DY[d]) * (width + 1) + x + _DX[d]
    nxt = np.full(n, -1)
    for turn in (3, 0, 1):  # the last found wins: a left turn over straight on over a right turn
        want = end * 4 + (d + turn) % 4
        at = np.minimum(np.searchsorted(keys, want), n - 1)
        found = keys[at] == want
        nxt[found] = order[at[found]]
    _, ring = connected_components(coo_array((np.ones(n, np.int8), (np.arange(n), nxt)), shape=(n, n)),
                                   directed=True, connection="weak")
    by_ring = np.argsort(ring, kind="stable")
    starts = np.flatnonzero(np.r_[True, ring[by_ring][1:] != ring[by_ring][:-1]])
    pred = np.empty(n, np.int64)
    pred[nxt] = np.arange(n)
    succ, tail = nxt.copy(), pred[by_ring[starts]]  # each ring cut before its first edge
    succ[tail] = tail
    dist = np.ones(n, np.int64)
    dist[tail] = 0
    for _ in range(int(np.ceil(np.log2(max(2, np.diff(np.r_[starts, n]).max()))))):  # list ranking by doubling
        dist, succ = dist + dist[succ], succ[succ]
    walk = np.lexsort((-dist, ring))
    return walk, ring[walk], pred


def _split(vertices: list[int]) -> list[list[int]]:
    """A closed ring that passes a vertex twice (around a diagonal touch) cut there into simple rings (indices
    into ``vertices``)."""
    loops, stack, seen = [], [], {}
    for k, v in enumerate(vertices):
        if v in seen:
            at = seen[v]
            loops.append(stack[at:])
            for j in stack[at + 1:]:
                del seen[vertices[j]]
            del stack[at + 1:]
        else:
            seen[v] = len(stack)
            stack.append(k)
    return [*loops, stack]


def _rings(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The simple rings of ``mask``'s outlines: each corner vertex (x, y) in ring order, its ring (0, 1, ...
    ascending), and one foreground pixel (row, column) beside each ring."""
    x, y, d, pr, pc = _boundary_edges(mask)
    walk, ring, pred = _cycles(x, y, d, mask.shape[1])
    corner = d[walk] != d[pred[walk]]  # where the direction changes
    edges, ids = walk[corner], ring[corner]
    vertex = y[edges] * (mask.shape[1] + 1) + x[edges]
    pairs = np.lexsort((vertex, ids))
    twice = (vertex[pairs][1:] == vertex[pairs][:-1]) & (ids[pairs][1:] == ids[pairs][:-1])
    cut = np.isin(ids, ids[pairs][1:][twice])  # rings through a vertex twice: cut into simple rings
    parts_ids, parts_edges, next_id = [ids[~cut]], [edges[~cut]], ids.max() + 1
    cut_edges, cut_vertices = edges[cut], vertex[cut]  # in ring order, grouped by ring
    bounds = np.flatnonzero(np.r_[True, np.diff(ids[cut]) != 0, True])
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        for loop in _split(cut_vertices[a:b].tolist()):
            parts_edges.append(cut_edges[a:b][loop])
            parts_ids.append(np.full(len(loop), next_id))
            next_id += 1
    ids, edges = np.concatenate(parts_ids), np.concatenate(parts_edges)
    order = np.argsort(ids, kind="stable")
    ids, edges = np.unique(ids[order], return_inverse=True)[1], edges[order]
    head = edges[np.r_[0, np.flatnonzero(np.diff(ids)) + 1]]
    return np.column_stack([x[edges], y[edges]]), ids, pr[head], pc[head]


def _trace(mask: np.ndarray, top: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """The geometry of each 8-connected component of ``mask`` (rows shifted down by ``top``), its 8-labels and
    their number. See the module doc."""
    lab8, n8 = ndimage.label(mask, _EIGHT)
    if not n8:
        return np.empty(0, object), lab8, 0
    vertices, ids, pr, pc = _rings(mask)
    rings = shapely.linearrings(vertices + np.array([0, top]), indices=ids)
    piece = ndimage.label(mask, _FOUR)[0][pr, pc]
    order = np.lexsort((~shapely.is_ccw(rings), piece))  # each piece: its exterior (counter-clockwise), its holes
    _, at = np.unique(piece[order], return_inverse=True)
    polygons = shapely.polygons(rings[order], indices=at)
    first = np.r_[0, np.flatnonzero(np.diff(at)) + 1]
    owner = lab8[pr[order][first], pc[order][first]]  # each polygon's component
    order = np.argsort(owner, kind="stable")
    _, at, counts = np.unique(owner[order], return_inverse=True, return_counts=True)
    alone = polygons[order][np.r_[0, np.cumsum(counts)[:-1]]]
    return np.where(counts == 1, alone, shapely.multipolygons(polygons[order], indices=at)), lab8, n8


# ---------------------------------------------------------------------------- features


@dataclass
class _Piece:
    """A traced component of one band: its geometry (map pixels), pixel count and probability sum."""

    geometry: shapely.Geometry
    pixels: int
    probability: float | None


def polygonal(geometry: shapely.Geometry) -> list[shapely.Polygon]:
    """The polygons of any geometry (a collection's members included); lines and points left out."""
    parts = shapely.get_parts(geometry)
    out = []
    for part in parts:
        if isinstance(part, shapely.Polygon):
            out.append(part)
        elif isinstance(part, (shapely.MultiPolygon, shapely.GeometryCollection)):
            out += polygonal(part)
    return [p for p in out if not p.is_empty]


def _geometry_json(geometry: shapely.Geometry) -> dict:
    """A polygonal geometry as a GeoJSON Polygon or MultiPolygon (exteriors counter-clockwise), integer
    coordinates written as integers."""
    parts = shapely.get_parts(shapely.orient_polygons(geometry))
    rings, part_of = shapely.get_rings(parts, return_index=True)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    values = coords.astype(np.int64).tolist() if np.array_equal(coords, np.round(coords)) else coords.tolist()
    ends = np.cumsum(np.bincount(ring_of, minlength=len(rings))).tolist()
    polygons: list[list] = [[] for _ in parts]
    for part, start, end in zip(part_of.tolist(), [0, *ends[:-1]], ends, strict=True):
        polygons[part].append(values[start:end])
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def _feature(piece: _Piece, style: GeoJSONStyle, scale: float, shape: tuple[int, int] | None) -> dict | None:
    """A feature in QuPath's format; None when nothing polygonal is left of it."""
    limit = np.array([shape[1], shape[0]], np.float64) if shape is not None else np.inf
    geometry = shapely.transform(piece.geometry, lambda c: np.minimum(c * scale, limit))
    measurements = {"area": float(geometry.area)}
    if piece.probability is not None:
        measurements["mean_probability"] = round(piece.probability / max(piece.pixels, 1), 6)
    if style.simplify:
        geometry = shapely.simplify(geometry, style.simplify, preserve_topology=True)
    if not shapely.is_valid(geometry):
        geometry = shapely.MultiPolygon(polygonal(shapely.make_valid(geometry)))
    if geometry.is_empty:
        return None
    return {"type": "Feature", "geometry": _geometry_json(geometry),
            "properties": {"objectType": style.object_type,
                           "classification": {"name": style.name, "color": list(style.color)},
                           "measurements": measurements}}


def _merged(pieces: list[_Piece]) -> _Piece:
    """One piece of pieces that touch across band borders."""
    if len(pieces) == 1:
        return pieces[0]
    parts = polygonal(shapely.union_all([p.geometry for p in pieces]))
    geometry = parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)
    probability = None if pieces[0].probability is None else sum(p.probability for p in pieces)
    return _Piece(geometry, sum(p.pixels for p in pieces), probability)


def band_features(read: BandReader, rows: int, style: GeoJSONStyle = GeoJSONStyle(), band_rows: int | None = None,
                  width: int | None = None, scale: float = 1, shape: tuple[int, int] | None = None) -> Iterator[dict]:
    """The features of a mask of ``rows`` rows given by bands: ``read(y0, y1)`` returns its rows y0:y1 (bool
    or 0/nonzero) and their probabilities in [0, 1] (or None), ``band_rows`` at a time (default: about
    :data:`BAND_PIXELS` pixels, from ``width``). A mask ``scale`` times smaller than level 0 has its vertices
    scaled and clipped to ``shape`` (level-0 height, width). Each band is traced alone; components touching a
    band border are held until the band below shows they end, then merged into one feature."""
    band_rows = band_rows or max(1, BAND_PIXELS // max(1, width or 1))
    pending: dict[int, _Piece] = {}
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    above = None  # the global ids along the last row of the band above
    next_id = 1
    for y0 in range(0, rows, band_rows):
        y1 = min(rows, y0 + band_rows)
        mask, probability = read(y0, y1)
        mask = np.asarray(mask) != 0
        geometries, labels, n = _trace(mask, y0)
        pixels = np.bincount(labels.ravel(), minlength=n + 1)
        sums = None if probability is None else np.bincount(labels.ravel(), np.asarray(probability, np.float64).ravel(),
                                                             minlength=n + 1)
        ids = np.r_[0, np.arange(next_id, next_id + n)]
        next_id += n
        held = set(ids[labels[0]].tolist()) if y0 else set()
        below = set(ids[labels[-1]].tolist()) if y1 < rows else set()
        for k in range(1, n + 1):
            piece = _Piece(geometries[k - 1], int(pixels[k]), None if sums is None else float(sums[k]))
            if ids[k] in held or ids[k] in below:
                pending[ids[k]] = piece
                parent[ids[k]] = ids[k]
            else:
                feature = _feature(piece, style, scale, shape)
                if feature is not None:
                    yield feature
        if above is not None:
            top = ids[labels[0]]
            for shift in (-1, 0, 1):  # 8-connected across the border
                a = above[max(0, shift):len(above) + min(0, shift)]
                b = top[max(0, -shift):len(top) + min(0, -shift)]
                both = (a > 0) & (b > 0)
                for i, j in set(zip(a[both].tolist(), b[both].tolist(), strict=True)):
                    parent[root(i)] = root(j)
        above = ids[labels[-1]] if y1 < rows else None
        groups: dict[int, list[int]] = {}
        for i in pending:
            groups.setdefault(root(i), []).append(i)
        for members in groups.values():
            if below.isdisjoint(members):  # nothing of it reaches the band below: complete
                feature = _feature(_merged([pending.pop(i) for i in sorted(members)]), style, scale, shape)
                if feature is not None:
                    yield feature


def mask_features(mask: np.ndarray, probability: np.ndarray | None = None, style: GeoJSONStyle = GeoJSONStyle(),
                  scale: int = 1, shape: tuple[int, int] | None = None) -> list[dict]:
    """The features of a whole 2-D mask (nonzero = foreground), ``probability`` (in [0, 1], its shape) giving
    each one's ``mean_probability``; ``scale`` and ``shape`` as in :func:`band_features`."""
    mask = np.asarray(mask)

    def read(y0: int, y1: int) -> tuple[np.ndarray, np.ndarray | None]:
        return mask[y0:y1], None if probability is None else probability[y0:y1]

    return list(band_features(read, mask.shape[0], style, max(1, mask.shape[0]), scale=scale, shape=shape))


def write_geojson(path: str | Path, features: Iterable[dict], overwrite: bool = False) -> int:
    """Write ``features`` as a GeoJSON FeatureCollection, one feature a line, streamed and atomically (see
    :func:`~stas_pipeline.core.fileio.atomic_path`); returns how many were written."""
    count = 0
    with atomic_path(path, overwrite) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", "features": [')
        for feature in features:
            f.write(("," if count else "") + "\n" + json.dumps(feature, separators=(",", ":")))
            count += 1
        f.write("\n]}\n")
    return count


# ---------------------------------------------------------------------------- reading


def rasterize(polygons: Sequence[shapely.Geometry], y: int, x: int, h: int, w: int) -> np.ndarray:
    """The (h, w) uint8 0/1 window at (y, x) of ``polygons`` (Polygons or MultiPolygons, holes honoured, any
    ring orientation; overlaps count once): a pixel is 1 when its centre (c + 0.5, r + 0.5) is inside."""
    out = np.zeros((h, w), np.uint8)
    rings = shapely.get_rings(shapely.orient_polygons(np.asarray(polygonal(shapely.GeometryCollection(
        list(polygons))), dtype=object)))
    if not len(rings) or not h or not w:
        return out
    coords, index = shapely.get_coordinates(rings, return_index=True)
    same = index[1:] == index[:-1]
    (x0, y0), (x1, y1) = (coords[:-1][same] - (x, y)).T, (coords[1:][same] - (x, y)).T
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    first = np.clip(np.ceil(lo - 0.5), 0, h).astype(np.int64)  # rows whose centre lo <= r + 0.5 < hi
    count = np.clip(np.ceil(hi - 0.5), 0, h).astype(np.int64) - first
    edge = np.repeat(np.arange(len(first)), count)
    row = first[edge] + np.arange(len(edge)) - np.repeat(np.cumsum(count) - count, count)
    centre = row + 0.5
    cross = x0[edge] + (centre - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    column = np.clip(np.floor(cross - 0.5).astype(np.int64) + 1, 0, w)  # the first pixel right of the crossing
    step = np.where(y1[edge] > y0[edge], 1, -1)
    chunk = max(1, RASTER_CELLS // (w + 1))
    for r0 in range(0, h, chunk):
        sel = (row >= r0) & (row < r0 + chunk)
        n = min(chunk, h - r0)
        winding = np.bincount((row[sel] - r0) * (w + 1) + column[sel], step[sel], minlength=n * (w + 1))
        out[r0:r0 + n] = np.cumsum(winding.reshape(n, w + 1)[:, :w], axis=1) != 0
    return out
