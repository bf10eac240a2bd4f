"""LabelMe JSON annotations -> binary masks: reading and checking a LabelMe file, drawing its shapes as
``labelme.utils.shape_to_mask`` draws them (PIL ImageDraw at the float coordinates), converting a folder.

A file that cannot be converted raises :class:`ConversionError` saying why; :func:`convert_folder` reports it
and goes on with the others (``stas labelme-to-masks`` is the command).
"""

from __future__ import annotations

import glob
import json
import math
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from stas_pipeline.core.errors import StasError
from stas_pipeline.core.fileio import OutputExistsError, write_png
from stas_pipeline.core.images import InputFolderError
from stas_pipeline.core.problems import Problems

STAGE = "labelme-to-masks"

# shape_type -> (fewest points, most points or None); a missing or null shape_type means polygon.
SHAPE_POINTS: dict[str, tuple[int, int | None]] = {
    "polygon": (3, None),
    "rectangle": (2, 2),
    "circle": (2, 2),
    "line": (2, 2),
    "linestrip": (2, None),
    "point": (1, 1),
}
# A point farther outside the image than this many image sizes is taken for a corrupt file, not clipped.
FAR_OUTSIDE = 10


class ConversionError(StasError, ValueError):
    """A LabelMe file, or one of its shapes, that cannot be made into a mask; the message says why."""


@dataclass(frozen=True)
class Annotation:
    """The parts of a LabelMe file that a mask needs."""

    height: int
    width: int
    image_path: str  # "" when the file has none
    shapes: list[Any]


def read_annotation(path: str | Path) -> Annotation:
    """Parse and check the top level of a LabelMe file; raise :class:`ConversionError` saying why."""
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise ConversionError(f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConversionError(f"malformed JSON: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"malformed or truncated JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(
            f"not a LabelMe file: the top level is a JSON {type(data).__name__}, not an object"
        )
    for key in ("shapes", "imageHeight", "imageWidth"):
        if key not in data:
            raise ConversionError(f"missing key '{key}'")
    for key in ("imageHeight", "imageWidth"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConversionError(f"'{key}' must be a positive integer, got {value!r}")
    if not isinstance(data["shapes"], list):
        raise ConversionError(f"'shapes' must be a list, got {type(data['shapes']).__name__}")
    image_path = data.get("imagePath") or ""
    if not isinstance(image_path, str):
        raise ConversionError(f"'imagePath' must be a string, got {image_path!r}")
    return Annotation(data["imageHeight"], data["imageWidth"], image_path, data["shapes"])


def _shape_geometry(shape: Any, index: int, height: int, width: int) -> tuple[str, list[tuple[float, float]]]:
    """Check one shape; return its type and points, or raise :class:`ConversionError` naming the shape."""
    where = f"shape {index}"
    if not isinstance(shape, dict):
        raise ConversionError(f"{where}: not a JSON object")
    for key in ("label", "points"):
        if key not in shape:
            raise ConversionError(f"{where}: missing key '{key}'")
    if not isinstance(shape["label"], str):
        raise ConversionError(f"{where}: 'label' must be a string, got {shape['label']!r}")
    kind = shape.get("shape_type") or "polygon"
    if not isinstance(kind, str) or kind not in SHAPE_POINTS:
        raise ConversionError(f"{where}: unknown shape_type {kind!r} (known: {', '.join(SHAPE_POINTS)})")
    if not isinstance(shape["points"], list):
        raise ConversionError(f"{where}: 'points' must be a list of [x, y] pairs")
    bound = FAR_OUTSIDE * max(height, width)
    xy = []
    for j, point in enumerate(shape["points"]):
        if not isinstance(point, list) or len(point) != 2:
            raise ConversionError(f"{where}: point {j} is {point!r}, not an [x, y] pair")
        for v in point:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConversionError(f"{where}: point {j} has a non-numeric coordinate {v!r}")
            if not math.isfinite(v):
                raise ConversionError(f"{where}: point {j} has a non-finite coordinate {v!r}")
        x, y = float(point[0]), float(point[1])
        if not (-bound <= x <= width - 1 + bound and -bound <= y <= height - 1 + bound):
            raise ConversionError(
                f"{where}: point {j} ({x:g}, {y:g}) lies far outside the {width}x{height} image "
                "(wrong imageWidth/imageHeight?)"
            )
        xy.append((x, y))
    fewest, most = SHAPE_POINTS[kind]
    if len(xy) < fewest or (most is not None and len(xy) > most):
        needs = f"at least {fewest}" if most is None else f"exactly {fewest}"
        raise ConversionError(f"{where}: {kind} has {len(xy)} points, needs {needs}")
    return kind, xy


def _draw(
    draw: ImageDraw.ImageDraw, kind: str, xy: list[tuple[float, float]], line_width: int, point_radius: float
) -> None:
    """Draw one checked shape with value 255, as labelme.utils.shape_to_mask does."""
    if kind == "circle":
        (cx, cy), (px, py) = xy
        r = math.hypot(cx - px, cy - py)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255, outline=255)
    elif kind == "rectangle":
        (x0, y0), (x1, y1) = xy  # either pair of opposite corners, in either order
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=255, outline=255)
    elif kind in ("line", "linestrip"):
        draw.line(xy, fill=255, width=line_width)
    elif kind == "point":
        ((cx, cy),) = xy
        r = point_radius
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255, outline=255)
    else:
        draw.polygon(xy, fill=255, outline=255)


def rasterize_shapes(
    shapes: Sequence[Any],
    height: int,
    width: int,
    line_width: int = 10,
    point_radius: float = 5,
    labels: Collection[str] | None = None,
) -> tuple[np.ndarray, int]:
    """Draw the union of LabelMe ``shapes`` into a ``height`` x ``width`` uint8 mask of 0/255.

    Only shapes whose label is in ``labels`` are drawn, when given. Returns the mask and the number of
    drawn points outside the image (outside [0, width-1] x [0, height-1]); the parts of shapes beyond the
    border are clipped off by the canvas, the vertices are not moved. Raises :class:`ConversionError`
    naming the first bad shape.
    """
    checked = [_shape_geometry(shape, i, height, width) for i, shape in enumerate(shapes)]
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    clipped = 0
    for shape, (kind, xy) in zip(shapes, checked, strict=True):
        if labels is not None and shape["label"] not in labels:
            continue
        clipped += sum(not (0 <= x <= width - 1 and 0 <= y <= height - 1) for x, y in xy)
        _draw(draw, kind, xy, line_width, point_radius)
    return np.array(mask), clipped


def output_name(annotation: Annotation, json_path: Path) -> str:
    """``<image stem>.png``, from ``imagePath`` (POSIX or Windows form), else from the JSON file's name."""
    stem = PureWindowsPath(annotation.image_path).stem if annotation.image_path else json_path.stem
    return f"{stem}.png"


def _check_image_size(annotation: Annotation, json_path: Path, images: Path) -> None:
    """Compare the declared size with the image's header (the pixels are not decoded)."""
    if annotation.image_path:
        image = images / PureWindowsPath(annotation.image_path).name
        if not image.is_file():
            raise ConversionError(f"image {image} not found (imagePath {annotation.image_path!r})")
    else:
        found = sorted(
            p for p in images.glob(glob.escape(json_path.stem) + ".*") if p.suffix.lower() != ".json"
        )
        if not found:
            raise ConversionError(f"no image {json_path.stem}.* in {images} (the file has no imagePath)")
        image = found[0]
    try:
        with Image.open(image) as im:
            size = im.size
    except (OSError, Image.DecompressionBombError) as e:
        raise ConversionError(f"cannot read image {image}: {e}") from None
    if size != (annotation.width, annotation.height):
        raise ConversionError(
            f"declared size {annotation.width}x{annotation.height} (imageWidth x imageHeight) disagrees with "
            f"image {image}, which is {size[0]}x{size[1]}"
        )


def _write_mask(target: Path, mask: np.ndarray, overwrite: bool) -> None:
    try:
        write_png(target, mask, overwrite=overwrite)
    except OutputExistsError:
        raise ConversionError(
            f"output {target} exists and was kept; pass --overwrite to replace it"
        ) from None
    except OSError as e:
        raise ConversionError(f"cannot write {target}: {e.strerror or e}") from None


def convert_folder(
    annotations: str | Path,
    out: str | Path,
    images: str | Path | None = None,
    labels: Collection[str] | None = None,
    line_width: int = 10,
    point_radius: float = 5,
    overwrite: bool = False,
) -> Problems:
    """Write ``out/<image stem>.png`` for every ``annotations/*.json``; return the run's :class:`Problems`.

    With ``images``, each declared size is checked against the image file's header. Existing masks are kept
    (and the file reported) unless ``overwrite``. Raises :class:`InputFolderError` when a folder is missing
    or ``annotations`` holds no ``*.json``.
    """
    annotations, out = Path(annotations), Path(out)
    images = None if images is None else Path(images)
    if not annotations.is_dir():
        raise InputFolderError(f"{annotations}: annotation folder not found")
    if images is not None and not images.is_dir():
        raise InputFolderError(f"{images}: image folder not found")
    files = sorted(annotations.glob("*.json"))
    if not files:
        raise InputFolderError(f"{annotations}: no LabelMe *.json files in this folder")

    problems = Problems(STAGE, done=("written",))
    for counter in ("written", "empty masks", "clipped points"):
        problems.count(counter, 0)
    made_from: dict[str, Path] = {}  # output name -> the file it was written from in this run
    for path in tqdm(files, desc=STAGE, unit="file", file=sys.stderr):
        try:
            annotation = read_annotation(path)
            name = output_name(annotation, path)
            if name in made_from:
                raise ConversionError(f"same output {name} as {made_from[name].name}; not written twice")
            if images is not None:
                _check_image_size(annotation, path, images)
            mask, clipped = rasterize_shapes(
                annotation.shapes, annotation.height, annotation.width, line_width, point_radius, labels
            )
            _write_mask(out / name, mask, overwrite)
        except ConversionError as e:
            with tqdm.external_write_mode(file=sys.stderr):  # the error gets a line of its own, not the bar's
                problems.skip(path, str(e))
            continue
        made_from[name] = path
        problems.count("written")
        problems.count("empty masks", int(not mask.any()))
        problems.count("clipped points", clipped)
    return problems
