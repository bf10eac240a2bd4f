"""The table of runs: one row per training run, its CV and inner-test scores and every knob that differs.

``stas experiments RUNS_DIR [RUNS_DIR ...] [--out table.md] [--csv table.csv] [--sort path|cv|test]
[--overwrite]``

Inputs. A *run* is a folder holding ``fold<k>/metrics.json`` as training writes them
(``<output_dir>/<bundle_name>/fold<k>/metrics.json`` = ``{**run_info, "best_epoch", "best_<key>", "history"}``,
``<key>`` the key metric: ``val_auc``, ``val_dice``, ...). Each RUNS_DIR is searched recursively (hidden folders
skipped) and may itself be a run. Read as well when present: ``<run>/eval_oof/metrics.json`` and
``<run>/eval_test/metrics.json`` (``{"auc": float, "n": int, ...}``, written by ``stas evaluate``).

One row per run, columns:

- ``run``: the run's folder relative to its RUNS_DIR (prefixed by the RUNS_DIR as given when several are given,
  or the RUNS_DIR itself when it is the run);
- ``folds``: the folds found, e.g. ``0,1,2,3``;
- ``cv_<key>`` and ``cv_<key>_std``: mean and sample standard deviation (n - 1; blank for one fold) of the
  folds' ``best_<key>``; fold ``-1`` (all data, no validation) is not part of the CV. Runs of several keys
  (classification and segmentation) get one pair of columns per key;
- ``oof_auc``, ``test_auc``: from ``eval_oof`` / ``eval_test``; blank when absent;
- ``best_epochs``: each fold's best epoch, in fold order;
- every knob (a ``run_info`` value) that differs between the listed runs; knobs equal in every run are printed
  once above the table as ``common: k=v, ...``. A nested value (``network``) is flattened into dotted names
  (``network.model_name``) and such a column is dropped when it repeats another column exactly (``model``).
  Left out: ``fold`` and the bookkeeping (``best_*``, ``history``, ``epoch``). Path knobs (``datalist``,
  ``*_dir``, ``*_file``, ``*_path``, ``checkpoint``) that differ are shown without their common leading folders
  (``datalist_r1.json`` rather than ``/data/glaucoma/datalist_r1.json``);
- ``notes``: knobs that differ between the folds of one run (other than ``fold``; the cell then shows the
  values joined by `` / ``), folds without a best metric, folds that stopped before their ``epochs``.

Outputs: the markdown (the ``common:`` line, then the table) on stdout; ``--out`` writes the same markdown and
``--csv`` the table as CSV (same columns, full precision, empty cells for missing values), each atomically and
never over an existing file without ``--overwrite`` (checked before anything is read). Rows are in path order,
or by CV metric / inner-test AUC (best first, runs without the value last) with ``--sort cv|test``.

Edge cases: an unreadable or malformed ``metrics.json`` is reported as ``ERROR <file>: <reason>`` and that fold
left out (the run still listed if another fold is readable); the exit code is then 1. No run found at all, or
an existing output without ``--overwrite``: one line, exit 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stas_pipeline.core.fileio import OutputExistsError, atomic_path
from stas_pipeline.core.problems import Problems

STAGE = "experiments"
FOLD_DIR = re.compile(r"fold(-?\d+)$")
BOOKKEEPING = {"fold", "history", "best_epoch", "epoch"}
PATH_KNOB = re.compile(r"(^|\.)(datalist|checkpoint|dataset_dir|output_dir)$|_(dir|file|path)$")
EVALS = {"oof": "eval_oof", "test": "eval_test"}
SORTS = ("path", "cv", "test")


class ExperimentsError(ValueError):
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
        return [v for f, v in sorted(self.best.items()) if f >= 0 and _number(v)]

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
        return float(auc) if _number(auc) else None

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
        for name in _ordered_union(self.fold_knobs.values()):
            values = _distinct(k.get(name) for k in self.fold_knobs.values())
            out[name] = values[0] if len(values) == 1 else " / ".join(_text(v) for v in values)
        return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _distinct(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if not any(_same(v, o) for o in out):
            out.append(v)
    return out


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b or (_number(a) and _number(b) and a == b)


def _ordered_union(dicts: Iterable[dict]) -> list[str]:
    return list(dict.fromkeys(k for d in dicts for k in d))


def _text(value: Any) -> str:
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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
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
    epochs = [row.get("epoch") for row in info.get("history") or () if isinstance(row, dict)
              and row.get("loss") is not None and isinstance(row.get("epoch"), int)]
    return max(epochs) if epochs else None


def read_run(run_dir: str | Path, problems: Problems | None = None) -> Run | None:
    """The run in ``run_dir``; unreadable files are reported to ``problems`` and left out. None when no fold
    is readable."""
    run_dir = Path(run_dir)
    problems = problems if problems is not None else Problems(STAGE)
    run = Run(run_dir, name=str(run_dir))
    keys = []
    for fold, metrics in _fold_dirs(run_dir):
        try:
            info = _read_json(metrics)
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
        elif not _number(run.best[fold]):
            run.notes.append(f"fold{fold}: no best_{key or '<metric>'}")
        last, planned = _last_trained_epoch(info), info.get("epochs")
        if isinstance(planned, int) and last is not None and last < planned:
            run.notes.append(f"fold{fold}: trained {last} of {planned} epochs")
    if not run.fold_knobs:
        return None
    distinct_keys = _distinct(k for k in keys if k)
    run.key = distinct_keys[0] if distinct_keys else None
    if len(distinct_keys) > 1:
        run.notes.append(f"folds have different key metrics: {', '.join(distinct_keys)}")
    mixed = [n for n, v in run.knobs.items() if len(_distinct(k.get(n) for k in run.fold_knobs.values())) > 1]
    if mixed:
        run.notes.append(f"knobs differ between folds: {', '.join(mixed)}")
    for which, folder in EVALS.items():
        path = run_dir / folder / "metrics.json"
        if path.is_file():
            try:
                run.evals[which] = _read_json(path)
            except ValueError as err:
                problems.skip(path, str(err))
                continue
            if not _number(run.evals[which].get("auc")):
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


def _strip_common_folders(values: list[Any]) -> dict[str, str]:
    """Each distinct path string -> itself without the leading folders all of them share."""
    paths = [v for v in values if isinstance(v, str)]
    if len(set(paths)) < 2:
        return {}
    parts = [Path(p).parts for p in paths]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return {p: Path(*Path(p).parts[common:]).as_posix() for p in paths}


@dataclass
class Table:
    common: dict[str, Any]
    columns: list[str]
    rows: list[dict[str, Any]]


def build_table(runs: Sequence[Run], sort: str = "path") -> Table:
    """The rows and columns described in the module doc."""
    knobs = [run.knobs for run in runs]
    names = _ordered_union(knobs)
    for name in names:
        if PATH_KNOB.search(name):
            short = _strip_common_folders([k.get(name) for k in knobs])
            for k in knobs:
                if isinstance(k.get(name), str) and k[name] in short:
                    k[name] = short[k[name]]
    common = {n: knobs[0][n] for n in names
              if all(n in k for k in knobs) and len(_distinct(k[n] for k in knobs)) == 1}
    differing = [n for n in names if n not in common]
    columns_of = {n: [_text(k.get(n)) for k in knobs] for n in differing}
    shown = [n for n in differing if "." not in n or not any(
        o != n and columns_of[o] == columns_of[n] and ("." not in o or differing.index(o) < differing.index(n))
        for o in differing)]
    metric_keys = list(dict.fromkeys(r.key for r in runs if r.key))
    columns = ["run", "folds"]
    for key in metric_keys:
        columns += [f"cv_{key}", f"cv_{key}_std"]
    columns += ["oof_auc", "test_auc", "best_epochs", *shown, "notes"]
    rows = []
    for run, k in zip(runs, knobs, strict=True):
        row: dict[str, Any] = {"run": run.name, "folds": ",".join(map(str, run.folds))}
        for key in metric_keys:
            same = run.key == key
            row[f"cv_{key}"], row[f"cv_{key}_std"] = (run.cv_mean, run.cv_std) if same else (None, None)
        row.update(oof_auc=run.oof_auc, test_auc=run.test_auc,
                   best_epochs=",".join(_text(run.best_epochs[f]) for f in run.folds))
        row.update({n: k.get(n) for n in shown})
        row["notes"] = "; ".join(run.notes)
        rows.append(row)

    def score(row_run: tuple[dict, Run]) -> tuple:
        row, run = row_run
        value = run.cv_mean if sort == "cv" else run.test_auc if sort == "test" else None
        return (value is None, -(value or 0.0), run.name)

    rows = [row for row, _ in sorted(zip(rows, runs, strict=True), key=score)]
    return Table(common, columns, rows)


def _cell(value: Any, digits: int | None = 4) -> str:
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}f}"
    return _text(value)


def to_markdown(table: Table) -> str:
    common = ", ".join(f"{k}={_text(v)}" for k, v in table.common.items())
    lines = [f"common: {common or '(none)'}", ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in table.columns) + "|")
    for row in table.rows:
        cells = [_cell(row.get(c)).replace("|", "\\|") for c in table.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.columns)
    for row in table.rows:
        writer.writerow([_cell(row.get(c), None) for c in table.columns])
    return buffer.getvalue()


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Tabulate training runs (folders of fold<k>/metrics.json, found recursively): one row per run "
        "with its folds, CV mean and std of the best key metric, out-of-fold and inner-test AUC (eval_oof/, "
        "eval_test/), best epochs and every knob that differs between the runs; knobs shared by all are listed "
        "once as 'common:'.",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUNS_DIR", help="folders to search for runs")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV here")
    parser.add_argument("--sort", choices=SORTS, default="path",
                        help="row order: run path (default), CV metric or inner-test AUC (best first)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --out / --csv files")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when every file was read, 1 when some were skipped, 2 when there is nothing to show."""
    args = build_parser(prog).parse_args(argv)
    for out in (args.out, args.csv):
        if out is not None and out.exists() and not args.overwrite:
            print(f"ERROR {OutputExistsError(out)}", file=sys.stderr)
            return 2
    problems = Problems(STAGE)
    runs = read_runs(args.runs, problems)
    if not runs:
        print(f"ERROR {', '.join(map(str, args.runs))}: no run found (a run is a folder of fold<k>/metrics.json)",
              file=sys.stderr)
        return 2
    problems.count("runs", len(runs))
    table = build_table(runs, args.sort)
    markdown = to_markdown(table)
    print(markdown, end="")
    try:
        for out, text in ((args.out, markdown), (args.csv, to_csv(table))):
            if out is not None:
                with atomic_path(out, args.overwrite) as tmp:
                    tmp.write_text(text)
                print(f"wrote {out}")
    except (OSError, OutputExistsError) as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
