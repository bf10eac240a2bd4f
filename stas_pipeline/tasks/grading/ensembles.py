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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from stas_pipeline.tasks.grading.metrics import DEFAULT_CUTS, check_cuts, check_same_length, check_scores, cut


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
