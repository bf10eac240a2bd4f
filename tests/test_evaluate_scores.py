"""Tests of the image-level ``stas evaluate --predictions``: scores against scikit-learn and by hand, the output
files, bad rows, nothing scorable, existing outputs, and the two modes of the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from stas_pipeline import cli
from stas_pipeline.stages import evaluate
from stas_pipeline.tasks.classification.evaluation import (
    OUTPUTS,
    PredictionsError,
    evaluate_predictions,
    roc_auc,
    roc_points,
    score,
)

MEMBERS = ("fundus_lite0/fold0", "fundus_lite0/fold1")


def make_case(
    root: Path,
    labels: list[int],
    probs: list[float],
    member_probs: list[list[float | None]] | None = None,
    section: str = "test",
    extra_entries: list[dict] | None = None,
) -> tuple[Path, Path]:
    """Small JPEGs ``data/images/img<i>.jpg``, ``data/datalist.json`` (relative paths; ``labels[i]`` None = no
    label) and ``preds.csv`` (absolute resolved paths) with one member column per list in ``member_probs``."""
    data = root / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    entries, rows = [], []
    for i, (label, prob) in enumerate(zip(labels, probs, strict=True)):
        rel = f"images/img{i:02d}.jpg"
        Image.new("RGB", (48, 36), (20 * (i % 12), 120, 200 if label else 40)).save(data / rel, quality=90)
        entry = {"image": rel} if label is None else {"image": rel, "label": label}
        if section == "training":
            entry["fold"] = i % 2
        entries.append(entry)
        if prob is not None:
            cells = [] if member_probs is None else ["" if m[i] is None else f"{m[i]:.6f}" for m in member_probs]
            rows.append([str((data / rel).resolve()), f"{prob:.6f}", *cells])
    entries += extra_entries or []
    other = "training" if section == "test" else "test"
    (data / "datalist.json").write_text(json.dumps({section: entries, other: []}))
    header = ["image", "prob", *MEMBERS[: len(member_probs or [])]]
    with open(root / "preds.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return root / "preds.csv", data / "datalist.json"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(preds: Path, datalist: Path, out: Path, *extra: str) -> int:
    return cli.main(["evaluate", "--predictions", str(preds), "--datalist", str(datalist), "--out", str(out), *extra])


# --- scores -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 120)
    probs = np.round(np.clip(0.3 * labels + rng.random(120) * 0.7, 0, 1), 1)  # one decimal: many ties
    assert len(np.unique(probs)) < 20
    expected = roc_auc_score(labels, probs)
    assert roc_auc(labels, probs) == pytest.approx(expected, abs=1e-12)
    fpr, tpr = roc_points(labels, probs)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(expected, abs=1e-12)


def test_auc_all_tied_is_one_half():
    assert roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5 == roc_auc_score([0, 1, 0, 1], [0.5] * 4)


def test_score_by_hand_positive_at_or_above_threshold():
    labels = [1, 1, 1, 0, 0, 0, 0]
    probs = [0.9, 0.5, 0.2, 0.5, 0.1, 0.7, 0.3]  # 0.5 is positive: TP 2, FN 1, FP 2, TN 2
    m = score(labels, probs, threshold=0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 2, 2)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(2 / 4)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert (m["n"], m["positives"], m["negatives"]) == (7, 3, 4)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert m["positive_rule"] == "prob >= threshold"
    strict = score(labels, probs, threshold=0.51)
    assert (strict["tp"], strict["fp"]) == (1, 1)


@pytest.mark.parametrize(
    "labels, probs, match",
    [
        ([1, 1], [0.2, 0.9], "all positive"),
        ([0, 0, 0], [0.2, 0.9, 0.1], "all negative"),
        ([], [], "no image"),
        ([0, 2], [0.1, 0.2], "labels must be 0 or 1"),
        ([0, 1], [0.1, float("nan")], "finite"),
    ],
)
def test_score_refuses_undefined_cases(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        score(labels, probs)


# --- the stage --------------------------------------------------------------------------------------------------


LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
PROBS = [0.95, 0.8, 0.6, 0.3, 0.1, 0.2, 0.2, 0.4, 0.55, 0.9]
FOLD0 = [0.9, 0.7, 0.7, 0.2, 0.2, 0.1, 0.3, 0.5, 0.6, 0.8]
FOLD1 = [1.0, 0.9, 0.5, 0.4, 0.0, 0.3, 0.1, 0.3, 0.5, 1.0]


def test_outputs_metrics_and_table(tmp_path, capsys):
    preds, datalist = make_case(tmp_path, LABELS, PROBS, [FOLD0, FOLD1])
    out = tmp_path / "eval"
    assert run(preds, datalist, out, "--worst", "3") == 0
    printed = capsys.readouterr().out
    assert "AUC" in printed and "sensitivity" in printed and "fundus_lite0/fold1" in printed
    assert "evaluate: scored 10, skipped 0" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["auc"] == pytest.approx(roc_auc_score(LABELS, PROBS))
    assert (metrics["n"], metrics["positives"], metrics["tp"], metrics["fp"]) == (10, 4, 3, 2)
    assert metrics["sensitivity"] == 0.75 and metrics["specificity"] == pytest.approx(4 / 6)
    for name, member in zip(MEMBERS, (FOLD0, FOLD1), strict=True):
        assert metrics["members"][name]["auc"] == pytest.approx(roc_auc_score(LABELS, member))
        assert metrics["members"][name]["n"] == 10
    assert metrics["section"] == "test" and metrics["skipped"] == 0

    rows = read_csv(out / "per_image.csv")
    assert list(rows[0]) == ["image", "label", "prob", "pred", "correct", "rank"]
    assert [Path(r["image"]).name for r in rows] == [f"img{i:02d}.jpg" for i in range(10)]
    assert rows[3] == {"image": rows[3]["image"], "label": "1", "prob": "0.300000", "pred": "0", "correct": "0",
                       "rank": "2"}
    worst = read_csv(out / "worst.csv")
    # the negative at 0.9 (distance 0.9), the positive at 0.3 (0.7), the negative at 0.55
    assert [Path(r["image"]).name for r in worst] == ["img09.jpg", "img03.jpg", "img08.jpg"]
    assert [r["rank"] for r in worst] == ["1", "2", "3"]

    with Image.open(out / "roc.png") as img:
        assert img.format == "PNG" and img.width > 300
    with Image.open(out / "worst.png") as img:
        assert img.mode == "RGB" and img.width == 3 * (160 + 4) and img.height > 160
        sheet = np.asarray(img)
    assert sheet[2:162, 2:162].std() > 0  # a thumbnail is there, not an empty tile


def test_relative_paths_on_the_command_line(tmp_path, monkeypatch):
    preds, datalist = make_case(tmp_path / "case", LABELS, PROBS)
    rows = preds.read_text().replace(str(datalist.parent.resolve()), "data")  # image paths relative to the CSV
    preds.write_text(rows)
    monkeypatch.chdir(tmp_path)
    assert run(Path("case/preds.csv"), Path("case/data/datalist.json"), Path("eval")) == 0
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["n"] == 10


def test_library_call_returns_metrics(tmp_path):
    preds, datalist = make_case(tmp_path, LABELS, PROBS)
    metrics, problems = evaluate_predictions(preds, datalist, tmp_path / "e", threshold=0.25, worst=0)
    assert metrics["members"] == {} and metrics["threshold"] == 0.25 and problems.exit_code() == 0
    assert metrics["tp"] == 4 and metrics["fp"] == 3  # 0.4, 0.55 and 0.9 of the negatives
    assert not (tmp_path / "e" / "worst.png").exists() and len(read_csv(tmp_path / "e" / "worst.csv")) == 0


def test_out_of_fold_with_empty_member_cells_and_pseudo_entries(tmp_path, capsys):
    fold0 = [p if i % 2 == 0 else None for i, p in enumerate(PROBS)]
    fold1 = [p if i % 2 == 1 else None for i, p in enumerate(PROBS)]
    pseudo = [{"image": "images/pseudo.jpg", "label": 1, "source": "pseudo", "pseudo_round": 1, "prob": 0.99}]
    preds, datalist = make_case(tmp_path, LABELS, PROBS, [fold0, fold1], section="training", extra_entries=pseudo)
    Image.new("RGB", (48, 36)).save(datalist.parent / "images/pseudo.jpg")
    with open(preds, "a", newline="") as f:  # a prediction of the pseudo-labelled image: not ground truth
        csv.writer(f).writerow([str((datalist.parent / "images/pseudo.jpg").resolve()), "0.100000", "", ""])
    out = tmp_path / "oof"
    assert run(preds, datalist, out, "--section", "training") == 0
    err = capsys.readouterr().err
    assert "1 rows are pseudo-labelled entries" in err and "ERROR" not in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 10 and metrics["auc"] == pytest.approx(roc_auc_score(LABELS, PROBS))
    even = slice(0, None, 2)
    assert metrics["members"][MEMBERS[0]] == {
        "auc": pytest.approx(roc_auc_score(LABELS[even], PROBS[even])), "n": 5, "positives": 2}


def test_unscorable_rows_are_named_and_left_out(tmp_path, capsys):
    probs = [*PROBS[:-1], None]  # the last labelled image has no prediction
    preds, datalist = make_case(tmp_path, LABELS, probs)
    stranger = (tmp_path / "elsewhere.jpg").resolve()
    with open(preds, "a", newline="") as f:
        csv.writer(f).writerows([[str(stranger), "0.5"], [str(datalist.parent / "images/img00.jpg"), "0.7"]])
    rows = (preds.read_text().splitlines())
    rows[2] = rows[2].replace("0.800000", "1.5")  # img01: prob outside [0, 1]
    preds.write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval"
    assert run(preds, datalist, out) == 1
    captured = capsys.readouterr()
    assert f"ERROR {stranger}: not in the 'test' section of {datalist}" in captured.err
    img09 = (datalist.parent / "images/img09.jpg").resolve()
    assert f"ERROR {img09}: labelled in the 'test' section" in captured.err and "not predicted" in captured.err
    assert "img01.jpg: prob 1.5 is outside [0, 1]" in captured.err
    assert "img00.jpg: listed again on line" in captured.err
    assert "scored 8, skipped 5" in captured.out  # img01 twice: its bad row, then no usable prediction
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 8 and metrics["skipped"] == 5


def test_unlabelled_entries_warned_not_scored(tmp_path, capsys):
    preds, datalist = make_case(tmp_path, [*LABELS, None], [*PROBS, 0.5])
    assert run(preds, datalist, tmp_path / "eval") == 0
    assert "1 rows are unlabelled 'test' entries" in capsys.readouterr().err


@pytest.mark.parametrize(
    "labels, section, match",
    [
        ([1, 1, 1], "test", "only one class among the 3 scored images (all positive): the AUC is undefined"),
        ([0, 1, 0], "training", "no entry of the 'training' section has a 0/1 label"),
    ],
)
def test_nothing_scorable_exits_2_and_writes_nothing(tmp_path, capsys, labels, section, match):
    preds, datalist = make_case(tmp_path, labels, [0.2, 0.5, 0.9])
    out = tmp_path / "eval"
    assert run(preds, datalist, out, "--section", section) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not out.exists()


def test_wrong_section_names_the_cause(tmp_path, capsys):
    preds, datalist = make_case(tmp_path, LABELS, PROBS)
    data = json.loads(datalist.read_text())
    data["training"] = [{"image": "images/other.jpg", "label": 1, "fold": 0}]
    datalist.write_text(json.dumps(data))
    assert run(preds, datalist, tmp_path / "eval", "--section", "training") == 2
    assert "no row names a labelled image of the 'training' section" in capsys.readouterr().err


def test_segmentation_datalist_and_bad_files(tmp_path, capsys):
    preds, datalist = make_case(tmp_path, LABELS, PROBS)
    data = json.loads(datalist.read_text())
    for entry in data["test"]:
        entry["label"] = "masks/" + Path(entry["image"]).with_suffix(".png").name
    datalist.write_text(json.dumps(data))
    assert run(preds, datalist, tmp_path / "e") == 2
    assert "labels are paths, not 0/1" in capsys.readouterr().err
    assert run(preds, tmp_path / "missing.json", tmp_path / "e") == 2
    assert "cannot read the datalist" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("path,score\na,0.5\n")
    assert run(tmp_path / "bad.csv", datalist, tmp_path / "e") == 2
    assert "no 'image' or 'prob' column" in capsys.readouterr().err


def test_existing_outputs_refused_unless_overwrite(tmp_path, capsys):
    preds, datalist = make_case(tmp_path, LABELS, PROBS)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "roc.png").write_text("mine")
    assert run(preds, datalist, out) == 2
    assert "roc.png: exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "roc.png").read_text() == "mine" and not (out / "metrics.json").exists()
    assert run(preds, datalist, out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"  # other files are left alone
    with Image.open(out / "roc.png") as img:
        assert img.format == "PNG"
    (tmp_path / "file").write_text("x")
    assert run(preds, datalist, tmp_path / "file") == 2


def test_unreadable_image_is_a_grey_tile(tmp_path, capsys):
    preds, datalist = make_case(tmp_path, LABELS, PROBS)
    (datalist.parent / "images/img09.jpg").write_bytes(b"not a jpeg")  # the worst image
    assert run(preds, datalist, tmp_path / "eval", "--worst", "1") == 0
    assert "cannot read it for worst.png" in capsys.readouterr().err
    with Image.open(tmp_path / "eval/worst.png") as img:
        assert np.asarray(img)[82, 82].tolist() == [96, 96, 96]


# --- command line -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--pred", "p", "--predictions", "x.csv"], "not allowed with argument"),
        ([], "one of the arguments --pred --predictions --slides is required"),
        (["--slides", "s", "--out", "o"], "--slides needs --masks and --out"),
        (["--pred", "p", "--ref", "r", "--masks", "m.csv"], "--masks belongs to the slides mode"),
        (["--predictions", "x.csv", "--datalist", "d.json", "--out", "o", "--ref", "r"],
         "--ref belong to the masks mode"),
        (["--pred", "p", "--ref", "r", "--out", "o"], "--out belong to the image-level mode"),
        (["--predictions", "x.csv", "--out", "o"], "--predictions needs --datalist"),
        (["--pred", "p"], "--pred needs --ref"),
    ],
)
def test_exclusive_modes(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


def test_help_shows_every_mode(capsys):
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "usage: stas evaluate --pred DIR --ref DIR" in out
    assert "stas evaluate --predictions CSV --datalist JSON --out DIR" in out
    assert "stas evaluate --slides DIR --masks SOURCE --out DIR" in out
    assert "positive where prob >= T" in out


def test_predictions_error_is_a_value_error():
    assert issubclass(PredictionsError, ValueError)
