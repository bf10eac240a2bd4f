"""Cut points searched for the best quadratic kappa, and the guard that adopts them only when they win on held-out
folds.

The kappa of ``cut(scores, c)`` is piecewise constant in ``c``, so :func:`search_cuts` runs Nelder-Mead from
explicit initial simplexes (each cut moved by :data:`SIMPLEX_STEPS` in turn), every run starting from the best cuts
so far; cuts that are not strictly increasing score worse than any kappa. No randomness: the same inputs give
the same cuts.

Searched cuts fit the scores they were searched on, so their in-sample kappa always looks at least as good as the
defaults'. :func:`guarded_search` fits them fold by fold on the other folds and keeps the defaults unless the
searched cuts win on average on the held-out folds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize

from stas_pipeline.tasks.grading.metrics import (
    DEFAULT_CUTS,
    _confusion,
    check_cuts,
    check_grades,
    check_same_length,
    check_scores,
    cut,
    kappa_from_confusion,
    quadratic_kappa,
)

SIMPLEX_STEPS = (0.5, 0.25, 0.1, 0.05)  # one Nelder-Mead run per step, each from the best cuts so far


def _objective(scores: np.ndarray, grades: np.ndarray, n_grades: int) -> Callable[[np.ndarray], float]:
    """Minus the kappa of ``cut(scores, c)``; infinite for cuts not strictly increasing. ``grades`` must hold two
    distinct grades or more (the kappa is then defined)."""

    def minus_kappa(c: np.ndarray) -> float:
        if np.any(np.diff(c) <= 0):
            return np.inf
        return -kappa_from_confusion(_confusion(grades, cut(scores, c), n_grades))

    return minus_kappa


def search_cuts(scores: ArrayLike, grades: ArrayLike, init: Sequence[float] = DEFAULT_CUTS) -> tuple[float, ...]:
    """The cut points (as many as ``init``, strictly increasing) that maximise the quadratic kappa of
    ``cut(scores, cuts)`` against ``grades``, searched from ``init``; ``init`` itself unless something beats it.

    Raises ``ValueError`` for bad cuts, scores or grades, a length mismatch, or fewer than two distinct grades
    (nothing to fit).
    """
    best = check_cuts(init)
    s = check_scores(scores)
    n_grades = len(best) + 1
    g = check_grades(grades, n_grades)
    check_same_length(scores=s, grades=g)
    if len(np.unique(g)) < 2:
        raise ValueError(f"cut points need at least two distinct grades to fit, got {np.unique(g).tolist()}")
    objective = _objective(s, g, n_grades)
    best_value = objective(best)
    for step in SIMPLEX_STEPS:
        simplex = np.vstack([best, best + step * np.eye(len(best))])
        result = minimize(objective, best, method="Nelder-Mead", options={"initial_simplex": simplex})
        if result.fun < best_value:
            best, best_value = result.x, result.fun
    return tuple(float(c) for c in best)


def guarded_search(
    scores: ArrayLike, grades: ArrayLike, folds: ArrayLike, defaults: Sequence[float] = DEFAULT_CUTS
) -> dict:
    """Searched cut points, adopted only when they beat ``defaults`` on held-out folds.

    ``folds`` gives each score's fold (integers, at least two distinct). For each fold k, cuts are searched on the
    other folds and both them and ``defaults`` are scored (quadratic kappa) on fold k; the cuts searched on all
    scores are adopted when the mean held-out kappa of the searched cuts is higher than the defaults'. A fold
    whose kappa is undefined for either (one grade only, predicted as such) has ``None`` there and is left out of
    both means. Returns::

        {"default_cuts", "searched_cuts", "adopted", "cuts" (the ones to use),
         "held_out": [{"fold", "n", "cuts" (searched on the other folds), "default_kappa", "searched_kappa"}...],
         "mean_default_kappa", "mean_searched_kappa",
         "oof_kappa_default", "oof_kappa_searched" (on all scores: in-sample for the searched cuts)}

    Raises ``ValueError`` for bad inputs, fewer than two folds, other folds with a single grade, or no fold with a
    defined kappa.
    """
    defaults = tuple(float(c) for c in check_cuts(defaults))
    s = check_scores(scores)
    g = check_grades(grades, len(defaults) + 1)
    f = check_scores(folds, "folds")
    if np.any(f != np.round(f)):
        raise ValueError(f"folds must be whole numbers, got {f[f != np.round(f)][:5].tolist()}")
    check_same_length(scores=s, grades=g, folds=f)
    fold_ids = np.unique(f)
    if len(fold_ids) < 2:
        raise ValueError(f"the guard needs at least two folds, got {fold_ids.tolist()}")
    n_grades = len(defaults) + 1
    held_out = []
    for k in fold_ids:
        train, test = f != k, f == k
        fitted = search_cuts(s[train], g[train], defaults)
        kappas = [quadratic_kappa(g[test], cut(s[test], c), n_grades) for c in (defaults, fitted)]
        held_out.append({"fold": int(k), "n": int(test.sum()), "cuts": list(fitted),
                         "default_kappa": None if np.isnan(kappas[0]) else kappas[0],
                         "searched_kappa": None if np.isnan(kappas[1]) else kappas[1]})
    scored = [h for h in held_out if h["default_kappa"] is not None and h["searched_kappa"] is not None]
    if not scored:
        raise ValueError("no held-out fold has a defined kappa (each holds one grade only)")
    mean_default = float(np.mean([h["default_kappa"] for h in scored]))
    mean_searched = float(np.mean([h["searched_kappa"] for h in scored]))
    searched = search_cuts(s, g, defaults)
    adopted = mean_searched > mean_default
    return {
        "default_cuts": list(defaults),
        "searched_cuts": list(searched),
        "adopted": bool(adopted),
        "cuts": list(searched if adopted else defaults),
        "held_out": held_out,
        "mean_default_kappa": mean_default,
        "mean_searched_kappa": mean_searched,
        "oof_kappa_default": quadratic_kappa(g, cut(s, defaults), n_grades),
        "oof_kappa_searched": quadratic_kappa(g, cut(s, searched), n_grades),
    }
