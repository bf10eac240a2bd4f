"""Reading prediction/mask folders and single-channel mask files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from stas_pipeline.core.images import InputFolderError
from stas_pipeline.core.problems import Problems

GREY_MODES = ("L", "P", "1")  # read as stored: grey level, palette index, 0/255
CONVERTED_MODES = ("RGB", "RGBA", "LA")  # converted to L, with a warning


def prediction_files(folder: str | Path, suffixes: Sequence[str] = (".png",)) -> dict[str, list[Path]]:
    """Map stem -> the non-hidden files directly in ``folder`` with one of ``suffixes`` (any case), by stem.

    A stem with more than one file (``a.png`` and ``a.npy``) is ambiguous; callers report it.
    Raises :class:`InputFolderError` when ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFolderError(f"{folder}: folder not found")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in suffixes:
            found.setdefault(path.stem, []).append(path)
    return found


def read_grey_png(path: str | Path, problems: Problems | None = None) -> np.ndarray:
    """Read a single-channel image as a 2-D uint8 array of its stored values.

    Mode L is read as is, P as its palette indices, 1 as 0/255; RGB, RGBA and LA are converted to L (with a
    warning in ``problems``). Other modes (16-bit, float) raise ``ValueError``; unreadable files ``OSError``.
    """
    with Image.open(path) as img:
        if img.mode in CONVERTED_MODES:
            if problems is not None:
                problems.warn(path, f"mode {img.mode} converted to grey (L); masks should be single-channel")
            img = img.convert("L")
        elif img.mode == "1":
            img = img.convert("L")
        elif img.mode not in GREY_MODES:
            raise ValueError(f"unsupported image mode {img.mode} (expected L, P, 1 or RGB)")
        return np.asarray(img, dtype=np.uint8)


def size_text(shape: tuple[int, ...]) -> str:
    """``W x H`` of an (H, W) array shape, as image sizes are written elsewhere."""
    return f"{shape[1]}x{shape[0]}" if len(shape) == 2 else "x".join(map(str, shape))
