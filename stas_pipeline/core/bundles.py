"""Finding and parsing this repository's MONAI bundles from Python (stages that need a bundle's declared parts)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stas_pipeline.core.errors import StasError


class BundleError(StasError, RuntimeError):
    """A bundle that cannot be found or parsed."""


def repository_root() -> Path:
    """The folder holding ``bundles/`` (the bundles' ``%bundles/...`` macros are relative to it)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "bundles" / "common.json").is_file():
        raise BundleError(f"bundles/common.json not found beside the package (looked in {root}); "
                          "use a clone installed with 'pip install -e .'")
    return root


_EXTRA_DIRS: list[Path] = []  # folders of bundles that tasks outside the package ship (Task.bundle_dir)


def add_bundle_dir(folder: str | Path) -> None:
    """Look for bundles by name in ``folder`` too, after the repository's ``bundles/``."""
    folder = Path(folder).resolve()
    if folder not in _EXTRA_DIRS:
        _EXTRA_DIRS.append(folder)


def bundle_file(bundle: str | Path) -> Path:
    """``<name>.json`` in ``bundles/`` (or a task's bundle folder) for a bundle name, or the file itself."""
    path = Path(bundle)
    if path.suffix != ".json":
        folders = [repository_root() / "bundles", *_EXTRA_DIRS]
        path = next((f / f"{bundle}.json" for f in folders if (f / f"{bundle}.json").is_file()),
                    folders[0] / f"{bundle}.json")
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle")
    return path.resolve()


def parsed_content(bundle: str | Path, ids: list[str], overrides: Mapping[str, Any] | None = None) -> list[Any]:
    """The instantiated ``ids`` of a bundle (e.g. ``task#preprocessing``) after ``overrides`` of its top-level
    keys (keys the bundle does not have are ignored, so a run's recorded knobs can be passed whole)."""
    from monai.bundle import (
        ConfigParser,  # here: MONAI takes seconds to import, and the task registry needs this module
    )

    path = bundle_file(bundle)
    parser = ConfigParser()
    parser.read_config(str(path))
    parser.update({k: v for k, v in (overrides or {}).items() if k in parser.config})
    with contextlib.chdir(repository_root()):
        parser.parse()
        return [parser.get_parsed_content(i) for i in ids]
