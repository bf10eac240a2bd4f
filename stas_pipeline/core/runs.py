"""Training runs as read from their files: the one reader of run records.

A *run* is a folder holding ``fold<k>/metrics.json`` as training writes them
(``<output_dir>/<bundle_name>/fold<k>/metrics.json`` = ``{**run_info, "best_epoch", "best_<key>", "history"}``,
``<key>`` the key metric: ``val_auc``, ``val_dice``, ...), and, when evaluated, ``eval_oof/metrics.json`` and
``eval_test/metrics.json`` (``{"auc": float, "n": int, ...}``, written by ``stas evaluate``). :func:`find_runs`
finds them under a folder, :func:`read_run` reads one into a :class:`Run`, :func:`read_runs` several, named
relative to the folders they were found in (``stas experiments`` tabulates them, ``stas pseudo-label`` records
a run's AUCs).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stas_pipeline.core.errors import StasError
from stas_pipeline.core.problems import Problems

FOLD_DIR = re.compile(r"fold(-?\d+)$")
BOOKKEEPING = {"fold", "history", "best_epoch", "epoch"}
EVALS = {"oof": "eval_oof", "test": "eval_test"}


class ExperimentsError(StasError, ValueError):
    """Nothing to tabulate (no run found), or a folder that is not the one run asked for."""


@dataclass
class Run:
    """One training run (a folder of ``fold<k>/metrics.json``) as read from its files."""

    path: Path
    name: str = ""
    key: str | None = None  # key metric without "best_", e.g. "val_auc"
    best: dict[int, float | None] = field(default_factory=dict)  # fold -> best_<key>
    best_epochs: dict[int, Any] = field(default_factory=dict)
    fold_knobs: dict[int, dict[str, Any]] = field(default_factory=dict)
    evals: dict[str, dict] = field(default_factory=dict)  # "oof"/"test" -> the eval metrics.json
    notes: list[str] = field(default_factory=list)

    @property
    def folds(self) -> list[int]:
        return sorted(self.fold_knobs)

    def _cv_values(self) -> list[float]:
        return [v for f, v in sorted(self.best.items()) if f >= 0 and is_number(v)]

    @property
    def cv_mean(self) -> float | None:
        values = self._cv_values()
        return statistics.fmean(values) if values else None

    @property
    def cv_std(self) -> float | None:
        values = self._cv_values()
        return statistics.stdev(values) if len(values) > 1 else None

    def eval_auc(self, which: str) -> float | None:
        auc = self.evals.get(which, {}).get("auc")
        return float(auc) if is_number(auc) else None

    @property
    def oof_auc(self) -> float | None:
        return self.eval_auc("oof")

    @property
    def test_auc(self) -> float | None:
        return self.eval_auc("test")

    @property
    def cv_auc(self) -> float | None:
        """The run's CV AUC: the out-of-fold evaluation when there is one, else the mean of the folds' best
        ``val_auc`` (None for a run of another key metric)."""
        if self.oof_auc is not None:
            return self.oof_auc
        return self.cv_mean if self.key == "val_auc" else None

    @property
    def knobs(self) -> dict[str, Any]:
        """Each knob's value; one that differs between folds becomes its values joined by `` / ``."""
        out: dict[str, Any] = {}
        for name in ordered_union(self.fold_knobs.values()):
            values = distinct(k.get(name) for k in self.fold_knobs.values())
            out[name] = values[0] if len(values) == 1 else " / ".join(cell_text(v) for v in values)
        return out


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def distinct(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if not any(_same(v, o) for o in out):
            out.append(v)
    return out


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b or (is_number(a) and is_number(b) and a == b)


def ordered_union(dicts: Iterable[dict]) -> list[str]:
    return list(dict.fromkeys(k for d in dicts for k in d))


def cell_text(value: Any) -> str:
    """A knob or metric as a table cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def flatten(info: dict, prefix: str = "") -> dict[str, Any]:
    """The knobs of a ``run_info``: scalars as they are, dicts flattened into dotted names, lists kept."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        name = f"{prefix}{key}"
        if not prefix and (key in BOOKKEEPING or key.startswith("best_")):
            continue
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def read_json_object(path: str | Path) -> dict:
    """The JSON object in ``path``; ValueError saying why it cannot be read as one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but {type(data).__name__}")
    return data


def _fold_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for child in run_dir.iterdir() if run_dir.is_dir() else ():
        match = FOLD_DIR.fullmatch(child.name)
        if match and (child / "metrics.json").is_file():
            found.append((int(match.group(1)), child / "metrics.json"))
    return sorted(found)


def find_runs(root: str | Path) -> list[Path]:
    """Every folder under ``root`` (``root`` included) holding ``fold<k>/metrics.json``, sorted; hidden folders
    are not searched."""
    root = Path(root)
    runs = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if "metrics.json" in filenames and FOLD_DIR.fullmatch(here.name) and here != root:
            runs.add(here.parent)
    return sorted(runs)


def _key_of(info: dict) -> str | None:
    keys = [k[len("best_"):] for k in info if k.startswith("best_") and k != "best_epoch"]
    return keys[0] if len(keys) == 1 else next((k for k in keys if k.startswith("val_")), keys[0] if keys else None)


def _last_trained_epoch(info: dict) -> int | None:
    history = info.get("history") if isinstance(info.get("history"), list) else []
    epochs = [row.get("epoch") for row in history if isinstance(row, dict)
              and row.get("loss") is not None and isinstance(row.get("epoch"), int)]
    return max(epochs) if epochs else None


def read_run(run_dir: str | Path, problems: Problems | None = None) -> Run | None:
    """The run in ``run_dir``; unreadable files are reported to ``problems`` and left out. None when no fold
    is readable."""
    run_dir = Path(run_dir)
    problems = problems if problems is not None else Problems("experiments")
    run = Run(run_dir, name=str(run_dir))
    keys = []
    for fold, metrics in _fold_dirs(run_dir):
        try:
            info = read_json_object(metrics)
        except ValueError as err:
            problems.skip(metrics, f"{err}; fold {fold} left out")
            continue
        key = _key_of(info)
        keys.append(key)
        run.fold_knobs[fold] = flatten(info)
        run.best[fold] = info.get(f"best_{key}") if key else None
        run.best_epochs[fold] = info.get("best_epoch")
        if fold < 0:
            run.notes.append(f"fold{fold}: all data, not in the CV")
        elif not is_number(run.best[fold]):
            run.notes.append(f"fold{fold}: no best_{key or '<metric>'}")
        last, planned = _last_trained_epoch(info), info.get("epochs")
        if isinstance(planned, int) and last is not None and last < planned:
            run.notes.append(f"fold{fold}: trained {last} of {planned} epochs")
    if not run.fold_knobs:
        return None
    distinct_keys = distinct(k for k in keys if k)
    run.key = distinct_keys[0] if distinct_keys else None
    if len(distinct_keys) > 1:
        run.notes.append(f"folds have different key metrics: {', '.join(distinct_keys)}")
    mixed = [n for n, v in run.knobs.items() if len(distinct(k.get(n) for k in run.fold_knobs.values())) > 1]
    if mixed:
        run.notes.append(f"knobs differ between folds: {', '.join(mixed)}")
    for which, folder in EVALS.items():
        path = run_dir / folder / "metrics.json"
        if path.is_file():
            try:
                run.evals[which] = read_json_object(path)
            except ValueError as err:
                problems.skip(path, str(err))
                continue
            if not is_number(run.evals[which].get("auc")):
                run.notes.append(f"{folder}: no auc")
    return run


def read_runs(roots: Sequence[str | Path], problems: Problems) -> list[Run]:
    """Every run under ``roots``, named relative to its root (see the module doc)."""
    runs = []
    for root in map(Path, roots):
        if not root.is_dir():
            problems.skip(root, "not a folder")
            continue
        found = find_runs(root)
        if not found:
            problems.warn(root, "no run here (no fold<k>/metrics.json below it)")
        for path in found:
            run = read_run(path, problems)
            if run is None:
                continue
            rel = path.relative_to(root).as_posix()
            if rel == ".":
                run.name = root.as_posix()
            else:
                run.name = rel if len(roots) == 1 else (root / rel).as_posix()
            runs.append(run)
    return runs
