"""The one list of suffixes per kind of input file, finding such files in a folder, pairing them by stem, the one
image policy (every image as 8-bit RGB, see :func:`to_rgb`; :func:`read_rgb` here, MONAI's readers in
:mod:`stas_pipeline.core.transforms`), and decoding images in full (on a few threads) to find the ones that cannot
be used. No MONAI or torch here: the light stages import this module."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from stas_pipeline.core.errors import StasError
from stas_pipeline.core.problems import Problems

_T = TypeVar("_T")
_R = TypeVar("_R")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")  # images: training, test, prediction inputs
MASK_SUFFIXES = (".png",)  # masks of images (single-channel PNG)
OPENSLIDE_SUFFIXES = (".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")  # slides read by OpenSlide
SLIDE_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".svs", *OPENSLIDE_SUFFIXES)  # whole slides
SLIDE_MASK_SUFFIXES = (".tif", ".tiff", ".png", ".json", ".geojson")  # slide masks: images or polygons


GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # integer grey: 16-bit, or 32-bit holding 16-bit values
WITH_ALPHA = ("RGBA", "RGBa", "LA", "PA", "P")  # composited on white (a palette may hold transparency)
BACKGROUND = (255, 255, 255, 255)  # what a transparent pixel shows


class InputFolderError(StasError, ValueError):
    """An input folder (or file) that is missing, empty, or does not fit the options given with it."""


class ImageModeError(StasError, ValueError):
    """An image whose mode the image policy cannot turn into 8-bit RGB; ``reason`` is the message without the file."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.reason)


def to_rgb(img: Image.Image, path: str | Path) -> Image.Image:
    """The image policy: ``img`` (read from ``path``) as 8-bit RGB.

    RGB is kept as it is (the same object); integer grey (16-bit ``I;16``, or ``I``, clipped to 0..65535) is
    scaled to 8 bits by ``>> 8`` (a fixed scale, the same for every image) and repeated in three channels; modes
    with transparency (RGBA, LA, PA, and palette images, whose palette may hold it) are composited on white; every
    other mode PIL converts (L, 1, CMYK, YCbCr, LAB, HSV, RGBX) by ``convert("RGB")``. A floating-point image
    (``F``: no fixed scale to 8 bits) and a mode PIL cannot convert raise :class:`ImageModeError`.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "F":
        raise ImageModeError(path, "F image (32-bit floating point) has no fixed scale to 8 bits; save it as an "
                                   "8- or 16-bit image")
    if img.mode in GREY_16:
        grey = np.clip(np.asarray(img), 0, 65535).astype(np.uint16) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    try:
        if img.mode in WITH_ALPHA:
            return Image.alpha_composite(Image.new("RGBA", img.size, BACKGROUND), img.convert("RGBA")).convert("RGB")
        return img.convert("RGB")
    except ValueError as err:  # PIL: "conversion from X to Y not supported"
        raise ImageModeError(path, f"{img.mode} image cannot be converted to RGB ({err})") from err


def rgb_array(array: np.ndarray, path: str | Path, cmyk: bool = False) -> np.ndarray:
    """The image policy of :func:`to_rgb` for a decoded (H, W, C) array (a slide's window): (H, W, 3) uint8.

    16-bit values are scaled by ``>> 8``; one channel is repeated; two (grey and alpha) and four (RGB and alpha)
    are composited on white; four with ``cmyk`` (a TIFF's photometric SEPARATED) are converted as PIL converts
    CMYK. Floating-point data, or another channel count, raise :class:`ImageModeError`."""
    if array.dtype.kind == "f":
        raise ImageModeError(path, f"{array.dtype} samples (floating point) have no fixed scale to 8 bits")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
    channels = array.shape[-1]
    if channels == 3:
        return array
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4 and cmyk:
        return np.asarray(Image.fromarray(np.ascontiguousarray(array), mode="CMYK").convert("RGB"))
    if channels in (2, 4):
        colour, alpha = array[..., :-1].astype(np.float32), array[..., -1:].astype(np.float32) / 255
        rgb = np.rint(colour * alpha + BACKGROUND[0] * (1 - alpha)).astype(np.uint8)
        return rgb if channels == 4 else np.repeat(rgb, 3, axis=-1)
    raise ImageModeError(path, f"{channels} channels (an image is grey, grey and alpha, RGB, RGBA or CMYK)")


def read_rgb(path: str | Path) -> np.ndarray:
    """The image at ``path`` decoded in full, by the image policy (:func:`to_rgb`): (H, W, 3) uint8. Raises what
    PIL raises for a file it cannot decode, and :class:`ImageModeError`."""
    with Image.open(path) as img:
        return np.asarray(to_rgb(img, path))


def has_suffix(path: str | Path, suffixes: Iterable[str]) -> bool:
    """Whether the file's name ends with one of ``suffixes`` (any case; ``.ome.tif`` counts whole)."""
    name = Path(path).name.lower()
    return any(name.endswith(s) for s in suffixes)


def strip_suffix(path: str | Path, suffixes: Iterable[str]) -> str:
    """The file's name without the longest of ``suffixes`` it ends with (``a.ome.tif`` -> ``a``), else its stem."""
    name = Path(path).name
    for suffix in sorted(suffixes, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return Path(path).stem


def list_files(folder: str | Path, suffixes: Iterable[str]) -> list[Path]:
    """Non-hidden files directly in ``folder`` whose name ends with one of ``suffixes`` (any case), sorted;
    InputFolderError when ``folder`` is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFolderError(f"{folder}: not a folder")
    suffixes = tuple(s.lower() for s in suffixes)
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and has_suffix(p, suffixes))


def images_in_folder(folder: str | Path) -> list[Path]:
    """The images (:data:`IMAGE_SUFFIXES`) directly in ``folder``, sorted; InputFolderError when there are none."""
    files = list_files(folder, IMAGE_SUFFIXES)
    if not files:
        raise InputFolderError(f"{folder}: no images ({' '.join(IMAGE_SUFFIXES)})")
    return files


def index_by_stem(files: Iterable[Path], problems: Problems) -> dict[str, Path]:
    """Map stem -> file; a stem held by several files is skipped (each file named) and left out."""
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path)
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            names = ", ".join(str(p) for p in paths)
            for path in paths:
                problems.skip(path, f"duplicate stem {stem!r} ({names}); stem left out")
    return {stem: paths[0] for stem, paths in by_stem.items() if len(paths) == 1}


def pair_by_stem(
    images: Iterable[Path], masks: Iterable[Path], problems: Problems
) -> list[tuple[Path, Path]]:
    """Pair images and masks with the same stem, sorted by stem; unpaired or ambiguous files are skipped."""
    image_files, mask_files = list(images), list(masks)
    by_image, by_mask = index_by_stem(image_files, problems), index_by_stem(mask_files, problems)
    image_dups = {p.stem for p in image_files} - by_image.keys()
    mask_dups = {p.stem for p in mask_files} - by_mask.keys()
    for stem, path in by_image.items():
        if stem not in by_mask:
            problems.skip(path, f"no {'unique ' if stem in mask_dups else ''}mask with stem {stem!r}")
    for stem, path in by_mask.items():
        if stem not in by_image:
            problems.skip(path, f"no {'unique ' if stem in image_dups else ''}image with stem {stem!r}")
    return [(by_image[s], by_mask[s]) for s in sorted(by_image.keys() & by_mask.keys())]


def decode_image(path: str | Path) -> tuple[int, int]:
    """Decode the whole image (not only its header) by the image policy (:func:`read_rgb`) and return its
    (width, height).

    Raises :class:`ImageModeError` for a mode the policy refuses, and whatever PIL raises for a file it cannot
    decode: ``UnidentifiedImageError`` for a non-image, ``OSError("image file is truncated ...")`` for a truncated
    JPEG (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False on purpose), and others for broken streams.
    """
    height, width = read_rgb(path).shape[:2]
    return width, height


def decode_size(path: str | Path) -> tuple[int, int] | str:
    """The image's (width, height) when it decodes in full by the image policy, else the reason (a str, without
    the file) it does not."""
    try:
        return decode_image(path)
    except ImageModeError as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001 - any failure to decode means the image cannot be used
        return str(exc) or type(exc).__name__


def image_error(path: str | Path) -> str | None:
    """Why ``path`` cannot be used as an image (:func:`decode_size`), or None when it can."""
    reason = decode_size(path)
    return reason if isinstance(reason, str) else None


def map_threads(fn: Callable[[_T], _R], items: Sequence[_T], desc: str, unit: str) -> list[_R]:
    """``[fn(x) for x in items]`` on a few threads (PIL decodes without the GIL), with a progress bar."""
    workers = max(1, min(8, os.cpu_count() or 1, len(items)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit=unit, disable=None))


def read_failure(path: str | Path, err: BaseException) -> str:
    """One line on why reading ``path`` failed with ``err``: the image policy's reason (:func:`image_error`) when
    the file is not a usable image, else ``err``'s first line."""
    return image_error(path) or f"{type(err).__name__}: {err}".splitlines()[0]


def decode_sizes(paths: Sequence[Path], desc: str = "decoding images") -> list[tuple[int, int] | str]:
    """Per path: :func:`decode_size`, on a few threads."""
    return map_threads(decode_size, paths, desc, "image")


def decode_errors(paths: Sequence[Path], desc: str = "decoding images") -> list[str | None]:
    """Per path: :func:`image_error`, on a few threads."""
    return map_threads(image_error, paths, desc, "image")


def relpath(path: str | Path, base_dir: str | Path) -> str:
    """``path`` relative to ``base_dir`` (a datalist's folder), with ``/`` separators."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base_dir)).replace(os.sep, "/")


def unlabelled_test(test_images: str | Path, base_dir: str | Path, problems: Problems) -> list[dict]:
    """Datalist ``test`` entries (``{"image": rel}``) of the images in ``test_images`` that decode in full; a
    duplicated stem or an undecodable image is reported to ``problems`` and left out."""
    by_stem = index_by_stem(list_files(test_images, IMAGE_SUFFIXES), problems)
    paths = sorted(by_stem.values())
    test = []
    for path, reason in zip(paths, decode_errors(paths, "decoding test images"), strict=True):
        if reason is None:
            test.append({"image": relpath(path, base_dir)})
        else:
            problems.skip(path, f"cannot decode image: {reason}")
    problems.count("test images", len(test))
    return test
