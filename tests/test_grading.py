"""The grading task: the three heads (outputs, scores, losses), the kappa key metric, and each head trained by
the shared MONAI workflow from a grading bundle (real timm Lite0, real cache, real PNGs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import cohen_kappa_score
from tiny_runs import train

from stas_pipeline import cli
from stas_pipeline.core.models import build_classifier
from stas_pipeline.tasks.grading.heads import GradeScored, OrdinalLoss, grade_score, head_outputs, prior_bias
from stas_pipeline.tasks.grading.kappa_metric import QuadraticKappa


def test_each_head_turns_logits_into_a_grade_score():
    assert [head_outputs(h) for h in ("regression", "cumulative", "expectation")] == [1, 4, 5]
    assert torch.allclose(grade_score(torch.tensor([[2.7], [-0.2]]), "regression"), torch.tensor([2.7, -0.2]))
    big = 20.0  # sigmoid ~ 1 or 0: "grade > k" true for k = 0, 1 -> grade 2
    assert torch.allclose(grade_score(torch.tensor([[big, big, -big, -big]]), "cumulative"), torch.tensor([2.0]))
    one_hot = torch.full((1, 5), -big)
    one_hot[0, 3] = big
    assert torch.allclose(grade_score(one_hot, "expectation"), torch.tensor([3.0]), atol=1e-4)
    assert grade_score(torch.zeros(5), "expectation").shape == (1,)  # one decollated item
    with pytest.raises(ValueError, match="unknown grading head 'softmax'"):
        head_outputs("softmax")


def test_losses_of_the_three_heads():
    grades = torch.tensor([0, 2, 4])
    assert OrdinalLoss("regression")(grades[:, None].float(), grades).item() == 0.0
    logits = torch.randn(3, 4)
    expected = F.binary_cross_entropy_with_logits(logits, torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1.0]]))
    assert torch.isclose(OrdinalLoss("cumulative")(logits, grades), expected)
    logits = torch.randn(3, 5)
    probs = torch.softmax(logits, 1)
    mse = F.mse_loss((probs * torch.arange(5)).sum(1), grades.float())
    assert torch.isclose(OrdinalLoss("expectation", 0.5)(logits, grades), F.cross_entropy(logits, grades) + 0.5 * mse)


def test_prior_bias_starts_each_head_at_the_training_grades():
    """Regression at the mean grade; cumulative sigmoids at the shares of "grade > k"; expectation softmax at the
    grade shares (an absent grade clipped to 1e-3); the classifier head takes them as its bias."""
    grades = [0, 0, 0, 0, 1, 1, 2, 3, 4, 4]
    assert prior_bias("regression", grades) == pytest.approx([1.5])
    assert torch.sigmoid(torch.tensor(prior_bias("cumulative", grades))).tolist() == pytest.approx([0.6, 0.4, 0.3, 0.2])
    shares = torch.softmax(torch.tensor(prior_bias("expectation", [0, 0, 1, 3])), 0)
    assert shares.tolist() == pytest.approx([0.5, 0.25, 0.0, 0.25, 0.0], abs=2e-3)
    model = build_classifier("tf_efficientnet_lite0", num_classes=4, head_bias=prior_bias("cumulative", grades))
    logits = model.eval()(torch.zeros(2, 3, 32, 32))
    assert torch.sigmoid(logits).mean(0).tolist() == pytest.approx([0.6, 0.4, 0.3, 0.2], abs=0.02)
    with pytest.raises(ValueError, match="head_bias of 4 values"):
        build_classifier("tf_efficientnet_lite0", num_classes=5, head_bias=[0.0] * 4)
    with pytest.raises(ValueError, match="at least one"):
        prior_bias("regression", [])


def test_grade_scored_replaces_the_prediction():
    out = GradeScored("pred", "cumulative")({"pred": torch.tensor([9.0, 9.0, 9.0, -9.0]), "label": 3})
    assert out["pred"].shape == (1,) and abs(out["pred"].item() - 3.0) < 1e-3 and out["label"] == 3


def test_kappa_metric_matches_scikit_learn_over_decollated_batches():
    rng = np.random.default_rng(0)
    grades = rng.integers(0, 5, 60)
    scores = grades + rng.normal(0, 0.8, 60)
    metric = QuadraticKappa()
    metric.reset()
    for start in range(0, 60, 16):  # lists of per-image tensors, as the evaluator's from_engine gives them
        metric.update(([torch.tensor([s]) for s in scores[start:start + 16]],
                       [torch.tensor(g) for g in grades[start:start + 16]]))
    predicted = np.clip(np.searchsorted([0.5, 1.5, 2.5, 3.5], scores, side="right"), 0, 4)
    assert metric.compute() == pytest.approx(cohen_kappa_score(grades, predicted, weights="quadratic"))


@pytest.mark.parametrize("head", ["regression", "cumulative", "expectation"])
def test_each_head_trains_with_kappa_as_the_key_metric(grading_runs, head):
    run_dir = grading_runs[head]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    assert all(-1.0 <= row["val_kappa"] <= 1.0 and row["loss"] > 0 for row in metrics["history"])
    info = json.loads((run_dir / "best.json").read_text())
    assert info["task"] == "grading" and info["head"] == head
    assert info["network"]["num_classes"] == head_outputs(head)
    state = torch.load(run_dir / "best.pt", weights_only=True)
    assert state["classifier.weight"].shape[0] == head_outputs(head)


def test_predict_writes_scores_and_grades_of_runs_with_different_heads(graded, grading_runs, tmp_path):
    """Two heads in one prediction: each run's own score (regression output, sum of cumulative sigmoids), their
    mean as the score, the grade cut from it at the default cut points."""
    fold0, fold1 = grading_runs["regression"], grading_runs["cumulative"]
    out = tmp_path / "oof.csv"
    assert cli.main(["predict", "--checkpoint", str(fold0 / "best.pt"), str(fold1 / "best.pt"), "--datalist",
                     str(graded / "datalist.json"), "--out-of-fold", "--workers", "0", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "image,score,grade,grading_lite0/fold0,grading_lite0/fold1"
    assert len(lines) == 1 + 30
    for line in lines[1:]:
        _, score, grade, *members = line.split(",")
        assert int(grade) == int(np.searchsorted([0.5, 1.5, 2.5, 3.5], float(score), side="right"))
        assert float(score) == pytest.approx(float(next(m for m in members if m)), abs=1e-6)
    cumulative = [float(line.split(",")[4]) for line in lines[1:] if line.split(",")[4]]
    assert cumulative and all(0.0 <= s <= 4.0 for s in cumulative)  # a sum of four sigmoids


def test_bundle_inference_entry_writes_what_stas_predict_writes(graded, tmp_path):
    """A cumulative run started from its training grades' prior (``prior_init``, recorded), then the bundle's
    inference entry over the datalist's test list (flip TTA, the bundle's default): the same scores and grades as
    ``stas predict --tta hv``."""
    datalist = json.loads((graded / "datalist.json").read_text())
    datalist["test"] = [{"image": e["image"]} for e in datalist["training"][:4]]
    with_test = graded / "with_test.json"  # beside the images its paths are relative to
    with_test.write_text(json.dumps(datalist))
    run_dir = train(graded, "grading_lite0", ("training", "inference"), head="cumulative", datalist=str(with_test),
                    batch_size=8, prior_init=True, output_dir=str(tmp_path))
    assert json.loads((run_dir / "best.json").read_text())["prior_init"] is True
    assert cli.main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--datalist", str(with_test), "--tta",
                     "hv", "--workers", "0", "--out", str(tmp_path / "predict.csv")]) == 0
    bundle_rows = (run_dir / "predictions.csv").read_text().splitlines()
    assert bundle_rows[0] == "image,score,grade,grading_lite0/fold0" and len(bundle_rows) == 5
    assert bundle_rows == (tmp_path / "predict.csv").read_text().splitlines()


def test_evaluate_scores_a_grading_csv_and_guards_its_cut_points(graded, tmp_path, capsys):
    """Out-of-fold scores whose true boundaries are shifted by +0.45: kappa with the default cuts, the searched
    cuts adopted because they win on held-out folds, the confusion PNG; checked against scikit-learn."""
    datalist = json.loads((graded / "datalist.json").read_text())
    rng = np.random.default_rng(1)
    rows, grades, scores = [], [], []
    for entry in datalist["training"]:
        score = entry["label"] + 0.45 + rng.normal(0, 0.1)
        grades.append(entry["label"])
        scores.append(score)
        rows.append(f"{(graded / entry['image']).resolve()},{score:.6f},0,{score:.6f}")
    csv_path = tmp_path / "oof.csv"
    csv_path.write_text("image,score,grade,m/fold0\n" + "\n".join(rows) + "\n")
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--predictions", str(csv_path), "--datalist", str(graded / "datalist.json"),
                     "--section", "training", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    default = np.searchsorted([0.5, 1.5, 2.5, 3.5], scores, side="right")
    assert metrics["kappa"] == pytest.approx(cohen_kappa_score(grades, default, weights="quadratic",
                                                               labels=range(5)))
    assert metrics["cut_points"]["adopted"] and metrics["with_cut_points"]["kappa"] >= metrics["kappa"]
    assert metrics["with_cut_points"]["accuracy"] == 1.0 and metrics["members"]["m/fold0"] == metrics["kappa"]
    assert (out / "confusion.png").stat().st_size > 0 and (out / "cut_points.json").is_file()
    assert "adopted" in capsys.readouterr().out


def test_ensemble_of_grading_csvs_three_ways(tmp_path):
    """Two members' scores on three images: the mean of scores, the label average (each member's own cuts),
    the scaled average, worked by hand; unknown methods and mixed CSVs are refused."""
    images = [str(tmp_path / f"i{k}.png") for k in range(3)]
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for path, member, scores in ((a, "x", (0.4, 1.6, 3.0)), (b, "y", (1.0, 1.2, 3.8))):
        path.write_text(f"image,score,grade,{member}\n"
                        + "".join(f"{i},{s},0,{s}\n" for i, s in zip(images, scores, strict=True)))
    cuts_b = tmp_path / "cuts_b.json"
    cuts_b.write_text(json.dumps({"cuts": [0.7, 1.7, 2.7, 3.7]}))
    cuts_a = tmp_path / "cuts_a.json"
    cuts_a.write_text(json.dumps({"cuts": [0.5, 1.5, 2.5, 3.5]}))

    def ensemble(method: str, *extra: str) -> list[list[str]]:
        out = tmp_path / f"{method}.csv"
        assert cli.main(["ensemble", str(a), str(b), "--method", method, "--out", str(out), *extra]) == 0
        return [line.split(",") for line in out.read_text().splitlines()]

    mean = ensemble("mean")
    assert mean[0] == ["image", "score", "grade", "a", "b"]
    assert [(float(r[1]), int(r[2])) for r in mean[1:]] == [(0.7, 1), (1.4, 1), (3.4, 3)]
    labels = ensemble("label-average", "--member-cuts", str(cuts_a), str(cuts_b))
    # grades a: 0, 2, 3; b (cuts 0.7..3.7): 1, 1, 4 -> means 0.5, 1.5, 3.5 -> rounded half up 1, 2, 4
    assert [(float(r[1]), int(r[2])) for r in labels[1:]] == [(0.5, 1), (1.5, 2), (3.5, 4)]
    scaled = ensemble("scaled-average", "--member-cuts", str(cuts_a), str(cuts_b))
    # b on the common scale: 1.0 -> 0.8, 1.2 -> 1.0, 3.8 -> 3.6; means 0.6, 1.3, 3.3
    assert [round(float(r[1]), 6) for r in scaled[1:]] == [0.6, 1.3, 3.3]
    assert [int(r[2]) for r in scaled[1:]] == [1, 1, 3]
    assert cli.main(["ensemble", str(a), str(b), "--method", "vote", "--out", str(tmp_path / "v.csv")]) == 2
    probs = tmp_path / "p.csv"
    probs.write_text(f"image,prob\n{images[0]},0.5\n")
    assert cli.main(["ensemble", str(a), str(probs), "--out", str(tmp_path / "m.csv")]) == 2


def test_evaluate_applies_cut_points_found_elsewhere(graded, tmp_path, capsys):
    """The inner test scored with the cut points of an out-of-fold search (``--cuts``), beside the defaults."""
    datalist = json.loads((graded / "datalist.json").read_text())
    entries = datalist["training"]
    csv_path = tmp_path / "test.csv"
    csv_path.write_text("image,score,grade\n" + "".join(
        f"{(graded / e['image']).resolve()},{e['label'] + 0.6},0\n" for e in entries))
    cuts = tmp_path / "cut_points.json"
    cuts.write_text(json.dumps({"cuts": [0.8, 1.8, 2.8, 3.8], "adopted": True}))
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--predictions", str(csv_path), "--datalist", str(graded / "datalist.json"),
                     "--section", "training", "--cuts", str(cuts), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] < 1.0 and metrics["with_cut_points"]["accuracy"] == 1.0
    assert not (out / "cut_points.json").exists()  # applied, not searched
    assert f"from {cuts}" in capsys.readouterr().out
    probs = tmp_path / "probs.csv"
    probs.write_text(f"image,prob\n{(graded / entries[0]['image']).resolve()},0.5\n")
    assert cli.main(["evaluate", "--predictions", str(probs), "--datalist", str(graded / "datalist.json"),
                     "--cuts", str(cuts), "--out", str(tmp_path / "e2")]) == 2
