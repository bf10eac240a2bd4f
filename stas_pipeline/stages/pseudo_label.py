"""One round of pseudo-labelling: confident predictions on unlabelled (or inner-test) images become training labels.

``stas pseudo-label --datalist D.json --predictions P.csv --out D_next.json [--high 0.98] [--low 0.02]
[--runs RUN_DIR] [--replace-previous] [--overwrite]``

Inputs:

- ``D.json``: a decathlon-style datalist (``{"training": [{"image", "label", "fold", ...}], "test": [...], ...}``,
  paths relative to its folder);
- ``P.csv``: image-level predictions as ``stas predict`` writes them, header ``image,prob,<member>...``
  (``image`` an absolute path; a relative one is taken relative to the CSV's folder; ``prob`` the fold mean);
- ``--runs RUN_DIR`` (optional): the training run that made ``P.csv`` (``<output_dir>/<bundle_name>``, holding
  ``fold<k>/metrics.json``), for the round's record: ``cv_auc`` is the AUC of ``eval_oof/metrics.json`` when
  present, else the mean of the folds' ``best_val_auc``; ``test_auc`` the AUC of ``eval_test/metrics.json``.

Each row with ``prob >= --high`` becomes a training entry of label 1, each with ``prob <= --low`` one of label 0
(``0 <= low < high <= 1``); rows in between are counted as uncertain. Images that already are labelled training
entries are left alone (so out-of-fold rows in ``P.csv`` do no harm). A pseudo entry is
``{"image": <path relative to D_next.json's folder>, "label": 0|1, "source": "pseudo", "pseudo_round": r,
"prob": p}`` with NO ``"fold"``: ``load_fold`` puts it in the training part of every fold and in no validation
part, so CV scores stay measured on real labels only. ``r`` is one more than the highest round already in
``D.json`` (entries and records), so rounds repeat: D -> D_r1 -> D_r2 ...

Earlier rounds' pseudo entries are kept by default: the recipe's rounds accumulate (each round adds the images
the better model became sure of), every entry keeps the round that made it, and going back a round is just the
previous round's datalist file. An image pseudo-labelled earlier keeps its label; a new prediction that
contradicts it is reported as a WARNING. ``--replace-previous`` drops every earlier pseudo entry first, so the
new round's set is exactly this prediction's confident images (a newer, better model relabels from scratch).

Nothing else changes: the ``test`` list, every entry with a fold, and all other keys are written as read (when
``D_next.json`` lies in another folder, relative ``image`` / ``label`` paths are rebased so that they name the
same files). The top-level ``"pseudo_rounds"`` list gets the round's record ``{"round", "predictions", "runs",
"high", "low", "added", "positives", "negatives", "uncertain", "already_labelled", "already_pseudo",
"replaced_previous", "cv_auc", "cv_auc_source", "test_auc", "cv_auc_fell", "test_label_checked",
"test_label_wrong"}``. ``cv_auc_fell`` is true when ``cv_auc`` is below the latest earlier round's recorded
``cv_auc``: a WARNING says so, because the recipe saw one weak round poison the next (null when either is
unknown). ``test_label_*`` count the pseudo labels given to labelled inner-test images, and how many disagree
with the true label: a diagnostic only, the true labels are never used.

The output is written atomically; an existing file is kept unless ``--overwrite`` (``--out`` may then be
``D.json`` itself). Exit codes: 0 written; 1 written, with rows skipped (``ERROR <image>: <reason>``: a ``prob``
not a number or outside [0, 1], an empty image, an image listed twice, an image file that does not exist);
2 nothing written: unreadable datalist, a CSV that cannot be read or lacks ``image``/``prob``, no usable row,
bad thresholds, an unusable ``--runs``, an existing ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stas_pipeline.core.fileio import OutputExistsError, write_json
from stas_pipeline.core.problems import Problems
from stas_pipeline.stages.experiments import find_runs, read_run
from stas_pipeline.tasks.classification.scores_csv import PredictionsError, read_predictions_csv

STAGE = "pseudo-label"
PATH_KEYS = ("image", "label")


class PseudoLabelError(ValueError):
    """An input that stops the whole round (reported as one line, exit 2)."""


def unit_interval(text: str) -> float:
    """argparse type of a probability threshold: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def read_datalist(path: str | Path) -> dict:
    """The datalist as written (paths still relative); PseudoLabelError when it is not a usable one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise PseudoLabelError(f"{path}: cannot read the datalist: {err}") from None
    except json.JSONDecodeError as err:
        raise PseudoLabelError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("training"), list):
        raise PseudoLabelError(f"{path}: not a datalist (a JSON object with a 'training' list)")
    for section, entries in data.items():
        if section in ("training", "test") and not (
                isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("image"), str)
                                                  for e in entries)):
            raise PseudoLabelError(f"{path}: every '{section}' entry must be an object with an 'image' path")
    if not isinstance(data.get("pseudo_rounds", []), list):
        raise PseudoLabelError(f"{path}: 'pseudo_rounds' is not a list")
    return data


def read_predictions(path: str | Path, problems: Problems) -> list[tuple[Path, float]]:
    """``(image, prob)`` of every usable row of a predictions CSV, in file order; bad rows are reported to
    ``problems`` and left out. PseudoLabelError for a CSV that cannot be read, lacks ``image``/``prob`` or has
    no usable row."""
    try:
        _, rows = read_predictions_csv(path, problems)
    except PredictionsError as err:
        raise PseudoLabelError(str(err)) from None
    if not rows:
        raise PseudoLabelError(f"{path}: no usable prediction row")
    return [(Path(row.image), row.prob) for row in rows.values()]


def run_aucs(run_dir: str | Path, problems: Problems) -> tuple[float | None, str | None, float | None]:
    """``(cv_auc, its source, test_auc)`` of the training run in ``run_dir`` (see the module doc)."""
    run_dir = Path(run_dir)
    runs = find_runs(run_dir) if run_dir.is_dir() else []
    if run_dir not in runs:
        others = f"; it holds {len(runs)} runs ({', '.join(str(r) for r in runs[:3])}...): name one" if runs else ""
        raise PseudoLabelError(f"{run_dir}: not a training run (no fold<k>/metrics.json in it){others}")
    run = read_run(run_dir, problems)
    if run is None:
        raise PseudoLabelError(f"{run_dir}: no readable fold<k>/metrics.json")
    source = "eval_oof" if run.oof_auc is not None else "folds" if run.cv_auc is not None else None
    if source is None:
        problems.warn(run_dir, f"no eval_oof/metrics.json and the key metric is {run.key}, not val_auc: "
                               "cv_auc not recorded")
    return run.cv_auc, source, run.test_auc


def _is_pseudo(entry: dict) -> bool:
    return "pseudo_round" in entry or entry.get("source") == "pseudo"


def _rebase(entries: list, base: Path, new_base: Path) -> list:
    """Entries with relative ``image``/``label`` paths made relative to ``new_base`` (same files)."""
    if base == new_base:
        return entries
    out = []
    for entry in entries:
        if isinstance(entry, dict):
            entry = dict(entry)
            for key in PATH_KEYS:
                if isinstance(entry.get(key), str) and not Path(entry[key]).is_absolute():
                    entry[key] = Path(os.path.relpath(base / entry[key], new_base)).as_posix()
        out.append(entry)
    return out


def _relative(path: str | Path | None, new_base: Path) -> str | None:
    return None if path is None else Path(os.path.relpath(os.path.abspath(path), new_base)).as_posix()


def next_round(datalist: dict) -> int:
    """One more than the highest pseudo round in the datalist's entries and records (1 for none)."""
    rounds = [e.get("pseudo_round") for e in datalist["training"]]
    rounds += [r.get("round") for r in datalist.get("pseudo_rounds", []) if isinstance(r, dict)]
    return 1 + max([r for r in rounds if isinstance(r, int) and not isinstance(r, bool)], default=0)


def pseudo_label(
    datalist: dict,
    datalist_path: str | Path,
    predictions: Sequence[tuple[Path, float]],
    out: str | Path,
    high: float = 0.98,
    low: float = 0.02,
    replace_previous: bool = False,
    record: dict | None = None,
    problems: Problems | None = None,
) -> dict:
    """The next round's datalist (see the module doc); ``record`` holds the round record's extra fields
    (``predictions``, ``runs``, ``cv_auc``, ``cv_auc_source``, ``test_auc``), paths already relative to ``out``."""
    if not 0 <= low < high <= 1:
        raise PseudoLabelError(f"thresholds: need 0 <= --low < --high <= 1, got --low {low} --high {high}")
    problems = problems if problems is not None else Problems(STAGE)
    base, new_base = Path(os.path.abspath(datalist_path)).parent, Path(os.path.abspath(out)).parent

    def resolved(entry: dict) -> Path:
        image = Path(entry["image"])
        return (image if image.is_absolute() else base / image).resolve()

    training = datalist["training"]
    labelled = {resolved(e) for e in training if not _is_pseudo(e)}
    earlier = {resolved(e): e for e in training if _is_pseudo(e)}
    test_labels = {resolved(e): e["label"] for e in datalist.get("test", [])
                   if e.get("label") in (0, 1) and not isinstance(e.get("label"), bool)}
    round_no = next_round(datalist)
    kept = [e for e in training if not (replace_previous and _is_pseudo(e))]
    counts = dict.fromkeys(("added", "positives", "negatives", "uncertain", "already_labelled", "already_pseudo",
                            "test_label_checked", "test_label_wrong"), 0)
    added = []
    for image, prob in predictions:
        key = image.resolve()
        label = 1 if prob >= high else 0 if prob <= low else None
        if key in labelled:
            counts["already_labelled"] += 1
            continue
        if not replace_previous and key in earlier:
            counts["already_pseudo"] += 1
            old = earlier[key]
            if label is not None and label != old.get("label"):
                problems.warn(image, f"pseudo label {old.get('label')} of round {old.get('pseudo_round')} kept, "
                                     f"though prob is now {prob:g} (--replace-previous relabels from scratch)")
            continue
        if label is None:
            counts["uncertain"] += 1
            continue
        if not image.is_file():
            problems.skip(image, "no such image file; not added")
            continue
        added.append({"image": _relative(image, new_base), "label": label, "source": "pseudo",
                      "pseudo_round": round_no, "prob": round(prob, 6)})
        counts["added"] += 1
        counts["positives" if label else "negatives"] += 1
        if key in test_labels:
            counts["test_label_checked"] += 1
            counts["test_label_wrong"] += int(test_labels[key] != label)
    added.sort(key=lambda e: e["image"])

    record = dict(record or {})
    previous = [r for r in datalist.get("pseudo_rounds", []) if isinstance(r, dict) and r.get("cv_auc") is not None]
    cv_auc, fell = record.get("cv_auc"), None
    if cv_auc is not None and previous:
        last = previous[-1]
        fell = cv_auc < last["cv_auc"]
        if fell:
            sources = ("" if last.get("cv_auc_source") == record.get("cv_auc_source")
                       else f" (measured differently: {last.get('cv_auc_source')} then {record.get('cv_auc_source')})")
            problems.warn(record.get("runs") or "--runs",
                          f"CV AUC fell from {last['cv_auc']:.4f} (round {last.get('round')}) to {cv_auc:.4f} "
                          f"(the run behind round {round_no}'s predictions){sources}: the earlier pseudo labels may "
                          "have hurt, and this round's may poison the next, as the recipe saw; consider stopping "
                          "here or pseudo-labelling from the better run's predictions")
    round_record = {
        "round": round_no, "predictions": record.get("predictions"), "runs": record.get("runs"),
        "high": high, "low": low, **counts,
        "replaced_previous": sum(map(_is_pseudo, training)) if replace_previous else 0,
        "cv_auc": cv_auc, "cv_auc_source": record.get("cv_auc_source"), "test_auc": record.get("test_auc"),
        "cv_auc_fell": fell,
    }
    new: dict[str, Any] = {}
    for section, value in datalist.items():
        is_entries = isinstance(value, list) and any(isinstance(e, dict) and "image" in e for e in value)
        new[section] = _rebase(value, base, new_base) if is_entries else value
    new["training"] = _rebase(kept, base, new_base) + added
    new["pseudo_rounds"] = [*datalist.get("pseudo_rounds", []), round_record]
    return new


def _auc_text(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4f}"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Add confident image-level predictions (prob >= --high: label 1, <= --low: label 0) to a "
        "datalist's training list as pseudo labels without a fold (so in every fold's training part), as round "
        "r = 1 + the highest earlier round; the test list and the folds' entries are left alone. The datalist's "
        "'pseudo_rounds' records each round, with the CV and inner-test AUC of the run behind it (--runs); a CV "
        "AUC lower than the previous round's is a warning.",
    )
    parser.add_argument("--datalist", type=Path, required=True, help="datalist JSON of the previous round")
    parser.add_argument("--predictions", type=Path, required=True,
                        help="predictions CSV of stas predict (image,prob,...), e.g. of the datalist's test images; "
                             "or a folder of stas predict on slides: pixel-level pseudo labels for the test tiles "
                             "of a tile datalist (see --max-uncertain)")
    parser.add_argument("--max-uncertain", type=unit_interval, default=0.01,
                        help="slides: a test tile joins training when at most this share of its pixels lies "
                             "between --low and --high (0.01); its mask is the pixels at or above --high")
    parser.add_argument("--out", type=Path, required=True, help="datalist JSON to write for the next round")
    parser.add_argument("--high", type=unit_interval, default=0.98, help="prob >= this: pseudo label 1 (0.98)")
    parser.add_argument("--low", type=unit_interval, default=0.02, help="prob <= this: pseudo label 0 (0.02)")
    parser.add_argument("--runs", type=Path, metavar="RUN_DIR",
                        help="the training run (<output_dir>/<bundle_name>) that made the predictions: its CV and "
                        "inner-test AUC go into the round's record")
    parser.add_argument("--replace-previous", action="store_true",
                        help="drop earlier rounds' pseudo entries (default: keep them, each with its round)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def pseudo_label_slides(datalist: dict, datalist_path: str | Path, predictions: Path, out: str | Path,
                        high: float, low: float, max_uncertain: float, problems: Problems
                        ) -> tuple[dict, Path, list[tuple[str, str]]]:
    """The next round's datalist from slide predictions (see tasks/slide/pseudo_labels.py), the pseudo-mask CSV
    it names, and that CSV's rows."""
    from stas_pipeline.tasks.slide.pseudo_labels import pseudo_tiles

    base, new_base = Path(os.path.abspath(datalist_path)).parent, Path(os.path.abspath(out)).parent
    round_no = next_round(datalist)
    masks_csv = new_base / f"{Path(out).stem}_pseudo_masks.csv"
    rles, tiles, counts = pseudo_tiles(datalist.get("test", []), predictions, high, low, max_uncertain, problems)
    training = _rebase(datalist["training"], base, new_base)
    earlier = {(e["image"], json.dumps(e["tile"], sort_keys=True)) for e in training if _is_pseudo(e) and "tile" in e}
    added = []
    for entry in _rebase(tiles, base, new_base):
        if (entry["image"], json.dumps(entry["tile"], sort_keys=True)) in earlier:
            counts["tiles_already_pseudo"] = counts.get("tiles_already_pseudo", 0) + 1
            continue
        entry = {k: v for k, v in entry.items() if k != "fold"}
        added.append({**entry, "label": _relative(masks_csv, new_base), "source": "pseudo", "pseudo_round": round_no})
    record = {"round": round_no, "predictions": _relative(predictions, new_base), "high": high, "low": low,
              "max_uncertain": max_uncertain, "masks": _relative(masks_csv, new_base), **counts,
              "tiles_added": len(added)}
    new: dict[str, Any] = {}
    for section, value in datalist.items():
        is_entries = isinstance(value, list) and any(isinstance(e, dict) and "image" in e for e in value)
        new[section] = _rebase(value, base, new_base) if is_entries else value
    new["training"] = new["training"] + added
    new["pseudo_rounds"] = [*datalist.get("pseudo_rounds", []), record]
    return new, masks_csv, sorted(rles.items())


def _main_slides(args: argparse.Namespace) -> int:
    from stas_pipeline.tasks.slide.rle import write_rle_csv

    problems = Problems(STAGE)
    try:
        if not args.low < args.high:
            raise PseudoLabelError(f"--low {args.low} must be below --high {args.high}")
        if args.out.exists() and not args.overwrite:
            raise OutputExistsError(args.out)
        new, masks_csv, rows = pseudo_label_slides(read_datalist(args.datalist), args.datalist, args.predictions,
                                                   args.out, args.high, args.low, args.max_uncertain, problems)
        if rows:
            write_rle_csv(rows, masks_csv, overwrite=args.overwrite)
        write_json(args.out, new, overwrite=args.overwrite)
    except (PseudoLabelError, OutputExistsError, OSError, ValueError) as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    r = new["pseudo_rounds"][-1]
    print(f"round {r['round']}: {r['tiles_added']} confident tiles of {r['slides']} slides added as pseudo labels "
          f"({r['positive_tiles']} with foreground); {r['tiles_uncertain']} tiles left out (more than "
          f"{args.max_uncertain:g} of their pixels between {args.low:g} and {args.high:g}); masks in {masks_csv}")
    return problems.finish()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when written, 1 when written with rows skipped, 2 when nothing could be written."""
    args = build_parser(prog).parse_args(argv)
    if args.predictions.is_dir():
        return _main_slides(args)
    problems = Problems(STAGE)
    new_base = Path(os.path.abspath(args.out)).parent
    try:
        if not args.low < args.high:
            raise PseudoLabelError(f"--low {args.low} must be below --high {args.high}")
        if args.out.exists() and not args.overwrite:
            raise OutputExistsError(args.out)
        datalist = read_datalist(args.datalist)
        record: dict[str, Any] = {"predictions": _relative(args.predictions, new_base),
                                  "runs": _relative(args.runs, new_base)}
        if args.runs is not None:
            record["cv_auc"], record["cv_auc_source"], record["test_auc"] = run_aucs(args.runs, problems)
        predictions = read_predictions(args.predictions, problems)
        new = pseudo_label(datalist, args.datalist, predictions, args.out, args.high, args.low,
                           args.replace_previous, record, problems)
        write_json(args.out, new, overwrite=args.overwrite)
    except (PseudoLabelError, OutputExistsError, OSError) as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    r = new["pseudo_rounds"][-1]
    if not r["added"]:
        problems.warn(args.predictions, f"no new image is at or beyond the thresholds ({args.low}, {args.high}); "
                                        "the training data is unchanged (a model trained with label smoothing a "
                                        "predicts about 1 - a and a / 2 at its most confident: set --high and "
                                        "--low inside those)")
    for name in ("added", "positives", "negatives", "uncertain", "already_labelled", "already_pseudo"):
        problems.count(name.replace("_", " "), r[name])
    earlier = sum(1 for e in new["training"] if _is_pseudo(e)) - r["added"]
    print(f"round {r['round']}: added {r['added']} pseudo labels ({r['positives']} positive, {r['negatives']} "
          f"negative); skipped as uncertain {r['uncertain']} (between {args.low:g} and {args.high:g}), already "
          f"labelled {r['already_labelled']}, already pseudo-labelled {r['already_pseudo']}")
    if r["test_label_checked"]:
        print(f"pseudo labels of labelled inner-test images: {r['test_label_wrong']} of {r['test_label_checked']} "
              "disagree with the true label (a diagnostic; the true labels are not used)")
    if args.runs is not None:
        print(f"run {args.runs}: CV AUC {_auc_text(r['cv_auc'])} ({r['cv_auc_source'] or 'n/a'}), inner-test AUC "
              f"{_auc_text(r['test_auc'])}" + (" - FELL since the previous round" if r["cv_auc_fell"] else ""))
    print(f"wrote {args.out}: training {len(new['training'])} entries ({r['added']} pseudo of round {r['round']}, "
          f"{earlier} of earlier rounds{', earlier rounds replaced' if args.replace_previous else ''}), "
          f"test {len(new.get('test', []))} unchanged")
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
