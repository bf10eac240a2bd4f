"""The table of runs that ``stas experiments`` prints: one row per run, its CV and inner-test scores and every
knob that differs between the runs (the stage's help describes the columns), as markdown or CSV."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stas_pipeline.core.fileio import csv_text
from stas_pipeline.core.runs import Run, cell_text, distinct, ordered_union

PATH_KNOB = re.compile(r"(^|\.)(datalist|checkpoint|dataset_dir|output_dir)$|_(dir|file|path)$")
SORTS = ("path", "cv", "test")


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
    names = ordered_union(knobs)
    for name in names:
        if PATH_KNOB.search(name):
            short = _strip_common_folders([k.get(name) for k in knobs])
            for k in knobs:
                if isinstance(k.get(name), str) and k[name] in short:
                    k[name] = short[k[name]]
    common = {n: knobs[0][n] for n in names
              if all(n in k for k in knobs) and len(distinct(k[n] for k in knobs)) == 1}
    differing = [n for n in names if n not in common]
    columns_of = {n: [cell_text(k.get(n)) for k in knobs] for n in differing}
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
                   best_epochs=",".join(cell_text(run.best_epochs[f]) for f in run.folds))
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
    return cell_text(value)


def to_markdown(table: Table) -> str:
    common = ", ".join(f"{k}={cell_text(v)}" for k, v in table.common.items())
    lines = [f"common: {common or '(none)'}", ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in table.columns) + "|")
    for row in table.rows:
        cells = [_cell(row.get(c)).replace("|", "\\|") for c in table.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    return csv_text([table.columns, *([_cell(row.get(c), None) for c in table.columns] for row in table.rows)])
