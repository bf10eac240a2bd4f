"""Atomic, non-clobbering writes of PNG, JSON, raw bytes and whole folders; CSV text."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stas_pipeline.core.errors import StasError
from stas_pipeline.core.images import InputFolderError


class OutputExistsError(StasError, FileExistsError):
    """Raised when a write would replace an existing file and overwriting was not asked for."""

    def __init__(self, path: str | Path):
        super().__init__(f"{path}: exists; pass --overwrite to replace it")
        self.path = Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    A crash leaves ``path`` untouched (either the old file or nothing). Without ``overwrite``, an
    existing ``path`` raises :class:`OutputExistsError` before anything is written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
    try:
        yield Path(tmp)
        if path.exists() and not overwrite:  # appeared while we were writing
            raise OutputExistsError(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """``rows`` as CSV text (the csv module's quoting), each line ended by ``\\n``."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue()


def write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> None:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any, overwrite: bool = False) -> None:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_png(path: str | Path, array: np.ndarray, overwrite: bool = False) -> None:
    """Write a 2-D uint8 array (mode L) or an HxWx3 uint8 array (RGB) as PNG, atomically."""
    with atomic_path(path, overwrite) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputFolderError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(out)


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{kind}")


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside ``out``; when the block ends normally it becomes ``out``.

    An existing empty ``out`` is replaced; a non-empty one raises :class:`OutputExistsError` (before the block
    runs, and again at the end if one appeared meanwhile) unless ``overwrite``, and is then removed only once
    the new folder is complete. An exception in the block removes the temporary folder, ``out`` untouched.
    """
    out = Path(out)
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()  # not mkdtemp: the folder gets the permissions of a folder made the usual way
    try:
        yield tmp
        _check_out(out, overwrite)
        old = _sibling(out, "old") if out.exists() else None
        if old is not None:
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
