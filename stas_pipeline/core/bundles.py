"""Finding, resolving and parsing the MONAI bundles from Python, from any working directory.

The bundles ship inside the package (``stas_pipeline/bundles/``; the repository's ``bundles/`` links to it, so
the card's ``python -m monai.bundle run training --config_file bundles/deeplab_effb6.json`` runs from the
repository root as MONAI resolves macros: relative to the working directory). Here a bundle's ``%file#id``
macros are expanded by :func:`resolved_config`, files found relative to the package's folder holding
``bundles/``, then the referencing file's folder, then the working directory: nothing depends on where a stage
is started, and no stage changes directory. :func:`resolved_config` is also what a training run writes into its
folder (``config.json``), so that its chain is rebuilt from the run alone."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stas_pipeline.core.errors import StasError

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"  # the package's bundles (package data)
MACRO_ROOT = BUNDLES_DIR.parent  # "%bundles/common.json#..." is relative to it
RUN_CONFIG = "config.json"  # the resolved configuration a training run writes beside its checkpoints


class BundleError(StasError, RuntimeError):
    """A bundle that cannot be found or parsed."""


FLAG_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}


def flag(value: Any, name: str) -> bool:
    """A bundle's on/off knob as a bool. MONAI's command line reads only Python's ``True``/``False`` as booleans, so
    ``--aux_head false`` arrives as the string ``"false"``, which Python takes as true: every on/off knob of the
    bundles is read through this (``"$flag(@aux_head, 'aux_head')"``); any other word is refused."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word not in FLAG_WORDS:
            raise BundleError(f"--{name} {value}: expected true or false")
        return FLAG_WORDS[word]
    return bool(value)


_EXTRA_DIRS: list[Path] = []  # folders of bundles that tasks outside the package ship (Task.bundle_dir)


def add_bundle_dir(folder: str | Path) -> None:
    """Look for bundles by name in ``folder`` too, after the package's ``bundles/``."""
    folder = Path(folder).resolve()
    if folder not in _EXTRA_DIRS:
        _EXTRA_DIRS.append(folder)


def bundle_file(bundle: str | Path) -> Path:
    """``<name>.json`` in the package's ``bundles/`` (or a task's bundle folder) for a bundle name, or the file
    itself."""
    path = Path(bundle)
    if path.suffix != ".json":
        folders = [BUNDLES_DIR, *_EXTRA_DIRS]
        path = next((f / f"{bundle}.json" for f in folders if (f / f"{bundle}.json").is_file()),
                    folders[0] / f"{bundle}.json")
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle")
    return path.resolve()


def _macro_file(path: str, referrer: Path) -> Path:
    """The file a macro names: relative to the package's folder holding ``bundles/``, the referring file's folder
    or the working directory, the first that exists."""
    if not path:
        return referrer
    candidates = [Path(path)] if Path(path).is_absolute() else \
        [MACRO_ROOT / path, referrer.parent / path, Path.cwd() / path]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise BundleError(f"{referrer}: macro file {path!r} not found (looked in {MACRO_ROOT}, {referrer.parent} and "
                          "the working directory)")
    return found.resolve()


def _expand(value: Any, referrer: Path, files: dict[Path, Any]) -> Any:
    from monai.bundle import ConfigParser  # here: MONAI takes seconds to import, and light stages import this

    if isinstance(value, dict):
        return {k: _expand(v, referrer, files) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, referrer, files) for v in value]
    if not (isinstance(value, str) and value.startswith("%")):
        return value
    path, ids = ConfigParser.split_path_id(value[1:])
    file = _macro_file(path, referrer)
    if file not in files:
        files[file] = ConfigParser.load_config_file(file)
    try:
        content = ConfigParser(config=files[file])[ids]
    except (KeyError, IndexError, ValueError) as err:
        raise BundleError(f"{referrer}: macro {value!r}: {file} has no {ids!r} ({err})") from None
    return _expand(copy.deepcopy(content), file, files)


def resolved_config(bundle: str | Path) -> dict:
    """The configuration of ``bundle`` (a name or a file) with every ``%file#id`` macro expanded: a
    configuration that needs no ``bundles/`` folder and no working directory."""
    from monai.bundle import ConfigParser

    path = bundle_file(bundle)
    return _expand(ConfigParser.load_config_file(path), path, {})


def write_resolved(bundle: str | Path, path: str | Path) -> Path:
    """Write :func:`resolved_config` of ``bundle`` to ``path``, with the bundles' ``logging.conf`` beside it
    (MONAI's runner reads the one beside a config file; one already there is kept): a bundle file MONAI's runner
    can run from any working directory (``monai.bundle.run(config_file=...)``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(resolved_config(bundle), indent=1) + "\n")
    logging_conf = path.parent / "logging.conf"
    if not logging_conf.exists():
        shutil.copyfile(BUNDLES_DIR / "logging.conf", logging_conf)
    return path


def parsed_content(bundle: str | Path | Mapping, ids: list[str], overrides: Mapping[str, Any] | None = None
                   ) -> list[Any]:
    """The instantiated ``ids`` of a bundle (a name, a file or a resolved configuration; e.g.
    ``task#preprocessing``) after ``overrides`` of its keys, top-level or nested (``augment#flip``); ids the
    bundle does not have are ignored, so a run's recorded knobs can be passed whole."""
    from monai.bundle import ConfigParser

    config = copy.deepcopy(dict(bundle)) if isinstance(bundle, Mapping) else resolved_config(bundle)
    parser = ConfigParser(config)
    parser.update({k: v for k, v in (overrides or {}).items() if k in parser})
    parser.parse()
    return [parser.get_parsed_content(i) for i in ids]


def running_parser() -> Any:
    """The ``ConfigParser`` of the MONAI bundle run this is called from (a component it instantiated, a handler
    of its engine), or None outside one. MONAI passes a component nothing of its run; the run's parser is on the
    call stack (``ConfigParser.get_parsed_content``)."""
    from monai.bundle import ConfigParser

    frame = sys._getframe(1)
    while frame is not None:
        parser = frame.f_locals.get("self")
        if isinstance(parser, ConfigParser) and isinstance(parser.config, dict):
            return parser
        frame = frame.f_back
    return None
