"""Image-level ensembles: prediction CSVs joined on ``image``.

``stas ensemble A.csv B.csv ... --out C.csv`` joins prediction CSVs (``image,prob,<member>...`` as ``stas predict``
writes them) on ``image`` and writes ``C.csv`` as ``image,prob,<A>,<B>...``: one column per input CSV, named after
its stem (with parent folders added where two stems are equal), holding that CSV's ``prob``. ``prob`` is

- ``--method mean`` (the default for CSVs): the (weighted) mean of the members' ``prob``;
- ``--method vote``: 1.0 or 0.0, the strict (weighted) majority of the members binarised with
  ``prob >= --threshold`` (default 0.5, the rule of ``stas evaluate``), exact ties to ``--tie``. A 0/1 column
  ranks images poorly: use ``mean`` where an AUC is to be measured.

Grading CSVs are joined the same way (``tasks/grading/ensembles.py``). An image missing from some members (or
whose row there is unusable) is reported as ``ERROR <image>: missing from <files>`` and left out (exit 1).
``C.csv`` is written atomically and an existing one is kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stas_pipeline.core.errors import NothingWrittenError
from stas_pipeline.core.fileio import OutputExistsError
from stas_pipeline.core.images import InputFolderError, has_suffix
from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.classification.scores_csv import PredictionsError, read_predictions_csv, write_scores_csv
from stas_pipeline.tasks.segmentation.ensemble import METHODS, STAGE, check_weights, mean_probability, vote


def csv_member_names(paths: Sequence[str | Path]) -> list[str]:
    """One column name per CSV: its stem, or its last folders and stem (``r0/test``) where stems repeat."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(Path(p).with_suffix("")) for p in paths]


def join_member_csvs(members: Sequence[Path], out: Path, column: str, weights: Sequence[float] | None,
                     overwrite: bool, problems: Problems) -> tuple[list[str], list[str], list[np.ndarray]]:
    """The member column names, the images in every member CSV (first-seen order) and each member's ``column``
    values for them; the images missing from some members are reported to ``problems``.

    Raises :class:`InputFolderError` for an output that is no ``.csv``, a member given twice, bad weights or an
    unusable member CSV, :class:`OutputExistsError` for an existing ``out`` without ``overwrite`` and
    :class:`NothingWrittenError` when no image is in every member.
    """
    if not has_suffix(out, (".csv",)):
        raise InputFolderError(f"{out}: the output of CSV members is a .csv file")
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    if len({m.resolve() for m in members}) < len(members):
        raise InputFolderError("a member CSV is given twice; use --weights to count a member more")
    try:
        check_weights(weights, len(members))
    except ValueError as e:
        raise InputFolderError(str(e)) from None
    tables = []
    for member in members:
        try:
            tables.append(read_predictions_csv(member, problems, column)[1])
        except PredictionsError as e:
            raise InputFolderError(str(e)) from None
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
    return csv_member_names(members), kept, [np.array([table[image].prob for image in kept]) for table in tables]


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
    """Ensemble probability CSVs into the CSV ``out`` (see the module doc), joined on ``image``.

    Raises :class:`InputFolderError` for unusable options or member CSVs (``member_cuts`` are for grading CSVs),
    :class:`OutputExistsError` for an existing ``out`` without ``overwrite`` and :class:`NothingWrittenError`
    when every image was skipped.
    """
    if method not in METHODS:
        raise InputFolderError(f"unknown method {method!r} for probability CSVs (known: {', '.join(METHODS)})")
    if member_cuts is not None:
        raise InputFolderError("--member-cuts: one cut_points.json per grading member CSV")
    problems = Problems(STAGE)
    names, kept, probs = join_member_csvs([Path(m) for m in members], Path(out), "prob", weights, overwrite,
                                          problems)
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


def refuse_folder_options(args: argparse.Namespace) -> None:
    """InputFolderError naming the ``stas ensemble`` options given that only folder members take."""
    given = [o for o, v in (("--binarize-threshold", args.binarize_threshold), ("--save-probs", args.save_probs))
             if v is not None]
    if given:
        raise InputFolderError(f"{', '.join(given)}: for folder members only; CSV members are binarised by "
                               "--threshold")


def ensemble_command(args: argparse.Namespace) -> Problems:
    """``stas ensemble`` of probability CSVs: :func:`ensemble_csvs` with the command's options and defaults."""
    refuse_folder_options(args)
    return ensemble_csvs(
        args.members,
        args.out,
        method=args.method or "mean",
        weights=args.weights,
        tie=args.tie,
        threshold=0.5 if args.threshold is None else args.threshold,
        overwrite=args.overwrite,
        member_cuts=args.member_cuts,
    )
