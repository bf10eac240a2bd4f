"""Voting / mean-probability ensemble of prediction folders, image by image.

``stas ensemble MEMBER [MEMBER ...] --out DIR`` reads ``<stem>.png`` (any grey level, p * 255) or
``<stem>.npy`` (probabilities in [0, 1]) from every member folder and writes ``DIR/<stem>.png`` (mode L,
0/255):

- ``--method vote`` (default): each member pixel is foreground where its probability is above
  ``--binarize-threshold`` (default 0: any PNG value > 0, as the published STAS masks need); the output is the
  strict (optionally weighted) majority; an exact tie, possible only with an even number of members or with
  weights, goes to ``--tie`` (default background).
- ``--method mean``: the (weighted) mean probability, foreground where it is above ``--threshold`` (default
  0.5; strictly above, so that the mean of binary masks gives the same answer as the vote with ties to
  background).

Images are read one at a time. The outputs go into a temporary folder beside ``DIR`` that replaces ``DIR``
only when every image has been handled, so ``DIR`` is never half-written. The core functions :func:`vote` and
:func:`mean_probability` work on arrays of any shape (masks, probability maps, class-probability vectors).

Image-level members: ``stas ensemble A.csv B.csv ... --out C.csv`` (members recognised by their ``.csv`` suffix;
mixing CSVs and folders is an error) joins prediction CSVs (``image,prob,<member>...`` as ``stas predict`` writes
them) on ``image`` and writes ``C.csv`` as ``image,prob,<A>,<B>...``: one column per input CSV, named after its
stem (with parent folders added where two stems are equal), holding that CSV's ``prob``. ``prob`` is

- ``--method mean`` (the default for CSVs): the (weighted) mean of the members' ``prob``;
- ``--method vote``: 1.0 or 0.0, the strict (weighted) majority of the members binarised with
  ``prob >= --threshold`` (default 0.5, the rule of ``stas evaluate``), exact ties to ``--tie``. A 0/1 column
  ranks images poorly: use ``mean`` where an AUC is to be measured.

Grading CSVs (``image,score,grade,<member>...``) are joined the same way into ``image,score,grade,<A>,<B>...``
with ``--method mean`` (the mean score, cut at [0.5, 1.5, 2.5, 3.5]), ``label-average`` (each member's grade,
cut at its own cut points, averaged, then rounded half up) or ``scaled-average`` (each member's score mapped
through its own cut points onto the common scale, averaged, then cut); a member's cut points come from
``--member-cuts``, one ``cut_points.json`` of ``stas evaluate`` per member (default: [0.5, 1.5, 2.5, 3.5]).

An image missing from some members (or whose row there is unusable) is reported as ``ERROR <image>: missing from
<files>`` and left out (exit 1). ``C.csv`` is written atomically and an existing one is kept unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from stas_pipeline.core.cli_types import probability_threshold
from stas_pipeline.core.fileio import OutputExistsError, atomic_folder, write_png
from stas_pipeline.core.mask_io import InputFolderError, NothingWrittenError, prediction_files, read_grey_png, size_text
from stas_pipeline.core.problems import Problems

STAGE = "ensemble"
METHODS = ("vote", "mean")
GRADING_METHODS = ("mean", "label-average", "scaled-average")
TIES = ("background", "foreground")
MEMBER_SUFFIXES = (".png", ".npy")


# --- core: arrays of any shape ----------------------------------------------------------------------------


def _check_weights(weights: Sequence[float] | None, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{len(w)} weights for {n} members")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all 0, got {list(weights)}")
    return w


def _check_shapes(arrays: Sequence[np.ndarray]) -> None:
    if not arrays:
        raise ValueError("no members to ensemble")
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"members differ in shape: {sorted(shapes)}")


def vote(
    masks: Sequence[np.ndarray], weights: Sequence[float] | None = None, tie: str = "background"
) -> np.ndarray:
    """Strict (weighted) majority of binary masks of any one shape; nonzero counts as foreground.

    A pixel is foreground where the members voting for it hold more than half of the total weight (one vote
    each without ``weights``); an exact tie is ``tie``: ``"background"`` or ``"foreground"``. Weighted ties
    are found within a relative 1e-9 of the total, so that weights like 0.1 + 0.2 vs 0.3 still tie.
    """
    if tie not in TIES:
        raise ValueError(f"tie must be one of {TIES}, got {tie!r}")
    _check_shapes(masks)
    w = _check_weights(weights, len(masks))
    if w is None:  # integer arithmetic: exact
        votes = np.zeros(np.shape(masks[0]), dtype=np.int32)
        for mask in masks:
            votes += np.asarray(mask).astype(bool)
        margin, tolerance = 2 * votes - len(masks), 0.0
    else:
        votes = np.zeros(np.shape(masks[0]), dtype=np.float64)
        for mask, wi in zip(masks, w, strict=True):
            votes += wi * np.asarray(mask).astype(bool)
        margin, tolerance = 2 * votes - w.sum(), 1e-9 * w.sum()
    if tie == "foreground":
        return margin >= -tolerance
    return margin > tolerance


def mean_probability(probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """(Weighted) mean of probability arrays of any one shape, as float32."""
    _check_shapes(probs)
    w = _check_weights(weights, len(probs))
    w = np.ones(len(probs)) if w is None else w
    total = np.zeros(np.shape(probs[0]), dtype=np.float64)
    for p, wi in zip(probs, w, strict=True):
        total += wi * np.asarray(p, dtype=np.float64)
    return (total / w.sum()).astype(np.float32)


# --- the stage ----------------------------------------------------------------------------------------------


def _read_member(path: Path, problems: Problems) -> tuple[np.ndarray, float]:
    """A member's values and the value that stands for probability 1 (255 for PNG, 1 for .npy)."""
    if path.suffix.lower() == ".png":
        return read_grey_png(path, problems), 255.0
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D (height, width) probability array, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise ValueError(f"expected probabilities, got dtype {array.dtype}")
    if array.size and not (np.all(np.isfinite(array)) and array.min() >= 0 and array.max() <= 1):
        raise ValueError("expected probabilities in [0, 1]; found values outside (or NaN/inf)")
    return array, 1.0


def _members_of(stem: str, files: list[dict[str, list[Path]]], members: Sequence[Path]) -> list[Path]:
    """The file of ``stem`` in each member folder; raises ``ValueError`` naming the folders that lack it."""
    missing = [str(m) for m, f in zip(members, files, strict=True) if stem not in f]
    if missing:
        raise ValueError(f"missing in {len(missing)} of {len(members)} member folders: {', '.join(missing)}")
    ambiguous = [p for f in files for p in f[stem] if len(f[stem]) > 1]
    if ambiguous:
        raise ValueError(
            f"more than one file for this image in a member folder: {', '.join(map(str, ambiguous))}"
        )
    return [f[stem][0] for f in files]


def _ensemble_image(
    paths: list[Path],
    problems: Problems,
    method: str,
    weights: Sequence[float] | None,
    tie: str,
    binarize_threshold: float,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one image's members; return the binary mask and, for ``mean``, the mean probability."""
    values = []
    for path in paths:
        try:
            values.append(_read_member(path, problems))
        except (OSError, EOFError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"member {path}: cannot use it: {e}") from None
    shapes = [v.shape for v, _ in values]
    if len(set(shapes)) > 1:
        sizes = ", ".join(f"{p.parent} {size_text(s)}" for p, s in zip(paths, shapes, strict=True))
        raise ValueError(f"members differ in size (width x height): {sizes}")
    if method == "vote":
        return vote([v > binarize_threshold * scale for v, scale in values], weights, tie), None
    for path, (v, scale) in zip(paths, values, strict=True):
        if scale == 255 and v.max() == 1:
            problems.warn(path, "only values 0 and 1: read as p * 255 this is p < 0.004; save masks as 0/255")
    prob = mean_probability([v / np.float32(scale) for v, scale in values], weights)
    return prob > threshold, prob


def ensemble_folders(
    members: Sequence[str | Path],
    out: str | Path,
    method: str = "vote",
    weights: Sequence[float] | None = None,
    tie: str = "background",
    binarize_threshold: float = 0.0,
    threshold: float = 0.5,
    save_probs: str | Path | None = None,
    overwrite: bool = False,
) -> Problems:
    """Ensemble every image found in any member folder into ``out/<stem>.png`` (0/255), streaming.

    An image missing from some member folders, with members of different sizes or unreadable members is
    reported and skipped. ``save_probs`` (``mean`` only) receives the mean probability as uint8 PNG (p * 255).
    Both folders are written atomically (see :func:`atomic_folder`). Raises :class:`InputFolderError` for
    unusable folders or options, :class:`OutputExistsError` for an existing non-empty output without
    ``overwrite`` and :class:`NothingWrittenError` when every image was skipped.
    """
    members = [Path(m) for m in members]
    out = Path(out)
    save_probs = None if save_probs is None else Path(save_probs)
    if method not in METHODS:
        raise InputFolderError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    if save_probs is not None and method != "mean":
        raise InputFolderError("--save-probs needs --method mean")
    if save_probs is not None and save_probs.resolve() == out.resolve():
        raise InputFolderError(f"{out}: the probability folder must differ from the output folder")
    if len({m.resolve() for m in members}) < len(members):
        raise InputFolderError("a member folder is given twice; use --weights to count a member more")
    try:
        _check_weights(weights, len(members))
    except ValueError as e:
        raise InputFolderError(str(e)) from None
    files = [prediction_files(m, MEMBER_SUFFIXES) for m in members]
    stems = sorted(set().union(*files))
    if not stems:
        raise InputFolderError(f"no {' or '.join(MEMBER_SUFFIXES)} files in the member folders")

    problems = Problems(STAGE)
    problems.count("written", 0)
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_folder(out, overwrite))
        probs_tmp = None if save_probs is None else stack.enter_context(atomic_folder(save_probs, overwrite))
        for stem in tqdm(stems, desc=STAGE, unit="image", file=sys.stderr):
            try:
                mask, prob = _ensemble_image(
                    _members_of(stem, files, members),
                    problems,
                    method,
                    weights,
                    tie,
                    binarize_threshold,
                    threshold,
                )
            except ValueError as e:
                with tqdm.external_write_mode(file=sys.stderr):
                    problems.skip(f"{stem}.png", str(e))
                continue
            if probs_tmp is not None:
                write_png(probs_tmp / f"{stem}.png", np.round(prob * 255).astype(np.uint8))
            write_png(tmp / f"{stem}.png", mask.astype(np.uint8) * 255)
            problems.count("written")
        if not problems.counts["written"]:
            raise NothingWrittenError(
                f"{out}: every image was skipped; nothing written, the folder left as it was"
            )
    return problems


# --- image-level members: prediction CSVs ------------------------------------------------------------------


def is_csv_member(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".csv"


def csv_member_names(paths: Sequence[str | Path]) -> list[str]:
    """One column name per CSV: its stem, or its last folders and stem (``r0/test``) where stems repeat."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(Path(p).with_suffix("")) for p in paths]


def ensemble_csvs(
    members: Sequence[str | Path],
    out: str | Path,
    method: str = "mean",
    weights: Sequence[float] | None = None,
    tie: str = "background",
    threshold: float = 0.5,
    overwrite: bool = False,
    member_cuts: Sequence[str | Path] | None = None,
) -> Problems:
    """Ensemble image-level prediction CSVs into the CSV ``out`` (see the module doc), joined on ``image``.

    Raises :class:`InputFolderError` for unusable options or member CSVs, :class:`OutputExistsError` for an
    existing ``out`` without ``overwrite`` and :class:`NothingWrittenError` when every image was skipped.
    """
    from stas_pipeline.tasks.classification.scores_csv import PredictionsError, read_predictions_csv, write_scores_csv
    from stas_pipeline.tasks.grading.evaluation import is_grading_csv

    members, out = [Path(m) for m in members], Path(out)
    grading = {is_grading_csv(m) for m in members}
    if len(grading) > 1:
        raise InputFolderError("members mix grading CSVs (image,score,grade,...) and probability CSVs")
    grading = grading.pop()
    known = GRADING_METHODS if grading else METHODS
    if method not in known:
        raise InputFolderError(f"unknown method {method!r} for {'grading' if grading else 'probability'} CSVs "
                               f"(known: {', '.join(known)})")
    if grading and weights is not None:
        raise InputFolderError("--weights: not for grading CSVs")
    if member_cuts is not None and (not grading or len(member_cuts) != len(members)):
        raise InputFolderError("--member-cuts: one cut_points.json per grading member CSV")
    if not is_csv_member(out):
        raise InputFolderError(f"{out}: the output of CSV members is a .csv file")
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    if len({m.resolve() for m in members}) < len(members):
        raise InputFolderError("a member CSV is given twice; use --weights to count a member more")
    try:
        _check_weights(weights, len(members))
    except ValueError as e:
        raise InputFolderError(str(e)) from None

    problems = Problems(STAGE)
    tables = []
    for member in members:
        try:
            tables.append(read_predictions_csv(member, problems, "score" if grading else "prob")[1])
        except PredictionsError as e:
            raise InputFolderError(str(e)) from None
    names = csv_member_names(members)
    images = list(dict.fromkeys(key for table in tables for key in table))
    kept = []
    for image in images:
        missing = [str(m) for m, table in zip(members, tables, strict=True) if image not in table]
        if missing:
            problems.skip(image, f"missing from {len(missing)} of {len(members)} member CSVs: {', '.join(missing)}")
        else:
            kept.append(image)
    if not kept:
        raise NothingWrittenError(f"{out}: no image is in every member CSV; nothing written")
    probs = [np.array([table[image].prob for image in kept]) for table in tables]
    if grading:
        rows = _grading_rows(kept, dict(zip(names, probs, strict=True)), method, member_cuts)
        write_scores_csv(out, rows, names, overwrite, columns=("score", "grade"))
        problems.count("written", len(rows))
        return problems
    if method == "vote":
        result = vote([p >= threshold for p in probs], weights, tie).astype(np.float64)
    else:
        result = mean_probability(probs, weights)
    rows = [
        {"image": image, "prob": float(result[i]), **{n: float(p[i]) for n, p in zip(names, probs, strict=True)}}
        for i, image in enumerate(kept)
    ]
    write_scores_csv(out, rows, names, overwrite)
    problems.count("written", len(rows))
    return problems


def _grading_rows(images: Sequence[str], scores: dict[str, np.ndarray], method: str,
                  member_cuts: Sequence[str | Path] | None) -> list[dict]:
    """The rows of a grading ensemble: image, score, grade and each member's score."""
    import json

    from stas_pipeline.tasks.grading.ensembles import label_average, mean_of_scores, scaled_average

    cuts = None
    if member_cuts is not None:
        try:
            cuts = {name: json.loads(Path(f).read_text())["cuts"] for name, f in zip(scores, member_cuts, strict=True)}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputFolderError(f"--member-cuts: not a cut_points.json of stas evaluate: {e}") from None
    try:
        if method == "mean":
            score, grade = mean_of_scores(scores)
        else:
            score, grade = (label_average if method == "label-average" else scaled_average)(scores, cuts)
    except ValueError as e:
        raise InputFolderError(str(e)) from None
    return [{"image": image, "score": float(score[i]), "grade": int(grade[i]),
             **{n: float(v[i]) for n, v in scores.items()}} for i, image in enumerate(images)]


# --- command line -----------------------------------------------------------------------------------------


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Combine the predictions of several models/folds, image by image: strict majority vote "
        "of binarised masks, or mean of probabilities. Members are folders of <stem>.png (grey level = "
        "p * 255) or <stem>.npy (probabilities in [0, 1]); writes --out/<stem>.png, mode L, 0/255, "
        "atomically. Image-level members are prediction CSVs (image,prob,<member>...), joined on image; "
        "writes the CSV --out (image,prob,<one column per input CSV>), atomically. Members are all folders "
        "or all .csv files.",
    )
    parser.add_argument(
        "members", nargs="+", type=Path, help="prediction folders, or prediction CSVs, one per model/fold"
    )
    parser.add_argument(
        "--out", type=Path, required=True,
        help="output folder (written only when complete), or output .csv for CSV members",
    )
    parser.add_argument(
        "--method", choices=list(dict.fromkeys(METHODS + GRADING_METHODS)), default=None,
        help="vote or mean (default: vote for folders, mean for CSVs); grading CSVs: mean, label-average or "
        "scaled-average",
    )
    parser.add_argument(
        "--member-cuts", nargs="+", type=Path, metavar="JSON",
        help="grading CSVs: one cut_points.json (from stas evaluate on that member's out-of-fold predictions) per "
        "member, in member order, for label-average and scaled-average (default: 0.5/1.5/2.5/3.5 for each)",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one weight per member: a weighted vote (strict majority of the total weight) or weighted mean",
    )
    parser.add_argument(
        "--tie",
        choices=TIES,
        default="background",
        help="vote: the answer where exactly half of the (weighted) votes say foreground, which can happen "
        "only with an even number of members or with weights (default: background)",
    )
    parser.add_argument(
        "--binarize-threshold",
        type=probability_threshold,
        default=None,
        metavar="T",
        help="folders, vote: a member pixel is foreground where its probability (PNG value / 255, .npy value) "
        "is > T (default: 0, i.e. any PNG value > 0)",
    )
    parser.add_argument(
        "--threshold",
        type=probability_threshold,
        default=None,
        metavar="T",
        help="folders, mean: foreground where the mean probability is > T; CSVs, vote: a member votes positive "
        "where its prob >= T (default: 0.5)",
    )
    parser.add_argument(
        "--save-probs",
        type=Path,
        metavar="DIR",
        help="folders, mean: also write the mean probability as PNG (p * 255)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out (and --save-probs)"
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the stage; 0 when every image was ensembled, 1 when any was skipped, 2 for unusable input."""
    args = build_parser(prog).parse_args(argv)
    csv_members = [is_csv_member(m) for m in args.members]
    threshold = 0.5 if args.threshold is None else args.threshold
    try:
        if any(csv_members) and not all(csv_members):
            raise InputFolderError("members mix .csv files and folders; ensemble either prediction CSVs or folders")
        if all(csv_members):
            given = [o for o, v in (("--binarize-threshold", args.binarize_threshold),
                                    ("--save-probs", args.save_probs)) if v is not None]
            if given:
                raise InputFolderError(f"{', '.join(given)}: for folder members only; CSV members are binarised "
                                       "by --threshold")
            problems = ensemble_csvs(
                args.members,
                args.out,
                method=args.method or "mean",
                weights=args.weights,
                tie=args.tie,
                threshold=threshold,
                overwrite=args.overwrite,
                member_cuts=args.member_cuts,
            )
        else:
            problems = ensemble_folders(
                args.members,
                args.out,
                method=args.method or "vote",
                weights=args.weights,
                tie=args.tie,
                binarize_threshold=0.0 if args.binarize_threshold is None else args.binarize_threshold,
                threshold=threshold,
                save_probs=args.save_probs,
                overwrite=args.overwrite,
            )
    except NothingWrittenError as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 1
    except (InputFolderError, OutputExistsError) as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 2
    return problems.finish()


if __name__ == "__main__":
    sys.exit(main())
