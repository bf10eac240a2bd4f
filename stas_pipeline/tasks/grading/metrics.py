"""Grades from continuous scores and their agreement with the true grades: cut points, quadratic weighted kappa,
the confusion matrix and its figure.

A score becomes a grade by its cut points: the grade is the number of cut points **at or below** the score
(``np.searchsorted(cuts, score, side="right")``), so a score exactly on a cut goes up: with the default cuts
``[0.5, 1.5, 2.5, 3.5]``, 0.5 is grade 1 and 3.5 is grade 4.

Quadratic weighted kappa: ``1 - sum(W * O) / sum(W * E)`` with ``O`` the confusion counts, ``E`` the counts
expected by chance (outer product of the true and the predicted grade counts, over n) and ``W[i, j] = (i - j)**2``
(the textbook ``(i - j)**2 / (n_grades - 1)**2`` differs by a constant factor that cancels). It equals
``sklearn.metrics.cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=range(n_grades))``; without
``labels`` scikit-learn numbers only the grades present, which changes the weights when a grade is absent from both.
**Undefined case**: when the expected disagreement is 0 (every true and predicted grade is one and the same grade)
the kappa is 0 / 0; :func:`quadratic_kappa` returns ``nan`` there, as scikit-learn does, and :func:`grading_scores`
reports ``None`` (JSON has no nan).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from stas_pipeline.core.fileio import atomic_path

DEFAULT_CUTS = (0.5, 1.5, 2.5, 3.5)
N_GRADES = 5
CUT_RULE = "grade = number of cuts <= score (a score on a cut goes up)"


def check_cuts(cuts: ArrayLike) -> np.ndarray:
    """``cuts`` as a float array; ``ValueError`` unless they are one or more finite, strictly increasing numbers."""
    c = np.asarray(cuts, dtype=np.float64)
    if c.ndim != 1 or not len(c) or not np.isfinite(c).all() or np.any(np.diff(c) <= 0):
        raise ValueError(f"cuts must be finite and strictly increasing, got {np.asarray(cuts).tolist()}")
    return c


def check_scores(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    """``scores`` as a 1-D float array; ``ValueError`` unless 1-D and finite."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} must be finite, got {s[~np.isfinite(s)][:3].tolist()}")
    return s


def check_grades(grades: ArrayLike, n_grades: int = N_GRADES, name: str = "grades") -> np.ndarray:
    """``grades`` as a 1-D int array; ``ValueError`` unless each is a whole number in ``0 .. n_grades - 1``."""
    g = check_scores(grades, name)
    bad = g[(g != np.round(g)) | (g < 0) | (g >= n_grades)]
    if len(bad):
        raise ValueError(f"{name} must be whole numbers 0..{n_grades - 1}, got {bad[:5].tolist()}")
    return g.astype(np.int64)


def check_same_length(**arrays: np.ndarray) -> None:
    """``ValueError`` naming the lengths unless all ``arrays`` have one length."""
    if len({len(a) for a in arrays.values()}) > 1:
        lengths = ", ".join(f"{name} {len(a)}" for name, a in arrays.items())
        raise ValueError(f"length mismatch: {lengths}")


def cut(scores: ArrayLike, cuts: Sequence[float] = DEFAULT_CUTS) -> np.ndarray:
    """Grades (int64) of ``scores``: the number of ``cuts`` at or below each score (a score on a cut goes up)."""
    return np.searchsorted(check_cuts(cuts), check_scores(scores), side="right").astype(np.int64)


def grade_of(score: float) -> int:
    """The grade of one score at :data:`DEFAULT_CUTS`."""
    return int(cut([score])[0])


def _pair(y_true: ArrayLike, y_pred: ArrayLike, n_grades: int) -> tuple[np.ndarray, np.ndarray]:
    if n_grades < 2:
        raise ValueError(f"n_grades must be at least 2, got {n_grades}")
    t, p = check_grades(y_true, n_grades, "y_true"), check_grades(y_pred, n_grades, "y_pred")
    check_same_length(y_true=t, y_pred=p)
    if not len(t):
        raise ValueError("no grades to compare")
    return t, p


def _confusion(t: np.ndarray, p: np.ndarray, n_grades: int) -> np.ndarray:
    return np.bincount(t * n_grades + p, minlength=n_grades * n_grades).reshape(n_grades, n_grades)


def kappa_from_confusion(counts: np.ndarray) -> float:
    """Quadratic weighted kappa of a square matrix of integer confusion counts (``nan`` when the expected
    disagreement is 0)."""
    n_grades, n = len(counts), int(counts.sum())
    weights = (np.arange(n_grades)[:, None] - np.arange(n_grades)[None, :]) ** 2
    expected = np.outer(counts.sum(axis=1), counts.sum(axis=0))  # n times the chance counts: integers
    disagreement = int((weights * expected).sum())
    if disagreement == 0:
        return float("nan")
    return 1.0 - int((weights * counts).sum()) * n / disagreement


def confusion(y_true: ArrayLike, y_pred: ArrayLike, n_grades: int = N_GRADES) -> np.ndarray:
    """Confusion counts (n_grades, n_grades), int64: rows the true grade, columns the predicted one."""
    return _confusion(*_pair(y_true, y_pred, n_grades), n_grades)


def quadratic_kappa(y_true: ArrayLike, y_pred: ArrayLike, n_grades: int = N_GRADES) -> float:
    """Quadratic weighted Cohen kappa of two gradings (module doc); ``nan`` when every grade is one and the same."""
    return kappa_from_confusion(confusion(y_true, y_pred, n_grades))


def grading_scores(y_true: ArrayLike, scores: ArrayLike, cuts: Sequence[float] = DEFAULT_CUTS) -> dict:
    """Kappa (``None`` where undefined), accuracy, confusion (list of lists), ``n`` and the true and predicted
    counts per grade of ``scores`` cut at ``cuts`` (``len(cuts) + 1`` grades) against the grades ``y_true``."""
    s = check_scores(scores)
    n_grades = len(check_cuts(cuts)) + 1
    t = check_grades(y_true, n_grades, "y_true")
    check_same_length(y_true=t, scores=s)
    counts = confusion(t, cut(s, cuts), n_grades)
    kappa = kappa_from_confusion(counts)
    return {
        "kappa": None if np.isnan(kappa) else kappa,
        "accuracy": float(np.trace(counts) / len(t)),
        "confusion": counts.tolist(),
        "n": len(t),
        "true_counts": counts.sum(axis=1).tolist(),
        "predicted_counts": counts.sum(axis=0).tolist(),
        "cuts": [float(c) for c in cuts],
        "cut_rule": CUT_RULE,
    }


def plot_confusion(path: str | Path, counts: ArrayLike, title: str, overwrite: bool = False) -> None:
    """The confusion matrix (rows true, columns predicted) as a PNG with the count in each cell, written atomically
    (an existing ``path`` raises ``OutputExistsError`` unless ``overwrite``)."""
    from matplotlib.figure import Figure  # a Figure without pyplot renders with Agg and touches no global backend

    c = np.asarray(counts)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"the confusion matrix must be square, got shape {c.shape}")
    fig = Figure(figsize=(1.2 + 0.8 * len(c), 1.0 + 0.8 * len(c)), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(c, cmap="Blues", vmin=0)
    for (i, j), value in np.ndenumerate(c):
        ax.text(j, i, f"{value:g}", ha="center", va="center", color="white" if value > c.max() / 2 else "black")
    ax.set(xticks=range(len(c)), yticks=range(len(c)), xlabel="predicted grade", ylabel="true grade", title=title)
    fig.tight_layout()
    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, format="png")
