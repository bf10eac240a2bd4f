"""Run-length encoding of binary masks in the Kaggle convention (HuBMAP and the other segmentation challenges).

Pixels are numbered from 1 down each column, then column by column (column-major: top to bottom, then left to
right); a mask is the string ``"start length start length ..."`` of its foreground runs, starts increasing.
An empty mask is the empty string. Masks of slides do not fit in memory, so both directions stream:
:func:`encode_strips` takes the mask as column strips (any width each), :func:`decode_into` writes runs into an
(H, W) array that may be a memory map (column-major on disk, so each run is one contiguous write).

A string that is not pairs of positive integers, whose runs are not sorted or overlap, or that runs past the
mask raises :class:`RLEError` naming the first bad run. :func:`encode_files` and :func:`decode_csv` are
``stas rle``'s work: mask files to one RLE CSV and back, slide-sized masks read and written by strips or windows.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image

from stas_pipeline.core.errors import NothingWrittenError, StasError, refused
from stas_pipeline.core.fileio import OutputExistsError, atomic_folder, atomic_path, write_png
from stas_pipeline.core.geojson import GeoJSONStyle, band_features, mask_features, write_geojson
from stas_pipeline.core.images import IMAGE_SUFFIXES, SLIDE_SUFFIXES, strip_suffix
from stas_pipeline.core.mask_io import read_grey_png
from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.slide.reader import Slide, write_slide


class RLEError(StasError, ValueError):
    """An RLE string that does not describe a mask of the given size, or a CSV without its columns."""


class RLEFileError(StasError, OSError):
    """An RLE CSV, mask or output folder that the system cannot read or write (its message kept)."""



ID_COLUMNS, ENCODING_COLUMNS = ("id", "image", "image_id"), ("encoding", "predicted", "rle")


def _runs_of(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based starts and lengths of the nonzero runs of a 1-D array."""
    pad = np.zeros(1, np.int8)  # int8 throughout: a Python [0] would promote a strip of a slide to int64
    edges = np.flatnonzero(np.diff(np.concatenate((pad, (flat != 0).view(np.int8), pad))))
    return edges[0::2], edges[1::2] - edges[0::2]


def runs_of_strips(strips: Iterable[ArrayLike], height: int) -> Iterator[tuple[int, int]]:
    """The (1-based start, length) runs of a mask given as consecutive column strips, each (height, w); a run
    crossing from one strip into the next comes out once."""
    offset, pending = 0, None  # pending: a run that reached the end of the last strip
    for strip in strips:
        strip = np.asarray(strip)
        if strip.ndim != 2 or strip.shape[0] != height:
            raise ValueError(f"column strip of shape {strip.shape}; expected ({height}, width)")
        starts, lengths = _runs_of(strip.ravel(order="F"))
        starts = starts + offset
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            if pending is not None and start == pending[0] + pending[1]:
                pending = (pending[0], pending[1] + length)
                continue
            if pending is not None:
                yield pending[0] + 1, pending[1]
            pending = (start, length)
        offset += strip.size
        if pending is not None and pending[0] + pending[1] < offset:
            yield pending[0] + 1, pending[1]
            pending = None
    if pending is not None:
        yield pending[0] + 1, pending[1]


def encode_strips(strips: Iterable[ArrayLike], height: int) -> str:
    """The RLE string of a mask given as consecutive column strips (see :func:`runs_of_strips`)."""
    return " ".join(f"{start} {length}" for start, length in runs_of_strips(strips, height))


def encode(mask: ArrayLike) -> str:
    """The RLE string of a 2-D mask (nonzero = foreground)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a 2-D mask is needed, got shape {mask.shape}")
    return encode_strips([mask], mask.shape[0])


def parse(rle: str, size: int) -> np.ndarray:
    """The runs of ``rle`` as an (n, 2) int64 array of 0-based starts and lengths, checked against a mask of
    ``size`` pixels: :class:`RLEError` for anything but pairs of positive integers, unsorted or overlapping runs,
    or a run past the end."""
    tokens = rle.split()
    if len(tokens) % 2:
        raise RLEError(f"{len(tokens)} numbers: an RLE string holds start/length pairs")
    try:
        values = np.array([int(t) for t in tokens], dtype=np.int64).reshape(-1, 2)
    except ValueError as err:
        raise RLEError(f"not an integer: {err}") from None
    if not len(values):
        return values
    starts, lengths = values[:, 0] - 1, values[:, 1]
    checks = (
        (starts < 0, "starts at {s} (pixels are numbered from 1)"),
        (lengths < 1, "has length {n} (at least 1)"),
        (starts + lengths > size, "runs past the last pixel ({size})"),
        (np.concatenate(([False], starts[1:] < starts[:-1] + lengths[:-1])),
         "is not after the end of the run before it (runs must be sorted and must not overlap)"),
    )
    for bad, reason in checks:
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            s, n = int(starts[k]) + 1, int(lengths[k])
            raise RLEError(f"run {k + 1} ({s} {n}) " + reason.format(s=s, n=n, size=size))
    return np.stack([starts, lengths], axis=1)


def decode_into(rle: str, out: np.ndarray, value: int = 1) -> np.ndarray:
    """Set the pixels of ``rle`` to ``value`` in ``out`` (H, W), which the caller has zeroed; column-major
    (Fortran-ordered) ``out`` takes each run as one slice, a C-ordered one column by column. Returns ``out``."""
    if out.ndim != 2:
        raise ValueError(f"a 2-D output is needed, got shape {out.shape}")
    height = out.shape[0]
    runs = parse(rle, out.size)
    if out.flags.f_contiguous:
        flat = out.ravel(order="F")  # a view of an F-contiguous array
        for start, length in runs.tolist():
            flat[start:start + length] = value
        return out
    for start, length in runs.tolist():
        end = start + length
        while start < end:
            col, row = divmod(start, height)
            stop = min(end, (col + 1) * height)
            out[row:row + stop - start, col] = value
            start = stop
    return out


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """The (H, W) uint8 mask (0/1) of ``rle``."""
    out = np.zeros(shape, dtype=np.uint8, order="F")
    return np.ascontiguousarray(decode_into(rle, out))


class RLEMask:
    """A mask of ``shape`` (H, W) held as its checked runs; :meth:`window` decodes one window only."""

    def __init__(self, rle: str, shape: tuple[int, int]):
        self.shape = (int(shape[0]), int(shape[1]))
        runs = parse(rle, self.shape[0] * self.shape[1])
        self.starts, self.ends = runs[:, 0], runs[:, 0] + runs[:, 1]

    def window(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The (h, w) uint8 window (0/1) at (y, x); 0 outside the mask."""
        height, width = self.shape
        out = np.zeros((h, w), dtype=np.uint8)
        y0, y1 = max(y, 0), min(y + h, height)
        if y0 >= y1:
            return out
        for col in range(max(x, 0), min(x + w, width)):
            lo, hi = col * height + y0, col * height + y1
            first, last = np.searchsorted(self.ends, lo, "right"), np.searchsorted(self.starts, hi, "left")
            for start, end in zip(self.starts[first:last].tolist(), self.ends[first:last].tolist(), strict=True):
                out[max(start, lo) - col * height - y:min(end, hi) - col * height - y, col - x] = 1
        return out

    def image(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The window as a grey image, (h, w, 1) uint8 0/255 (a source for :func:`write_slide`)."""
        return self.window(y, x, h, w)[..., None] * np.uint8(255)


def file_id(path: str | Path) -> str:
    """The id of a slide or mask file: its name without the slide or image suffix (``a.ome.tif`` -> ``a``)."""
    return strip_suffix(path, (*SLIDE_SUFFIXES, *IMAGE_SUFFIXES))


def read_rle_csv(path: str | Path) -> list[tuple[str, str]]:
    """(id, encoding) rows of an RLE CSV whose header names an id column and an encoding column (a UTF-8 BOM
    is accepted)."""
    csv.field_size_limit(2**31 - 1)  # a slide's RLE runs to megabytes; the csv module stops at 128 KiB by default
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        id_col = next((c for c in ID_COLUMNS if c in fields), None)
        enc_col = next((c for c in ENCODING_COLUMNS if c in fields), None)
        if id_col is None or enc_col is None:
            raise RLEError(f"{path}: header {fields} lacks an id column ({'/'.join(ID_COLUMNS)}) or an "
                                   f"encoding column ({'/'.join(ENCODING_COLUMNS)})")
        return [(row[id_col], row[enc_col] or "") for row in reader]


def write_rle_csv(rows: list[tuple[str, str]], out: str | Path, overwrite: bool = False) -> None:
    with atomic_path(out, overwrite) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "encoding"])
        writer.writerows(rows)


STAGE = "rle"
STRIP = 1024  # columns per strip when a TIFF mask is read


def _tiff_strips(slide: Slide) -> Iterator[np.ndarray]:
    height, width = slide.level_shape(0)
    for x in range(0, width, STRIP):
        yield slide.read(0, x, height, min(STRIP, width - x))[..., 0]


def encode_mask_file(path: str | Path, problems: Problems | None = None) -> str:
    """The RLE string of one mask file (TIFFs read by column strips). A JPEG is refused (lossy: its pixels are
    not the mask's); a mask of several channels is read as grey (a TIFF: its first channel) with a warning in
    ``problems``."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        raise ValueError("a JPEG mask is lossy (its pixels are not 0/255 but smeared around the edges); save "
                         "masks as PNG or TIFF")
    if suffix in (".tif", ".tiff", ".svs"):
        with Slide(path) as slide:
            if slide.channels > 1 and problems is not None:
                problems.warn(path, f"{slide.channels} channels; the first is encoded (masks should be "
                                    "single-channel)")
            return encode_strips(_tiff_strips(slide), slide.level_shape(0)[0])
    return encode(read_grey_png(path, problems))


def _system_errors() -> contextlib.AbstractContextManager:
    """An OSError that is not already a StasError (a CSV not found, a folder not writable) as RLEFileError."""
    return refused((OSError,), RLEFileError)


@_system_errors()
def encode_files(masks: list[Path], out: Path, overwrite: bool = False) -> Problems:
    """``out``: an RLE CSV of every mask file (id: the file name without its suffix); unreadable masks and
    repeated ids are reported and skipped; NothingWrittenError when every one was."""
    problems = Problems(f"{STAGE} encode")
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    rows, seen = [], {}
    for path in masks:
        ident = file_id(path)
        try:
            if ident in seen:
                raise ValueError(f"id {ident!r} also comes from {seen[ident]}")
            rows.append((ident, encode_mask_file(path, problems)))
            seen[ident] = path
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            problems.skip(path, str(err))
    if not rows:
        raise NothingWrittenError(f"{out}: every mask was skipped; nothing written")
    write_rle_csv(rows, out, overwrite)
    problems.count("encoded", len(rows))
    return problems


def _sizes_like(files: list[Path], problems: Problems) -> dict[str, tuple[int, int]]:
    """(height, width) of each readable file by its id; unreadable files are reported."""
    sizes = {}
    for path in files:
        try:
            if path.suffix.lower() in (".tif", ".tiff", ".svs"):
                with Slide(path) as slide:
                    sizes[file_id(path)] = slide.level_shape(0)
            else:
                with Image.open(path) as img:
                    sizes[file_id(path)] = (img.height, img.width)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            problems.skip(path, f"cannot take its size: {err}")
    return sizes


@_system_errors()
def decode_csv(csv_path: Path, out: Path, shape: tuple[int, int] | None, like: list[Path], fmt: str = "png",
               overwrite: bool = False, geojson: GeoJSONStyle | None = None) -> Problems:
    """``out/<id>.png`` (or tiled ``.tif`` with ``fmt="tif"``) for every row of an RLE CSV, each of ``shape`` or
    of the ``like`` file of the same id, and with ``geojson`` ``out/<id>.geojson`` (a TIFF's read back by bands);
    bad rows are reported and skipped; the folder appears when complete (NothingWrittenError when no row could
    be decoded)."""
    problems = Problems(f"{STAGE} decode")
    rows = read_rle_csv(csv_path)
    sizes = _sizes_like(like, problems)
    done = set()
    with atomic_folder(out, overwrite) as tmp:
        for ident, rle in rows:
            size = shape or sizes.get(ident)
            try:
                if ident in done or not ident or Path(ident).name != ident:
                    raise ValueError("a repeated id" if ident in done else f"id {ident!r} is not a file name")
                if size is None:
                    raise ValueError(f"no size: no --like file named {ident}.* and no --shape")
                if fmt == "png":
                    mask = decode(rle, size)
                    write_png(tmp / f"{ident}.png", mask * 255)
                    if geojson is not None:
                        write_geojson(tmp / f"{ident}.geojson", mask_features(mask, style=geojson))
                else:
                    write_slide(tmp / f"{ident}.tif", RLEMask(rle, size).image, size[0], size[1], channels=1,
                                levels=3)
                    if geojson is not None:
                        with Slide(tmp / f"{ident}.tif") as slide:
                            write_geojson(tmp / f"{ident}.geojson", band_features(
                                lambda y0, y1, s=slide, w=size[1]: (s.read(y0, 0, y1 - y0, w)[..., 0], None),
                                size[0], geojson, width=size[1]))
                problems.count("decoded")
                done.add(ident)
            except (RLEError, ValueError) as err:
                problems.skip(f"{csv_path} id {ident}", str(err))
        if not problems.counts["decoded"]:
            raise NothingWrittenError(f"{out}: none of the {len(rows)} rows of {csv_path} could be decoded; "
                                        "nothing written")
    return problems
