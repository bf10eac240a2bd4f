"""The one list of suffixes per kind of input file, and finding such files in a folder."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from stas_pipeline.core.errors import StasError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")  # images: training, test, prediction inputs
MASK_SUFFIXES = (".png",)  # masks of images (single-channel PNG)
SLIDE_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".svs")  # whole slides (tiled, pyramidal)
SLIDE_MASK_SUFFIXES = (".tif", ".tiff", ".png", ".json", ".geojson")  # slide masks: images or polygons


class InputFolderError(StasError, ValueError):
    """An input folder (or file) that is missing, empty, or does not fit the options given with it."""


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
