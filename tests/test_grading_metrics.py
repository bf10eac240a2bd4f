"""Tests of the grading task's numeric core: cut semantics, quadratic kappa against scikit-learn, the grading
scores and confusion figure, the searched cut points and their held-out guard, and the three ensembles."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import cohen_kappa_score

from stas_pipeline.core.fileio import OutputExistsError
from stas_pipeline.tasks.grading.cut_points import guarded_search, search_cuts
from stas_pipeline.tasks.grading.ensembles import label_average, mean_of_scores, scaled_average, to_common_scale
from stas_pipeline.tasks.grading.metrics import (
    DEFAULT_CUTS,
    N_GRADES,
    confusion,
    cut,
    grading_scores,
    plot_confusion,
    quadratic_kappa,
)


def sk_kappa(a, b) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns on the undefined case
        return cohen_kappa_score(a, b, weights="quadratic", labels=list(range(N_GRADES)))


def graded(shift: float, noise: float, n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grades, scores = grade + shift + normal noise, and 5 interleaved folds."""
    rng = np.random.default_rng(seed)
    grades = rng.integers(0, N_GRADES, n)
    return grades, grades + shift + rng.normal(0, noise, n), np.arange(n) % 5


# --- cut points and kappa ---------------------------------------------------------------------------------------


def test_cut_counts_the_cuts_at_or_below_the_score():
    scores = [-3.0, 0.49, 0.5, 0.51, 1.5, 2.0, 3.4999, 3.5, 9.0]
    assert cut(scores).tolist() == [0, 0, 1, 1, 2, 2, 3, 4, 4]
    assert cut(np.float32([0.5, 1.5])).tolist() == [1, 2]
    assert cut([0.0, 1.0, 2.0], (0.5,)).tolist() == [0, 1, 1]
    assert cut([], DEFAULT_CUTS).tolist() == []
    assert cut([1.0]).dtype == np.int64


@pytest.mark.parametrize("cuts", [(1.5, 0.5, 2.5, 3.5), (0.5, 1.5, 1.5, 3.5), (), (0.5, float("nan"))])
def test_cut_refuses_cuts_not_strictly_increasing(cuts):
    with pytest.raises(ValueError, match="cuts must be finite and strictly increasing, got"):
        cut([1.0], cuts)


def test_kappa_equals_scikit_learn_on_random_gradings():
    rng = np.random.default_rng(1)
    for n in (2, 7, 50, 500):
        for _ in range(20):
            a, b = rng.integers(0, N_GRADES, n), rng.integers(0, N_GRADES, n)
            b = np.where(rng.random(n) < 0.6, a, b)  # correlated, as real gradings are
            assert quadratic_kappa(a, b) == pytest.approx(sk_kappa(a, b), abs=1e-12, nan_ok=True)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([0, 1, 2, 3, 4, 2], [0, 1, 2, 3, 4, 2], 1.0),  # perfect agreement
        ([0, 1, 2, 3, 4], [2, 2, 2, 2, 2], 0.0),  # constant predictions
        ([3, 3, 3], [0, 1, 4], 0.0),  # constant truth
        ([0, 4], [4, 0], -1.0),  # reversed
        ([0, 0, 1, 4, 4, 3], [0, 1, 1, 4, 3, 4], None),  # grade 2 absent from both
        ([0, 1, 1, 4], [0, 2, 1, 3], None),  # grades absent from one side
    ],
)
def test_kappa_edge_cases_match_scikit_learn(a, b, expected):
    kappa = quadratic_kappa(a, b)
    assert kappa == pytest.approx(sk_kappa(a, b), abs=1e-12)
    if expected is not None:
        assert kappa == pytest.approx(expected, abs=1e-12)


def test_kappa_weighs_absent_grades_by_grade_distance():
    """scikit-learn without ``labels`` renumbers the grades present; the kappa here keeps the grade scale."""
    a, b = [0, 0, 1, 4, 4, 3], [0, 1, 1, 4, 3, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compacted = cohen_kappa_score(a, b, weights="quadratic")
    assert quadratic_kappa(a, b) == pytest.approx(sk_kappa(a, b))
    assert quadratic_kappa(a, b) != pytest.approx(compacted)


def test_kappa_is_nan_when_every_grade_is_the_same_as_in_scikit_learn():
    assert np.isnan(quadratic_kappa([2, 2, 2], [2, 2, 2]))
    assert np.isnan(sk_kappa([2, 2, 2], [2, 2, 2]))
    assert grading_scores([2, 2], [2.1, 1.9])["kappa"] is None


def test_kappa_with_other_numbers_of_grades():
    assert quadratic_kappa([0, 1, 2], [0, 2, 2], n_grades=3) == pytest.approx(
        cohen_kappa_score([0, 1, 2], [0, 2, 2], weights="quadratic", labels=[0, 1, 2]))
    with pytest.raises(ValueError, match=r"y_pred must be whole numbers 0\.\.2, got \[3\.0\]"):
        quadratic_kappa([0, 1, 2], [0, 1, 3], n_grades=3)


@pytest.mark.parametrize(
    "a, b, message",
    [
        ([0, 1, 2], [0, 1], "length mismatch: y_true 3, y_pred 2"),
        ([0, 1.5], [0, 1], r"y_true must be whole numbers 0\.\.4, got \[1\.5\]"),
        ([0, 5], [0, 1], r"y_true must be whole numbers 0\.\.4, got \[5\.0\]"),
        ([0, -1], [0, 1], r"y_true must be whole numbers 0\.\.4, got \[-1\.0\]"),
        ([[0, 1]], [[0, 1]], r"y_true must be 1-D, got shape \(1, 2\)"),
        ([], [], "no grades to compare"),
    ],
)
def test_kappa_refuses_bad_gradings(a, b, message):
    with pytest.raises(ValueError, match=message):
        quadratic_kappa(a, b)


def test_confusion_rows_are_true_columns_predicted():
    counts = confusion([0, 0, 1, 4], [0, 1, 1, 2])
    assert counts.shape == (5, 5)
    assert counts[0].tolist() == [1, 1, 0, 0, 0]
    assert counts[4].tolist() == [0, 0, 1, 0, 0]
    assert counts.sum() == 4


def test_grading_scores():
    out = grading_scores([0, 1, 2, 3, 4, 4], [0.1, 1.5, 1.4, 3.0, 3.6, 2.0])
    predicted = [0, 2, 1, 3, 4, 2]
    assert out["kappa"] == pytest.approx(sk_kappa([0, 1, 2, 3, 4, 4], predicted))
    assert out["accuracy"] == pytest.approx(3 / 6)
    assert out["confusion"] == confusion([0, 1, 2, 3, 4, 4], predicted).tolist()
    assert out["n"] == 6
    assert out["true_counts"] == [1, 1, 1, 1, 2]
    assert out["predicted_counts"] == [1, 1, 2, 1, 1]
    assert out["cuts"] == list(DEFAULT_CUTS)
    with pytest.raises(ValueError, match="length mismatch: y_true 2, scores 3"):
        grading_scores([0, 1], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="scores must be finite"):
        grading_scores([0, 1], [0.0, float("nan")])


def test_plot_confusion_writes_a_png(tmp_path):
    path = tmp_path / "figs" / "confusion.png"
    plot_confusion(path, confusion([0, 1, 2, 3, 4, 4], [0, 2, 1, 3, 4, 2]), "fold 0: kappa 0.8")
    assert path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100
    assert [p.name for p in path.parent.iterdir()] == ["confusion.png"]  # no temporary file left
    with pytest.raises(OutputExistsError):
        plot_confusion(path, np.zeros((5, 5), int), "again")
    plot_confusion(path, np.zeros((5, 5), int), "again", overwrite=True)
    with pytest.raises(ValueError, match="square"):
        plot_confusion(tmp_path / "x.png", np.zeros((2, 3)), "bad")


# --- searched cut points ----------------------------------------------------------------------------------------


def test_search_finds_shifted_boundaries():
    grades, scores, _ = graded(shift=0.3, noise=0.2)
    cuts = search_cuts(scores, grades)
    assert len(cuts) == 4 and list(cuts) == sorted(cuts)
    assert np.allclose(cuts, [0.8, 1.8, 2.8, 3.8], atol=0.15)
    assert quadratic_kappa(grades, cut(scores, cuts)) > quadratic_kappa(grades, cut(scores))
    assert search_cuts(scores, grades) == cuts  # deterministic


def test_search_keeps_init_when_nothing_beats_it():
    grades = np.array([0, 1, 2, 3, 4])
    assert search_cuts(grades.astype(float), grades) == DEFAULT_CUTS  # already perfect


def test_search_refuses_bad_input():
    with pytest.raises(ValueError, match="length mismatch: scores 3, grades 2"):
        search_cuts([0.0, 1.0, 2.0], [0, 1])
    with pytest.raises(ValueError, match="at least two distinct grades"):
        search_cuts([0.0, 0.2], [0, 0])
    with pytest.raises(ValueError, match="strictly increasing"):
        search_cuts([0.0, 1.0], [0, 1], init=(0.5, 0.5, 2.5, 3.5))


def test_guard_adopts_searched_cuts_where_the_boundaries_are_shifted():
    grades, scores, folds = graded(shift=0.3, noise=0.2)
    out = guarded_search(scores, grades, folds)
    assert out["adopted"] is True
    assert out["cuts"] == out["searched_cuts"]
    assert np.allclose(out["cuts"], [0.8, 1.8, 2.8, 3.8], atol=0.15)
    assert out["default_cuts"] == list(DEFAULT_CUTS)
    assert [h["fold"] for h in out["held_out"]] == [0, 1, 2, 3, 4]
    assert sum(h["n"] for h in out["held_out"]) == len(scores)
    assert out["mean_searched_kappa"] > out["mean_default_kappa"]
    assert out["mean_default_kappa"] == pytest.approx(np.mean([h["default_kappa"] for h in out["held_out"]]))
    assert out["oof_kappa_searched"] > out["oof_kappa_default"]


def test_guard_keeps_the_defaults_where_they_are_right():
    """The searched cuts fit their own scores better (in-sample), but lose on the held-out folds."""
    grades, scores, folds = graded(shift=0.0, noise=0.3)
    out = guarded_search(scores, grades, folds)
    assert out["adopted"] is False
    assert out["cuts"] == list(DEFAULT_CUTS)
    assert out["searched_cuts"] != list(DEFAULT_CUTS)
    assert out["mean_searched_kappa"] <= out["mean_default_kappa"]
    assert out["oof_kappa_searched"] >= out["oof_kappa_default"]


def test_guard_leaves_out_a_fold_without_a_defined_kappa():
    grades, scores, folds = graded(shift=0.0, noise=0.1, n=200)
    folds = np.where(grades == 0, 9, folds % 2)  # fold 9: grade 0 only, all predicted 0
    out = guarded_search(scores, grades, folds)
    fold9 = out["held_out"][-1]
    assert fold9["fold"] == 9 and fold9["default_kappa"] is None and fold9["searched_kappa"] is None
    assert out["mean_default_kappa"] == pytest.approx(np.mean([h["default_kappa"] for h in out["held_out"][:2]]))


def test_guard_refuses_bad_input():
    grades, scores, folds = graded(shift=0.0, noise=0.1, n=50)
    with pytest.raises(ValueError, match="at least two folds"):
        guarded_search(scores, grades, np.zeros(50))
    with pytest.raises(ValueError, match="length mismatch: scores 50, grades 50, folds 49"):
        guarded_search(scores, grades, folds[:-1])
    with pytest.raises(ValueError, match=r"folds must be whole numbers, got \[0\.5\]"):
        guarded_search(scores, grades, np.r_[folds[:-1], 0.5])


# --- ensembles --------------------------------------------------------------------------------------------------


def test_mean_of_scores():
    score, grade = mean_of_scores({"a": [0.0, 1.0, 3.0], "b": [1.0, 2.0, 4.0]})
    assert score.tolist() == [0.5, 1.5, 3.5]
    assert grade.tolist() == [1, 2, 4]  # on the cuts: up
    assert mean_of_scores({"a": [1.0]}, cuts=(2.0, 3.0, 4.0, 5.0))[1].tolist() == [0]


def test_label_average_rounds_the_mean_grade_half_up():
    members = {"a": [0.2, 1.6, 3.6, 0.0], "b": [0.6, 2.6, 3.7, 0.0], "c": [0.1, 1.2, 2.2, 4.0]}
    score, grade = label_average(members)  # grades a 0 2 4 0, b 1 3 4 0, c 0 1 2 4
    assert score == pytest.approx([1 / 3, 2.0, 10 / 3, 4 / 3])
    assert grade.tolist() == [0, 2, 3, 1]
    score, grade = label_average({"a": [0.2, 1.0], "b": [0.6, 2.0]})  # means 0.5 and 1.5
    assert score.tolist() == [0.5, 1.5] and grade.tolist() == [1, 2]
    _, grade = label_average({"a": [0.6], "b": [0.6]}, {"b": (0.7, 1.5, 2.5, 3.5)})  # grades 1 and 0
    assert grade.tolist() == [1]


def test_scaled_average_with_default_cuts_is_the_mean_of_scores():
    rng = np.random.default_rng(3)
    members = {f"m{i}": rng.uniform(-1, 5, 200) for i in range(3)}
    scaled, grade = scaled_average(members)
    mean, mean_grade = mean_of_scores(members)
    assert np.allclose(scaled, mean) and grade.tolist() == mean_grade.tolist()


def test_scaled_average_by_hand():
    # "a": cuts (1, 2, 3, 4): a shift by -0.5. "b": cuts (0.5, 1, 2, 3.5): 0.75 lies halfway between its first
    # two cuts, so it maps halfway between 0.5 and 1.5; below 0.5 and above 3.5 the slope is 1.
    member_cuts = {"a": (1.0, 2.0, 3.0, 4.0), "b": (0.5, 1.0, 2.0, 3.5)}
    assert to_common_scale([2.5, 0.0, 6.0], member_cuts["a"]).tolist() == [2.0, -0.5, 5.5]
    assert to_common_scale([0.75, 1.5, 0.0, 5.0], member_cuts["b"]).tolist() == [1.0, 2.0, 0.0, 5.0]
    score, grade = scaled_average({"a": [2.5, 0.0], "b": [0.75, 5.0]}, member_cuts)
    assert score.tolist() == [1.5, 2.25]  # (2.0 + 1.0) / 2, (-0.5 + 5.0) / 2
    assert grade.tolist() == [2, 2]


@pytest.mark.parametrize("combine", [mean_of_scores, label_average, scaled_average])
def test_ensembles_refuse_bad_members(combine):
    with pytest.raises(ValueError, match="no ensemble members"):
        combine({})
    with pytest.raises(ValueError, match="length mismatch: a 2, b 3"):
        combine({"a": [0.0, 1.0], "b": [0.0, 1.0, 2.0]})
    with pytest.raises(ValueError, match="scores of 'b' must be finite"):
        combine({"a": [0.0], "b": [float("inf")]})


@pytest.mark.parametrize("combine", [label_average, scaled_average])
def test_ensembles_refuse_bad_member_cuts(combine):
    members = {"a": [0.0, 1.0], "b": [0.0, 1.0]}
    with pytest.raises(ValueError, match=r"unknown members \['c'\]"):
        combine(members, {"c": DEFAULT_CUTS})
    with pytest.raises(ValueError, match="strictly increasing, got"):
        combine(members, {"a": (2.0, 1.0, 3.0, 4.0)})
    with pytest.raises(ValueError, match="'b': 4 cut points expected"):
        combine(members, {"b": (1.0, 2.0)})
