"""Image-level pseudo labels (``stas pseudo-label`` of a classification or grading datalist): one round, in which
confident predictions on unlabelled (or inner-test) images become training labels.

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
same files; a datalist written before its ``task`` was recorded gets it). The top-level ``"pseudo_rounds"`` list
gets the round's record ``{"round", "predictions", "runs", "high", "low", "added", "positives", "negatives",
"uncertain", "already_labelled", "already_pseudo", "replaced_previous", "cv_auc", "cv_auc_source", "test_auc",
"cv_auc_fell", "test_label_checked", "test_label_wrong", "group", "labelled_by", "runs_datalist"}``.
``cv_auc_fell`` is true when ``cv_auc`` is below the latest earlier round's recorded ``cv_auc``: a WARNING says
so, because the recipe saw one weak round poison the next (null when either is unknown). ``test_label_*`` count
the pseudo labels given to labelled inner-test images, and how many disagree with the true label: a diagnostic
only, the true labels are never used.

Alternating rounds (``--group G [--labelled-by H]``; the HuBMAP kidney winners' scheme, for image-level and slide
datalists alike): two groups of runs, A and B, label the test data for each other, and a group never trains on
labels it made. ``--group G`` says which group trains on ``D_next.json``; the group that made ``P`` is read from
``--runs`` (the datalist its folds trained on, as their ``config.json`` names it, a relative path taken from the
working directory, is group H's when its latest round record says ``"group": H``) or given by ``--labelled-by H``
(needed for the first round, whose runs trained on the base datalist of no group; both given must agree). Each
group keeps its own chain (D -> D_A1 -> D_A2 ..., D -> D_B1 -> D_B2 ...; ``D.json`` is the base datalist or group
G's own); each round relabels from scratch (``--replace-previous`` implied): a group's pseudo labels are always
exactly the other group's latest predictions, and the round records keep the history. Refused in one line
(exit 2), naming the files: ``H == G`` (group G's own labels), a ``D.json`` of another group, a group datalist
without ``--group``, or a round whose labelling group is known neither way. The record gets ``"group": G,
"labelled_by": H, "runs_datalist"`` (the datalist behind ``--runs``); a plain round records them as null.

The output is written atomically; an existing file is kept unless ``--overwrite`` (``--out`` may then be
``D.json`` itself). Exit codes: 0 written; 1 written, with rows skipped (``ERROR <image>: <reason>``: a ``prob``
not a number or outside [0, 1], an empty image, an image listed twice, an image file that does not exist);
2 nothing written: unreadable datalist, a CSV that cannot be read or lacks ``image``/``prob``, no usable row,
bad thresholds, an unusable ``--runs``, an existing ``--out``, a refused alternating round.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stas_pipeline.core.bundles import RUN_CONFIG, parsed_content
from stas_pipeline.core.datalist import Datalist, read_datalist, write_datalist
from stas_pipeline.core.errors import StasError
from stas_pipeline.core.fileio import OutputExistsError
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.runs import find_runs, read_json_object, read_run
from stas_pipeline.tasks.classification.scores_csv import read_predictions_csv

STAGE = "pseudo-label"
PATH_KEYS = ("image", "label")
GROUP_FIELDS = ("group", "labelled_by", "runs_datalist")  # an alternating round's record fields
GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class PseudoLabelError(StasError, ValueError):
    """An input that stops the whole round (reported as one line, exit 2)."""


def check_round_options(args: argparse.Namespace) -> None:
    """``--low`` below ``--high``, and ``--out`` new unless ``--overwrite``."""
    if not args.low < args.high:
        raise PseudoLabelError(f"--low {args.low} must be below --high {args.high}")
    if args.out.exists() and not args.overwrite:
        raise OutputExistsError(args.out)


def read_round_datalist(path: str | Path) -> Datalist:
    """The datalist of the previous round (``.raw``: as written, paths still relative); PseudoLabelError when it
    has no 'training' list or its 'pseudo_rounds' is not a list."""
    datalist = read_datalist(path)
    if not isinstance(datalist.get("training"), list):
        raise PseudoLabelError(f"{path}: not a datalist (a JSON object with a 'training' list)")
    if not isinstance(datalist.get("pseudo_rounds", []), list):
        raise PseudoLabelError(f"{path}: 'pseudo_rounds' is not a list")
    return datalist


def write_round(path: Path, new: dict, datalist: Datalist, overwrite: bool) -> None:
    """Write the next round's datalist (declaring the task of ``datalist``); a failed write stops the round."""
    try:
        write_datalist(path, new, datalist.task, datalist.label_kind, overwrite)
    except OutputExistsError:
        raise
    except OSError as err:
        raise PseudoLabelError(str(err)) from None


def read_predictions(path: str | Path, problems: Problems) -> list[tuple[Path, float]]:
    """``(image, prob)`` of every usable row of a predictions CSV, in file order; bad rows are reported to
    ``problems`` and left out. PredictionsError for a CSV that cannot be read or lacks ``image``/``prob``,
    PseudoLabelError for one without a usable row."""
    _, rows = read_predictions_csv(path, problems)
    if not rows:
        raise PseudoLabelError(f"{path}: no usable prediction row")
    return [(Path(row.image), row.prob) for row in rows.values()]


def check_run(run_dir: Path) -> None:
    """PseudoLabelError unless ``run_dir`` is one training run (holding ``fold<k>/metrics.json``)."""
    runs = find_runs(run_dir) if run_dir.is_dir() else []
    if run_dir not in runs:
        others = f"; it holds {len(runs)} runs ({', '.join(str(r) for r in runs[:3])}...): name one" if runs else ""
        raise PseudoLabelError(f"{run_dir}: not a training run (no fold<k>/metrics.json in it){others}")


def run_aucs(run_dir: str | Path, problems: Problems) -> tuple[float | None, str | None, float | None]:
    """``(cv_auc, its source, test_auc)`` of the training run in ``run_dir`` (see the module doc)."""
    run_dir = Path(run_dir)
    check_run(run_dir)
    run = read_run(run_dir, problems)
    if run is None:
        raise PseudoLabelError(f"{run_dir}: no readable fold<k>/metrics.json")
    source = "eval_oof" if run.oof_auc is not None else "folds" if run.cv_auc is not None else None
    if source is None:
        problems.warn(run_dir, f"no eval_oof/metrics.json and the key metric is {run.key}, not val_auc: "
                               "cv_auc not recorded")
    return run.cv_auc, source, run.test_auc


def is_pseudo(entry: dict) -> bool:
    """An entry a pseudo-label round added."""
    return "pseudo_round" in entry or entry.get("source") == "pseudo"


def rebase(entries: list, base: Path, new_base: Path) -> list:
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


def rebased_datalist(datalist: dict, base: Path, new_base: Path) -> dict:
    """Every key of ``datalist`` as read, its lists of entries rebased from ``base`` onto ``new_base``."""
    new: dict[str, Any] = {}
    for section, value in datalist.items():
        is_entries = isinstance(value, list) and any(isinstance(e, dict) and "image" in e for e in value)
        new[section] = rebase(value, base, new_base) if is_entries else value
    return new


def relative(path: str | Path | None, new_base: Path) -> str | None:
    """``path`` relative to ``new_base`` (posix), None for None."""
    return None if path is None else Path(os.path.relpath(os.path.abspath(path), new_base)).as_posix()


def next_round(datalist: dict) -> int:
    """One more than the highest pseudo round in the datalist's entries and records (1 for none)."""
    rounds = [e.get("pseudo_round") for e in datalist["training"]]
    rounds += [r.get("round") for r in datalist.get("pseudo_rounds", []) if isinstance(r, dict)]
    return 1 + max([r for r in rounds if isinstance(r, int) and not isinstance(r, bool)], default=0)


def group_name(text: str) -> str:
    """argparse type of a group of runs (``A``, ``B``): letters, digits, '_', '.', '-'."""
    if not GROUP_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"a group is a name of letters, digits, '_', '.' or '-', got {text!r}")
    return text


def datalist_group(datalist: dict) -> tuple[str | None, str | None]:
    """``(group, labelled_by)`` of a datalist's latest round: the group of runs that trains on it and the group
    whose labels it holds; ``(None, None)`` when that round was not an alternating one (or there is none)."""
    rounds = [r for r in datalist.get("pseudo_rounds", []) if isinstance(r, dict)]
    latest = rounds[-1] if rounds else {}
    return latest.get("group"), latest.get("labelled_by")


def run_datalist(run_dir: Path) -> Path | None:
    """The datalist the folds of a training run trained on, as their ``config.json`` names it (absolute; a
    relative one taken from the working directory, where training ran); None for a run without ``config.json``.
    PseudoLabelError for a config that does not name one, or folds that name different ones."""
    found = set()
    for config in sorted(run_dir.glob(f"fold*/{RUN_CONFIG}")):
        try:
            content = read_json_object(config)
            if "datalist" not in content:
                raise ValueError("no 'datalist' key")
            (path,) = parsed_content(content, ["datalist"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise PseudoLabelError(f"{config}: cannot tell which datalist the run trained on: "
                                   f"{' '.join(str(err).split())}") from None
        found.add(Path(os.path.abspath(path)))
    if len(found) > 1:
        names = ", ".join(map(str, sorted(found)))
        raise PseudoLabelError(f"{run_dir}: its folds trained on different datalists ({names})")
    return found.pop() if found else None


def group_fields(args: argparse.Namespace, datalist: Datalist, new_base: Path, problems: Problems) -> dict:
    """The round's ``group``, ``labelled_by`` and ``runs_datalist`` (all None for a plain round), checked as the
    module doc says (``args``: ``group``, ``labelled_by``, ``runs``, ``datalist``, ``predictions``, ``out``);
    PseudoLabelError for a refused round or a ``--runs`` that is not one training run."""
    if args.runs is not None:
        check_run(args.runs)
    own, made_by = datalist_group(datalist.raw)
    if args.group is None:
        if args.labelled_by is not None:
            raise PseudoLabelError("--labelled-by is for alternating rounds: give --group, the group that trains "
                                   "on --out")
        if own is not None:
            raise PseudoLabelError(f"{args.datalist}: group {own}'s datalist (labelled by group {made_by}): its "
                                   f"next round needs --group {own} and the other group's predictions")
        return dict.fromkeys(GROUP_FIELDS)
    if own not in (None, args.group):
        raise PseudoLabelError(f"{args.datalist}: group {own}'s datalist (labelled by group {made_by}), not group "
                               f"{args.group}'s: start group {args.group}'s round from the base datalist or from "
                               f"group {args.group}'s latest")
    trained_on = run_datalist(args.runs) if args.runs is not None else None
    known = trained_on is not None and trained_on.is_file()
    runs_group = datalist_group(read_round_datalist(trained_on).raw)[0] if known else None
    if args.runs is None:
        source = "no --runs"
    elif trained_on is None:
        source = f"--runs {args.runs} names no datalist (no fold<k>/{RUN_CONFIG})"
    elif not known:
        source = f"--runs {args.runs} trained on {trained_on}, not found from here"
    else:
        source = (f"--runs {args.runs} trained on {trained_on}, "
                  + (f"group {runs_group}'s datalist" if runs_group else "a datalist of no group"))
    maker = args.labelled_by or runs_group
    if maker is None:
        raise PseudoLabelError(f"{args.predictions}: which group's runs made these predictions? {source}: give "
                               "--labelled-by")
    if runs_group not in (None, maker):
        raise PseudoLabelError(f"{args.predictions}: --labelled-by {maker}, but {source}")
    if args.runs is not None and not known and args.labelled_by is not None:
        problems.warn(args.runs, f"--labelled-by {maker} not checked: {source}")
    if maker == args.group:
        how = source if runs_group else f"--labelled-by {maker}"
        raise PseudoLabelError(f"{args.predictions}: group {maker}'s predictions ({how}) would label {args.out}, "
                               f"group {args.group}'s datalist: a group never trains on labels it made; label it "
                               "with the other group's predictions")
    return {"group": args.group, "labelled_by": maker, "runs_datalist": relative(trained_on, new_base) if known
            else None}


def group_text(record: dict) -> str:
    """`` for group G, labelled by group H`` of an alternating round's record, '' for a plain one."""
    return f" for group {record['group']}, labelled by group {record['labelled_by']}" if record.get("group") else ""


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
    (``predictions``, ``runs``, ``cv_auc``, ``cv_auc_source``, ``test_auc``, ``group``, ``labelled_by``,
    ``runs_datalist``), paths already relative to ``out``."""
    if not 0 <= low < high <= 1:
        raise PseudoLabelError(f"thresholds: need 0 <= --low < --high <= 1, got --low {low} --high {high}")
    problems = problems if problems is not None else Problems(STAGE)
    base, new_base = Path(os.path.abspath(datalist_path)).parent, Path(os.path.abspath(out)).parent

    def resolved(entry: dict) -> Path:
        image = Path(entry["image"])
        return (image if image.is_absolute() else base / image).resolve()

    training = datalist["training"]
    labelled = {resolved(e) for e in training if not is_pseudo(e)}
    earlier = {resolved(e): e for e in training if is_pseudo(e)}
    test_labels = {resolved(e): e["label"] for e in datalist.get("test", [])
                   if e.get("label") in (0, 1) and not isinstance(e.get("label"), bool)}
    round_no = next_round(datalist)
    kept = [e for e in training if not (replace_previous and is_pseudo(e))]
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
        added.append({"image": relative(image, new_base), "label": label, "source": "pseudo",
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
        "replaced_previous": sum(map(is_pseudo, training)) if replace_previous else 0,
        "cv_auc": cv_auc, "cv_auc_source": record.get("cv_auc_source"), "test_auc": record.get("test_auc"),
        "cv_auc_fell": fell, **{key: record.get(key) for key in GROUP_FIELDS},
    }
    new = rebased_datalist(datalist, base, new_base)
    new["training"] = rebase(kept, base, new_base) + added
    new["pseudo_rounds"] = [*datalist.get("pseudo_rounds", []), round_record]
    return new


def _auc_text(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4f}"


def pseudo_label_images(args: argparse.Namespace) -> Problems:
    """``stas pseudo-label`` of image-level predictions (see the module doc): the next round's datalist written,
    the round reported."""
    problems = Problems(STAGE)
    new_base = Path(os.path.abspath(args.out)).parent
    check_round_options(args)
    datalist = read_round_datalist(args.datalist)
    record: dict[str, Any] = {"predictions": relative(args.predictions, new_base),
                              "runs": relative(args.runs, new_base), **group_fields(args, datalist, new_base, problems)}
    if args.runs is not None:
        record["cv_auc"], record["cv_auc_source"], record["test_auc"] = run_aucs(args.runs, problems)
    predictions = read_predictions(args.predictions, problems)
    replace = args.replace_previous or record["group"] is not None
    new = pseudo_label(datalist.raw, args.datalist, predictions, args.out, args.high, args.low, replace, record,
                       problems)
    write_round(args.out, new, datalist, args.overwrite)
    r = new["pseudo_rounds"][-1]
    if not r["added"]:
        problems.warn(args.predictions, f"no new image is at or beyond the thresholds ({args.low}, {args.high}); "
                                        "the training data is unchanged (a model trained with label smoothing a "
                                        "predicts about 1 - a and a / 2 at its most confident: set --high and "
                                        "--low inside those)")
    for name in ("added", "positives", "negatives", "uncertain", "already_labelled", "already_pseudo"):
        problems.count(name.replace("_", " "), r[name])
    earlier = sum(1 for e in new["training"] if is_pseudo(e)) - r["added"]
    print(f"round {r['round']}{group_text(r)}: added {r['added']} pseudo labels ({r['positives']} positive, "
          f"{r['negatives']} negative); skipped as uncertain {r['uncertain']} (between {args.low:g} and "
          f"{args.high:g}), already labelled {r['already_labelled']}, already pseudo-labelled {r['already_pseudo']}")
    if r["test_label_checked"]:
        print(f"pseudo labels of labelled inner-test images: {r['test_label_wrong']} of {r['test_label_checked']} "
              "disagree with the true label (a diagnostic; the true labels are not used)")
    if args.runs is not None:
        print(f"run {args.runs}: CV AUC {_auc_text(r['cv_auc'])} ({r['cv_auc_source'] or 'n/a'}), inner-test AUC "
              f"{_auc_text(r['test_auc'])}" + (" - FELL since the previous round" if r["cv_auc_fell"] else ""))
    print(f"wrote {args.out}: training {len(new['training'])} entries ({r['added']} pseudo of round {r['round']}, "
          f"{earlier} of earlier rounds{', earlier rounds replaced' if replace else ''}), "
          f"test {len(new.get('test', []))} unchanged")
    return problems
