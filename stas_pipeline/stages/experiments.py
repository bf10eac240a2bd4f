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
import sys
from pathlib import Path

from stas_pipeline.cli import command
from stas_pipeline.core.experiments_table import SORTS, build_table, to_csv, to_markdown
from stas_pipeline.core.fileio import OutputExistsError, atomic_path
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.runs import ExperimentsError, read_runs

STAGE = "experiments"


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


@command
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when every file was read, 1 when some were skipped, 2 when there is nothing to show."""
    args = build_parser(prog).parse_args(argv)
    for out in (args.out, args.csv):
        if out is not None and out.exists() and not args.overwrite:
            raise OutputExistsError(out)
    problems = Problems(STAGE)
    runs = read_runs(args.runs, problems)
    if not runs:
        raise ExperimentsError(f"{', '.join(map(str, args.runs))}: no run found (a run is a folder of "
                               "fold<k>/metrics.json)")
    problems.count("runs", len(runs))
    table = build_table(runs, args.sort)
    markdown = to_markdown(table)
    print(markdown, end="")
    for out, text in ((args.out, markdown), (args.csv, to_csv(table))):
        if out is not None:
            try:
                with atomic_path(out, args.overwrite) as tmp:
                    tmp.write_text(text)
            except OSError as err:
                raise ExperimentsError(str(err)) from None
            print(f"wrote {out}")
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
