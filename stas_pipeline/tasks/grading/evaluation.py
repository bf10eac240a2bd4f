"""Grading evaluation: a predictions CSV ``image,score,grade,<member>...`` (``stas predict`` on grading runs)
scored against the grades 0-4 of a datalist section.

``stas evaluate --predictions P.csv --datalist D.json [--section test|training] --out DIR`` detects a grading
CSV by its ``score`` and ``grade`` columns. Scores: quadratic weighted kappa, accuracy and the confusion matrix
of the scores cut at the default cut points [0.5, 1.5, 2.5, 3.5], and the kappa of each member column. With out-of-fold
predictions (``--section training``, whose entries carry their fold) the cut points are also searched, guarded
against overfitting (:func:`stas_pipeline.tasks.grading.cut_points.guarded_search`: fitted on the other folds,
scored on the held fold, adopted only when they win there); both results are reported.

Outputs in ``DIR``: ``metrics.json`` (written last), ``per_image.csv`` (image, grade, score, predicted grade),
``confusion.png`` (with the cut points used), ``cut_points.json`` for out-of-fold predictions. ``--cuts
cut_points.json`` applies cut points found elsewhere (the out-of-fold search) instead of searching.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from stas_pipeline.core.datalist import read_section_labels
from stas_pipeline.core.errors import refused
from stas_pipeline.core.fileio import OutputExistsError, csv_text, write_bytes, write_json
from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.classification.scores_csv import PredictionsError, csv_header, read_predictions_csv
from stas_pipeline.tasks.grading.cut_points import guarded_search
from stas_pipeline.tasks.grading.metrics import DEFAULT_CUTS, N_GRADES, cut, grading_scores, plot_confusion

OUTPUTS = ("metrics.json", "per_image.csv", "confusion.png", "cut_points.json")


def is_grading_csv(path: str | Path) -> bool:
    """Whether ``path`` is a grading predictions CSV: a ``.csv`` whose header has ``score`` and ``grade``."""
    return {"score", "grade"} <= set(csv_header(path) or [])


def evaluate_grading(predictions: str | Path, datalist: str | Path, out: str | Path, section: str = "test",
                     overwrite: bool = False, problems: Problems | None = None,
                     cuts_file: str | Path | None = None) -> tuple[dict, Problems]:
    """Score ``predictions`` against ``datalist``'s ``section`` into ``out`` (see the module doc); with
    ``cuts_file`` (a ``cut_points.json``) also with its cuts, as ``with_cut_points``."""
    problems = problems or Problems("evaluate", done=("scored",))
    out = Path(out)
    if not overwrite and any((out / name).exists() for name in OUTPUTS):
        raise OutputExistsError(f"{out}: holds an earlier evaluation; pass --overwrite or another --out")
    members, rows = read_predictions_csv(predictions, problems, column="score")
    truth = read_section_labels(datalist, section, problems, classes=range(N_GRADES))
    for key in rows.keys() - truth.labels.keys() - truth.pseudo:
        problems.skip(key, f"predicted but not a labelled image of the {section!r} section of {datalist}")
    for key in truth.labels.keys() - rows.keys():
        problems.skip(key, f"labelled in the {section!r} section but not in {predictions}")
    keys = sorted(rows.keys() & truth.labels.keys())
    if not keys:
        raise PredictionsError(f"{predictions}: no prediction matches a labelled image of {datalist} {section!r}")
    grades = np.array([truth.labels[k] for k in keys])
    scores = np.array([rows[k].prob for k in keys])
    metrics = {"predictions": str(predictions), "datalist": str(datalist), "section": section,
               **grading_scores(grades, scores, DEFAULT_CUTS), "members": {}}
    for name in members:
        scored = [k for k in keys if name in rows[k].members]
        if scored:
            metrics["members"][name] = grading_scores([truth.labels[k] for k in scored],
                                                      [rows[k].members[name] for k in scored], DEFAULT_CUTS)["kappa"]
    out.mkdir(parents=True, exist_ok=True)
    cuts = DEFAULT_CUTS
    if cuts_file is not None:
        try:
            given = json.loads(Path(cuts_file).read_text())
            cuts = tuple(float(c) for c in given["cuts"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PredictionsError(f"{cuts_file}: not a cut_points.json of stas evaluate: {e}") from None
        metrics["cut_points"] = {"adopted": given.get("adopted"), "cuts": list(cuts), "from": str(cuts_file),
                                 "held_out_kappa_default": given.get("mean_default_kappa"),
                                 "held_out_kappa_searched": given.get("mean_searched_kappa")}
        metrics["with_cut_points"] = grading_scores(grades, scores, cuts)
    elif all(k in truth.folds for k in keys) and len({truth.folds[k] for k in keys}) > 1:
        search = guarded_search(scores, grades, [truth.folds[k] for k in keys])
        write_json(out / "cut_points.json", search, overwrite=True)
        cuts = tuple(search["cuts"])
        metrics["cut_points"] = {"adopted": search["adopted"], "cuts": list(cuts),
                                 "held_out_kappa_default": search["mean_default_kappa"],
                                 "held_out_kappa_searched": search["mean_searched_kappa"]}
        metrics["with_cut_points"] = grading_scores(grades, scores, cuts)
    predicted = cut(scores, cuts)
    rows = [[k, g, f"{s:.6f}", p] for k, g, s, p in zip(keys, grades, scores, predicted, strict=True)]
    write_bytes(out / "per_image.csv", csv_text([["image", "grade", "score", "predicted"], *rows]).encode(),
                overwrite=True)
    final = metrics.get("with_cut_points", metrics)
    plot_confusion(out / "confusion.png", final["confusion"],
                   f"kappa {final['kappa']:.3f}, cuts {', '.join(f'{c:.2f}' for c in cuts)}", overwrite=True)
    metrics["skipped"] = len(problems.skipped)
    problems.count("scored", len(keys))
    write_json(out / "metrics.json", metrics, overwrite=True)
    return metrics, problems


def evaluate_command(args: argparse.Namespace) -> Problems:
    """``stas evaluate --predictions`` of a grading CSV: score it, print the scores, return the problems."""
    with refused():
        metrics, problems = evaluate_grading(args.predictions, args.datalist, args.out, section=args.section or "test",
                                             overwrite=args.overwrite, cuts_file=args.cuts)
    print(format_grading(metrics))
    return problems


def format_grading(metrics: dict) -> str:
    """The lines ``stas evaluate`` prints for a grading evaluation."""
    lines = [f"  kappa        {_num(metrics['kappa'])}   (quadratic weighted, cuts 0.5/1.5/2.5/3.5)",
             f"  accuracy     {metrics['accuracy']:.4f}", f"  images       {metrics['n']}"]
    if "cut_points" in metrics:
        c = metrics["cut_points"]
        source = f"from {c['from']}" if "from" in c else (
            f"held-out kappa {_num(c['held_out_kappa_searched'])} vs {_num(c['held_out_kappa_default'])} default "
            f"-> {'adopted' if c['adopted'] else 'kept the defaults'}")
        lines.append(f"  cuts {', '.join(f'{v:.2f}' for v in c['cuts'])} ({source}): kappa "
                     f"{_num(metrics['with_cut_points']['kappa'])}")
    lines += [f"  member {name}: kappa {kappa:.4f}" for name, kappa in metrics["members"].items()
              if kappa is not None]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"
