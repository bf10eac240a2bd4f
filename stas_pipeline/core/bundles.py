"""Finding and parsing this repository's MONAI bundles from Python (stages that need a bundle's declared parts)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser


class BundleError(RuntimeError):
    """A bundle that cannot be found or parsed."""


def repository_root() -> Path:
    """The folder holding ``bundles/`` (the bundles' ``%bundles/...`` macros are relative to it)."""
    import stas_pipeline

    root = Path(stas_pipeline.__file__).resolve().parents[1]
    if not (root / "bundles" / "common.json").is_file():
        raise BundleError(f"bundles/common.json not found beside the package (looked in {root}); "
                          "use a clone installed with 'pip install -e .'")
    return root


def bundle_file(bundle: str | Path) -> Path:
    """``bundles/<name>.json`` for a bundle name, or the file itself."""
    path = Path(bundle)
    if path.suffix != ".json":
        path = repository_root() / "bundles" / f"{bundle}.json"
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle")
    return path.resolve()


def parsed_content(bundle: str | Path, ids: list[str], overrides: Mapping[str, Any] | None = None) -> list[Any]:
    """The instantiated ``ids`` of a bundle (e.g. ``task#preprocessing``) after ``overrides`` of its top-level
    keys (keys the bundle does not have are ignored, so a run's recorded knobs can be passed whole)."""
    path = bundle_file(bundle)
    parser = ConfigParser()
    parser.read_config(str(path))
    parser.update({k: v for k, v in (overrides or {}).items() if k in parser.config})
    with contextlib.chdir(repository_root()):
        parser.parse()
        return [parser.get_parsed_content(i) for i in ids]
