"""Image-level evaluation: a predictions CSV scored against the 0/1 labels of a datalist section.

``stas evaluate --predictions P.csv --datalist D.json [--section test|training] --out DIR [--threshold 0.5]
[--worst 8] [--overwrite]``

Inputs:

- ``P.csv``: ``image,prob,<member>...`` as ``stas predict`` writes it (``image`` an absolute path, a relative one
  is taken relative to the CSV's folder; ``prob`` the final probability of the positive class; one column per
  member model, e.g. ``fundus_lite0/fold0``, whose cells may be empty where that model did not predict the image,
  as in an out-of-fold CSV);
- ``D.json``: a decathlon-style datalist whose ``section`` (``test``, the labelled inner test, by default; or
  ``training`` for out-of-fold predictions) lists ``{"image": rel, "label": 0|1, ...}``. Entries with
  ``"pseudo_round"`` (pseudo labels from ``stas pseudo-label``) are not ground truth and are never scored; entries
  without a label (an unlabelled test set) are not scored either. Images are matched by their resolved path.

Scores (:func:`score`): ROC AUC (MONAI's ``compute_roc_auc``; tied probabilities count one half), and at the
threshold, where **prob >= threshold is positive**: sensitivity TP / (TP + FN), specificity TN / (TN + FP),
accuracy; ``n``, ``positives``, ``negatives`` and the confusion counts. Each member column gets its own AUC over
the scored images it predicted (``null`` where those hold one class only).

Outputs in ``DIR`` (a folder; other files in it are left alone):

- ``metrics.json``: the scores above, ``members`` (``{name: {"auc", "n", "positives"}}``), the inputs and the
  number of skipped rows; written last, so its presence means a complete evaluation;
- ``per_image.csv``: ``image,label,prob,pred,correct,rank`` sorted by image; ``rank`` 1 is the worst image, by
  the distance of ``prob`` from the label (positives with the lowest prob, negatives with the highest);
- ``roc.png``: the ROC curve of ``prob`` (the mean) and of each member, AUC in the legend, the operating point of
  the threshold marked;
- ``worst.csv`` (the ``--worst`` first rows by rank, same columns) and ``worst.png``, a contact sheet of those
  images (~160 px thumbnails captioned with name, label and prob; red where the prediction is wrong). With
  ``--worst 0`` only the header of ``worst.csv`` is written and no ``worst.png``.

Edge cases: a prediction row whose image is not in the section, a labelled image without a prediction, a ``prob``
that is not a number in [0, 1], an image listed twice (CSV or section), an entry with a label other than 0/1:
``ERROR <file>: <reason>``, left out, exit 1. Nothing scorable (no prediction matches a labelled image, or the
scored images hold only one class, so the AUC is undefined), an unreadable CSV or datalist, or an existing output
without ``--overwrite``: one line, nothing written, exit 2. An image that cannot be read for the contact sheet is
a WARNING and a grey tile.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from stas_pipeline.core.datalist import read_section_labels
from stas_pipeline.core.errors import refused
from stas_pipeline.core.fileio import OutputExistsError, atomic_path, write_bytes, write_json
from stas_pipeline.core.images import to_rgb
from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.classification.scores_csv import PredictionsError, read_predictions_csv

STAGE = "evaluate"
SECTIONS = ("test", "training")
OUTPUTS = ("metrics.json", "per_image.csv", "roc.png", "worst.csv", "worst.png")
PER_IMAGE_COLUMNS = ("image", "label", "prob", "pred", "correct", "rank")
POSITIVE_RULE = "prob >= threshold"
THUMB = 160  # thumbnail side of the contact sheet, pixels
CAPTION_LINES = 2
LINE = 12  # caption line height, pixels
GAP = 4  # between tiles, pixels


# --- scores ---------------------------------------------------------------------------------------------------


def _check_binary(labels: Sequence[int], probs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"labels and probabilities must be two 1-D arrays of one length, got {y.shape}, {p.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(y.tolist()) - {0, 1})[:5]}")
    if not np.isfinite(p).all():
        raise ValueError("probabilities must be finite")
    y = y.astype(np.int64)
    positives = int(y.sum())
    if positives in (0, len(y)):
        which = "no image" if not len(y) else "all positive" if positives else "all negative"
        raise ValueError(f"only one class among the {len(y)} scored images ({which}): the AUC is undefined")
    return y, p


def roc_auc(labels: Sequence[int], probs: Sequence[float]) -> float:
    """ROC AUC of ``probs`` against 0/1 ``labels`` by MONAI's ``compute_roc_auc`` (ties count one half).

    Raises ``ValueError`` when only one class is present (the AUC is undefined).
    """
    import torch  # imported here: torch and MONAI's metrics take ~6 s to import, every stas command would wait
    from monai.metrics import compute_roc_auc

    y, p = _check_binary(labels, probs)
    return float(compute_roc_auc(torch.from_numpy(p), torch.from_numpy(y)))


def roc_points(labels: Sequence[int], probs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the ROC curve, one point per distinct probability, from (0, 0) to (1, 1).

    Tied probabilities make one diagonal step, so the area under these points (trapezoids) is the AUC.
    """
    y, p = _check_binary(labels, probs)
    order = np.argsort(-p, kind="stable")
    p, y = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # the last index of each group of equal probabilities
    tps, fps = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def score(labels: Sequence[int], probs: Sequence[float], threshold: float = 0.5) -> dict:
    """AUC, and sensitivity, specificity, accuracy with ``prob >= threshold`` positive, with the counts.

    Raises ``ValueError`` for labels other than 0/1, non-finite probabilities, or one class only.
    """
    y, p = _check_binary(labels, probs)
    pred = p >= threshold
    tp, fn = int(np.sum(pred & (y == 1))), int(np.sum(~pred & (y == 1)))
    tn, fp = int(np.sum(~pred & (y == 0))), int(np.sum(pred & (y == 0)))
    return {
        "auc": roc_auc(y, p),
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "accuracy": (tp + tn) / len(y),
        "n": len(y),
        "positives": tp + fn,
        "negatives": tn + fp,
        "threshold": threshold,
        "positive_rule": POSITIVE_RULE,
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
    }


def member_scores(rows: Sequence[dict], members: Sequence[str]) -> dict[str, dict]:
    """``{member: {"auc", "n", "positives"}}`` over the rows each member predicted (AUC None for one class)."""
    out = {}
    for name in members:
        pairs = [(r["label"], r["members"][name]) for r in rows if name in r["members"]]
        labels = [label for label, _ in pairs]
        try:
            auc = roc_auc(labels, [p for _, p in pairs])
        except ValueError:
            auc = None
        out[name] = {"auc": auc, "n": len(pairs), "positives": int(sum(labels))}
    return out


def rank_worst(rows: list[dict]) -> None:
    """Set ``rank`` on each row: 1 for the largest ``|label - prob|``, ties by image path."""
    order = sorted(rows, key=lambda r: (-abs(r["label"] - r["prob"]), r["image"]))
    for i, row in enumerate(order, 1):
        row["rank"] = i


# --- outputs --------------------------------------------------------------------------------------------------


def _csv_bytes(rows: Sequence[dict]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, PER_IMAGE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "prob": f"{row['prob']:.6f}"})
    return text.getvalue().encode()


def plot_roc(path: str | Path, rows: Sequence[dict], metrics: dict, overwrite: bool = False) -> None:
    """ROC curves of the mean and of each member (AUC in the legend) and the threshold's operating point."""
    from matplotlib.figure import Figure  # imported here: 0.5 s, paid only by the evaluations that plot

    fig = Figure(figsize=(5.5, 5.5), dpi=100)
    ax = fig.add_subplot()
    for name, member in metrics["members"].items():
        if member["auc"] is None:
            continue
        pairs = [(r["label"], r["members"][name]) for r in rows if name in r["members"]]
        fpr, tpr = roc_points([y for y, _ in pairs], [p for _, p in pairs])
        ax.plot(fpr, tpr, lw=1, alpha=0.7, label=f"{name} (AUC {member['auc']:.3f}, n {member['n']})")
    fpr, tpr = roc_points([r["label"] for r in rows], [r["prob"] for r in rows])
    ax.plot(fpr, tpr, color="black", lw=2, label=f"mean (AUC {metrics['auc']:.3f}, n {metrics['n']})")
    ax.plot([1 - metrics["specificity"]], [metrics["sensitivity"]], "o", color="red",
            label=f"prob >= {metrics['threshold']:g}: sens {metrics['sensitivity']:.3f}, "
                  f"spec {metrics['specificity']:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false-positive rate)",
           ylabel="sensitivity (true-positive rate)", title=f"ROC: {metrics['positives']} positive, "
                                                            f"{metrics['negatives']} negative images")
    ax.legend(loc="lower right", fontsize="x-small")
    fig.tight_layout()
    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, format="png")


def _thumbnail(path: str, problems: Problems) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.draft("RGB", (THUMB, THUMB))  # JPEG: decode at a reduced scale
            return ImageOps.contain(to_rgb(img, path), (THUMB, THUMB))  # fit the tile, small images grown
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        problems.warn(path, f"cannot read it for worst.png: {e}; a grey tile instead")
        return Image.new("RGB", (THUMB, THUMB), (96, 96, 96))


def contact_sheet(rows: Sequence[dict], problems: Problems, columns: int = 4) -> np.ndarray:
    """An RGB contact sheet of the rows' images: ~:data:`THUMB` px thumbnails, each captioned with its name,
    label and prob (red when the prediction is wrong)."""
    columns = max(1, min(columns, len(rows)))
    tile_w, tile_h = THUMB + GAP, THUMB + CAPTION_LINES * LINE + 2 * GAP
    sheet = Image.new("RGB", (columns * tile_w, math.ceil(len(rows) / columns) * tile_h), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        x, y = (i % columns) * tile_w + GAP // 2, (i // columns) * tile_h + GAP // 2
        thumb = _thumbnail(row["image"], problems)
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        colour = (255, 255, 255) if row["correct"] else (255, 80, 80)
        name = Path(row["image"]).name
        name = name if len(name) <= 26 else name[:12] + "~" + name[-13:]
        draw.text((x + 2, y + THUMB + 2), f"#{row['rank']} {name}", fill=colour)
        draw.text((x + 2, y + THUMB + 2 + LINE), f"label {row['label']}   prob {row['prob']:.3f}", fill=colour)
    return np.asarray(sheet)


def _is_nan(text: str | None) -> bool:
    try:
        return math.isnan(float(text))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _why_no_row(predictions: Path) -> str:
    """Why a predictions CSV gave no usable row: every prob is NaN (a diverged run), or each row was reported."""
    try:
        with predictions.open(newline="", encoding="utf-8-sig") as f:
            probs = [row.get("prob") for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error):
        probs = []
    if probs and all(map(_is_nan, probs)):
        return f"every prob is NaN ({len(probs)} rows): the run that predicted them gave no numbers"
    return "no row has a usable image and prob (each reported above)" if probs else "no rows"


def _check_outputs(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PredictionsError(f"{out}: exists and is not a folder")
    existing = [out / name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(existing[0])


def evaluate_predictions(
    predictions: str | Path,
    datalist: str | Path,
    out: str | Path,
    section: str = "test",
    threshold: float = 0.5,
    worst: int = 8,
    overwrite: bool = False,
) -> tuple[dict, Problems]:
    """Score ``predictions`` against ``datalist``'s ``section`` and write the outputs into ``out`` (module doc).

    Returns the metrics (as in ``metrics.json``) and the problems. Raises :class:`PredictionsError` when nothing
    can be scored or an input is unusable, :class:`OutputExistsError` for an existing output without
    ``overwrite``; nothing is written then.
    """
    if section not in SECTIONS:
        raise PredictionsError(f"unknown section {section!r} (known: {', '.join(SECTIONS)})")
    if worst < 0:
        raise PredictionsError(f"worst must be >= 0, got {worst}")
    predictions, datalist, out = Path(predictions), Path(datalist), Path(out)
    _check_outputs(out, overwrite)
    problems = Problems(STAGE, done=("scored",))
    members, preds = read_predictions_csv(predictions, problems)
    if not preds:
        raise PredictionsError(f"{predictions}: {_why_no_row(predictions)}; nothing to score")
    truth = read_section_labels(datalist, section, problems)
    if not truth.labels:
        raise PredictionsError(f"{datalist}: no entry of the {section!r} section has a 0/1 label"
                               f"{' (pseudo labels are not ground truth)' if truth.pseudo else ''}: nothing to score")
    matched = [key for key in preds if key in truth.labels]
    if not matched:
        example = next(iter(preds), None)
        raise PredictionsError(f"{predictions}: no row names a labelled image of the {section!r} section of "
                               f"{datalist}{f' (first row: {example})' if example else ''}; wrong --section?")

    pseudo = unlabelled = 0
    for key in preds:
        if key in truth.labels:
            continue
        if key in truth.pseudo:
            pseudo += 1
        elif key in truth.unlabelled:
            unlabelled += 1
        else:
            problems.skip(key, f"not in the {section!r} section of {datalist}; not scored")
    for key in truth.labels:
        if key not in preds:
            problems.skip(key, f"labelled in the {section!r} section of {datalist} but not predicted in "
                               f"{predictions}; not scored")
    if pseudo:
        problems.warn(predictions, f"{pseudo} rows are pseudo-labelled entries (pseudo_round), not ground truth: "
                                   "not scored")
    if unlabelled:
        problems.warn(predictions, f"{unlabelled} rows are unlabelled {section!r} entries: not scored")

    rows = []
    for key in sorted(matched):
        label, prob = truth.labels[key], preds[key].prob
        pred = int(prob >= threshold)
        rows.append({"image": key, "label": label, "prob": prob, "pred": pred, "correct": int(pred == label),
                     "members": preds[key].members})
    try:
        metrics = score([r["label"] for r in rows], [r["prob"] for r in rows], threshold)
    except ValueError as e:
        raise PredictionsError(f"{predictions}: {e}") from None
    metrics["members"] = member_scores(rows, members)
    rank_worst(rows)
    worst_rows = sorted(rows, key=lambda r: r["rank"])[:worst]
    metrics.update(predictions=str(predictions.resolve()), datalist=str(datalist.resolve()), section=section,
                   worst=len(worst_rows), skipped=len(problems.skipped))

    write_bytes(out / "per_image.csv", _csv_bytes(rows), overwrite)
    write_bytes(out / "worst.csv", _csv_bytes(worst_rows), overwrite)
    plot_roc(out / "roc.png", rows, metrics, overwrite)
    if worst_rows:
        sheet = contact_sheet(worst_rows, problems)
        with atomic_path(out / "worst.png", overwrite) as tmp:
            Image.fromarray(sheet).save(tmp, format="PNG")
    elif (out / "worst.png").exists():  # --overwrite with --worst 0: no stale sheet of an earlier run
        (out / "worst.png").unlink()
    write_json(out / "metrics.json", metrics, overwrite)
    problems.count("scored", len(rows))
    return metrics, problems


def format_metrics(metrics: dict) -> str:
    """The metrics as a short table."""
    lines = [
        f"{metrics['n']} images ({metrics['positives']} positive, {metrics['negatives']} negative), "
        f"{metrics['section']} section",
        f"  AUC          {metrics['auc']:.4f}",
        f"  sensitivity  {metrics['sensitivity']:.4f}   positive: prob >= {metrics['threshold']:g}",
        f"  specificity  {metrics['specificity']:.4f}",
        f"  accuracy     {metrics['accuracy']:.4f}   TP {metrics['tp']}  FN {metrics['fn']}  TN {metrics['tn']}  "
        f"FP {metrics['fp']}",
    ]
    if metrics.get("members"):
        width = max(map(len, metrics["members"]))
        lines.append("  member AUC")
        for name, m in metrics["members"].items():
            auc = "   n/a" if m["auc"] is None else f"{m['auc']:.4f}"
            lines.append(f"    {name:<{width}}  {auc}  (n {m['n']})")
    return "\n".join(lines)


def evaluate_command(args: argparse.Namespace) -> Problems:
    """``stas evaluate --predictions`` of a probability CSV: score it, print the scores, return the problems."""
    if args.cuts is not None:
        raise PredictionsError(f"--cuts: for grading CSVs (image,score,grade,...); {args.predictions} is not one")
    with refused():
        metrics, problems = evaluate_predictions(
            args.predictions,
            args.datalist,
            args.out,
            section=args.section or "test",
            threshold=0.5 if args.threshold is None else args.threshold,
            worst=8 if args.worst is None else args.worst,
            overwrite=args.overwrite,
        )
    print(format_metrics(metrics))
    return problems
