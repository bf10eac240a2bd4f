"""Three ways to combine graders that score the same images on the grade scale.

``members`` maps a member's name to its continuous scores (one per image, all in one order); ``member_cuts``
maps a name to that member's own cut points (a member left out uses :data:`DEFAULT_CUTS`). Each function returns
``(score, grade)``: a continuous ensemble score per image and its grade.

- :func:`mean_of_scores`: mean score, cut at ``cuts``.
- :func:`label_average` (the recipe's final ensemble): each member's grade by its own cuts, averaged; the grade is
  that mean rounded half up (2.5 -> 3); the score is the mean grade.
- :func:`scaled_average`: each member's score mapped piecewise-linearly onto the common scale, its cut ``c[k]``
  going to ``DEFAULT_CUTS[k]`` (slope 1 below the first cut and above the last), averaged and cut at
  ``DEFAULT_CUTS``. With default cuts the mapping is the identity and this is :func:`mean_of_scores`.

``stas ensemble A.csv B.csv ... --out C.csv`` on grading CSVs (``image,score,grade,<member>...``) joins them on
``image`` as for probability CSVs (``tasks/classification/ensemble.py``) into ``image,score,grade,<A>,<B>...`` with
``--method mean`` (the default), ``label-average`` or ``scaled-average``; a member's cut points come from
``--member-cuts``, one ``cut_points.json`` of ``stas evaluate`` per member (default: [0.5, 1.5, 2.5, 3.5]).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from stas_pipeline.core.images import InputFolderError
from stas_pipeline.core.problems import Problems
from stas_pipeline.tasks.classification.ensemble import STAGE, join_member_csvs, refuse_folder_options
from stas_pipeline.tasks.classification.scores_csv import write_scores_csv
from stas_pipeline.tasks.grading.metrics import DEFAULT_CUTS, check_cuts, check_same_length, check_scores, cut

GRADING_METHODS = ("mean", "label-average", "scaled-average")


def _stack(members: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    """The members' scores as 1-D float arrays of one length; ``ValueError`` for none, bad scores, or a mismatch."""
    if not members:
        raise ValueError("no ensemble members")
    scores = {name: check_scores(values, f"scores of {name!r}") for name, values in members.items()}
    check_same_length(**scores)
    return scores


def _cuts_of(
    members: Mapping[str, np.ndarray], member_cuts: Mapping[str, Sequence[float]] | None
) -> dict[str, np.ndarray]:
    """Each member's cut points (checked), :data:`DEFAULT_CUTS` where not given; ``ValueError`` for cuts of an
    unknown member or cuts other than ``len(DEFAULT_CUTS)`` numbers."""
    member_cuts = member_cuts or {}
    unknown = sorted(set(member_cuts) - set(members))
    if unknown:
        raise ValueError(f"cut points given for unknown members {unknown}; members: {sorted(members)}")
    out = {}
    for name in members:
        c = check_cuts(member_cuts.get(name, DEFAULT_CUTS))
        if len(c) != len(DEFAULT_CUTS):
            raise ValueError(f"{name!r}: {len(DEFAULT_CUTS)} cut points expected, got {c.tolist()}")
        out[name] = c
    return out


def mean_of_scores(
    members: Mapping[str, ArrayLike], cuts: Sequence[float] = DEFAULT_CUTS
) -> tuple[np.ndarray, np.ndarray]:
    """The mean of the members' scores, and its grade at ``cuts``."""
    score = np.mean(list(_stack(members).values()), axis=0)
    return score, cut(score, cuts)


def label_average(
    members: Mapping[str, ArrayLike], member_cuts: Mapping[str, Sequence[float]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The mean of the members' grades (each cut at its own cuts) as the score, and that mean rounded half up."""
    scores = _stack(members)
    cuts = _cuts_of(scores, member_cuts)
    total = np.sum([cut(scores[name], cuts[name]) for name in scores], axis=0)
    n = len(scores)
    return total / n, (2 * total + n) // (2 * n)  # floor(total / n + 1/2) in integers: exact at the halves


def to_common_scale(scores: ArrayLike, cuts: Sequence[float]) -> np.ndarray:
    """``scores`` mapped piecewise-linearly so that ``cuts[k]`` goes to ``DEFAULT_CUTS[k]``, with slope 1 below
    the first cut and above the last."""
    s, c, d = check_scores(scores), check_cuts(cuts), np.asarray(DEFAULT_CUTS)
    if len(c) != len(d):
        raise ValueError(f"{len(d)} cut points expected, got {c.tolist()}")
    return np.where(s < c[0], d[0] + s - c[0], np.where(s > c[-1], d[-1] + s - c[-1], np.interp(s, c, d)))


def scaled_average(
    members: Mapping[str, ArrayLike], member_cuts: Mapping[str, Sequence[float]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The mean of the members' scores on the common scale (:func:`to_common_scale`), and its grade at
    ``DEFAULT_CUTS``."""
    scores = _stack(members)
    cuts = _cuts_of(scores, member_cuts)
    score = np.mean([to_common_scale(scores[name], cuts[name]) for name in scores], axis=0)
    return score, cut(score)


# --- stas ensemble of grading CSVs --------------------------------------------------------------------------------


def _grading_rows(images: Sequence[str], scores: dict[str, np.ndarray], method: str,
                  member_cuts: Sequence[str | Path] | None) -> list[dict]:
    """The rows of a grading ensemble: image, score, grade and each member's score."""
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


def ensemble_grading_csvs(members: Sequence[str | Path], out: str | Path, method: str = "mean",
                          overwrite: bool = False, member_cuts: Sequence[str | Path] | None = None,
                          weights: Sequence[float] | None = None) -> Problems:
    """Ensemble grading CSVs into the CSV ``out`` (see the module doc), joined on ``image``.

    Raises InputFolderError for unusable options (``weights`` are not for grading) or member CSVs,
    OutputExistsError for an existing ``out`` without ``overwrite`` and NothingWrittenError when every image
    was skipped.
    """
    if method not in GRADING_METHODS:
        raise InputFolderError(f"unknown method {method!r} for grading CSVs (known: {', '.join(GRADING_METHODS)})")
    if weights is not None:
        raise InputFolderError("--weights: not for grading CSVs")
    if member_cuts is not None and len(member_cuts) != len(members):
        raise InputFolderError("--member-cuts: one cut_points.json per grading member CSV")
    problems = Problems(STAGE)
    names, kept, scores = join_member_csvs([Path(m) for m in members], Path(out), "score", None, overwrite,
                                           problems)
    rows = _grading_rows(kept, dict(zip(names, scores, strict=True)), method, member_cuts)
    write_scores_csv(out, rows, names, overwrite, columns=("score", "grade"))
    problems.count("written", len(rows))
    return problems


def ensemble_command(args: argparse.Namespace) -> Problems:
    """``stas ensemble`` of grading CSVs: :func:`ensemble_grading_csvs` with the command's options."""
    refuse_folder_options(args)
    return ensemble_grading_csvs(args.members, args.out, method=args.method or "mean", overwrite=args.overwrite,
                                 member_cuts=args.member_cuts, weights=args.weights)
