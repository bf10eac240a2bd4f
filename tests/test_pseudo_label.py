"""Tests of stas pseudo-label (tasks/classification/pseudo_labels.py): thresholds, rounds, where pseudo entries
go (never a fold, never the test list), relative paths, load_fold on the result, the falling-CV warning, bad CSVs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from monai.data import load_decathlon_datalist

from stas_pipeline import cli
from stas_pipeline.core.datalist import load_fold
from stas_pipeline.stages.pseudo_label import main
from stas_pipeline.tasks.classification.pseudo_labels import next_round

TRAIN = [f"train/t{i}.png" for i in range(6)]
TEST = [f"test/x{i}.png" for i in range(6)]
EXTRA = [f"extra/u{i}.png" for i in range(3)]  # unlabelled images outside the datalist


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """``data/datalist.json``: 6 training images in 2 folds, an inner test of 6 labelled images; the image files."""
    root = tmp_path / "data"
    for rel in TRAIN + TEST + EXTRA:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not decoded by this stage")
    datalist = {
        "description": "glaucoma test set", "folds": 2,
        "training": [{"image": rel, "label": i % 2, "fold": i % 2, "source": "refuge"} for i, rel in enumerate(TRAIN)],
        "test": [{"image": rel, "label": int(i < 3)} for i, rel in enumerate(TEST)],
    }
    (root / "datalist.json").write_text(json.dumps(datalist, indent=2))
    return root


def write_predictions(path: Path, rows: dict[str, object], root: Path) -> Path:
    """A predictions CSV as stas predict writes it: absolute image paths, prob, one column per fold model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prob", "b0/fold0", "b0/fold1"])
        for rel, prob in rows.items():
            writer.writerow([str((root / rel).resolve()), prob, prob, prob])
    return path


def write_run(run_dir: Path, fold_aucs: list[float], oof: float | None = None, test: float | None = None) -> Path:
    for fold, auc in enumerate(fold_aucs):
        (run_dir / f"fold{fold}").mkdir(parents=True)
        (run_dir / f"fold{fold}" / "metrics.json").write_text(json.dumps(
            {"bundle": "b0", "fold": fold, "lr": 3e-4, "best_epoch": 2, "best_val_auc": auc,
             "history": [{"epoch": 1, "loss": 0.5, "val_auc": auc, "lr": 3e-4, "seconds": 1.0}]}))
    for name, auc in (("eval_oof", oof), ("eval_test", test)):
        if auc is not None:
            (run_dir / name).mkdir()
            (run_dir / name / "metrics.json").write_text(json.dumps({"auc": auc, "n": 6}))
    return run_dir


def pseudo(datalist: dict) -> list[dict]:
    return [e for e in datalist["training"] if e.get("source") == "pseudo"]


def test_thresholds_and_rounds(data, tmp_path, capsys):
    original = json.loads((data / "datalist.json").read_text())
    p1 = write_predictions(tmp_path / "preds" / "r1.csv", {
        TEST[0]: 0.99, TEST[1]: 0.98, TEST[2]: 0.5, TEST[3]: 0.02, TEST[4]: 0.01, TEST[5]: 0.03,
        TRAIN[0]: 0.999,  # an out-of-fold row of a labelled training image: left alone
    }, data)
    r1 = data / "datalist_r1.json"
    assert cli.main(["pseudo-label", "--datalist", str(data / "datalist.json"), "--predictions", str(p1),
                     "--out", str(r1)]) == 0
    out = capsys.readouterr().out
    assert "round 1: added 4 pseudo labels (2 positive, 2 negative); skipped as uncertain 2" in out
    assert "already labelled 1" in out
    d1 = json.loads(r1.read_text())
    assert sorted((e["image"], e["label"], e["pseudo_round"]) for e in pseudo(d1)) == [
        (TEST[0], 1, 1), (TEST[1], 1, 1), (TEST[3], 0, 1), (TEST[4], 0, 1)]
    assert all("fold" not in e for e in pseudo(d1))
    # the test list, the fold entries and the other keys are as they were
    assert d1["test"] == original["test"] and d1["training"][:len(TRAIN)] == original["training"]
    assert {k: d1[k] for k in ("description", "folds")} == {"description": "glaucoma test set", "folds": 2}
    rec = d1["pseudo_rounds"][0]
    assert (rec["round"], rec["added"], rec["positives"], rec["negatives"], rec["uncertain"]) == (1, 4, 2, 2, 2)
    assert (rec["high"], rec["low"], rec["predictions"], rec["cv_auc"], rec["cv_auc_fell"]) == (
        0.98, 0.02, "../preds/r1.csv", None, None)
    assert (rec["test_label_checked"], rec["test_label_wrong"]) == (4, 0)  # checked against the inner-test labels

    # round 2 from round 1's datalist, other thresholds: earlier pseudo entries kept, new ones get round 2
    p2 = write_predictions(tmp_path / "preds" / "r2.csv", {
        TEST[0]: 0.95, TEST[2]: 0.05, TEST[5]: 0.08, EXTRA[0]: 0.5, EXTRA[1]: 0.9}, data)
    r2 = data / "datalist_r2.json"
    assert main(["--datalist", str(r1), "--predictions", str(p2), "--out", str(r2), "--high", "0.9",
                 "--low", "0.1"]) == 0
    d2 = json.loads(r2.read_text())
    assert sorted((e["image"], e["label"], e["pseudo_round"]) for e in pseudo(d2)) == [
        (EXTRA[1], 1, 2), (TEST[0], 1, 1), (TEST[1], 1, 1), (TEST[2], 0, 2), (TEST[3], 0, 1), (TEST[4], 0, 1),
        (TEST[5], 0, 2)]
    assert [r["round"] for r in d2["pseudo_rounds"]] == [1, 2]
    rec = d2["pseudo_rounds"][1]
    assert (rec["already_pseudo"], rec["uncertain"], rec["added"], rec["high"], rec["low"]) == (1, 1, 3, 0.9, 0.1)
    assert (rec["test_label_checked"], rec["test_label_wrong"]) == (2, 1)  # x2 is a glaucoma image called normal
    assert "1 of 2 disagree with the true label" in capsys.readouterr().out
    assert d2["test"] == original["test"] and next_round(d2) == 3


def test_replace_previous_drops_earlier_rounds_but_keeps_counting(data, tmp_path, capsys):
    p1 = write_predictions(tmp_path / "r1.csv", {TEST[0]: 0.99, TEST[1]: 0.01}, data)
    main(["--datalist", str(data / "datalist.json"), "--predictions", str(p1), "--out", str(data / "r1.json")])
    # keep mode: a contradicting prediction is a warning and the earlier label stays
    p2 = write_predictions(tmp_path / "r2.csv", {TEST[0]: 0.001, TEST[2]: 0.995}, data)
    assert main(["--datalist", str(data / "r1.json"), "--predictions", str(p2), "--out", str(data / "keep.json")]) == 0
    assert "pseudo label 1 of round 1 kept, though prob is now 0.001" in capsys.readouterr().err
    keep = json.loads((data / "keep.json").read_text())
    assert sorted((e["image"], e["label"]) for e in pseudo(keep)) == [(TEST[0], 1), (TEST[1], 0), (TEST[2], 1)]
    assert main(["--datalist", str(data / "r1.json"), "--predictions", str(p2), "--out", str(data / "new.json"),
                 "--replace-previous"]) == 0
    new = json.loads((data / "new.json").read_text())
    assert sorted((e["image"], e["label"], e["pseudo_round"]) for e in pseudo(new)) == [
        (TEST[0], 0, 2), (TEST[2], 1, 2)]
    assert new["pseudo_rounds"][-1]["replaced_previous"] == 2 and len(new["training"]) == len(TRAIN) + 2


def test_load_fold_puts_pseudo_entries_in_every_training_part(data, tmp_path):
    p1 = write_predictions(tmp_path / "r1.csv", {TEST[0]: 0.99, TEST[3]: 0.01, EXTRA[2]: 1.0}, data)
    assert main(["--datalist", str(data / "datalist.json"), "--predictions", str(p1), "--out",
                 str(data / "r1.json")]) == 0
    pseudo_images = {str((data / rel).resolve()) for rel in (TEST[0], TEST[3], EXTRA[2])}
    for fold in (0, 1):
        train, val = load_fold(data / "r1.json", fold)
        assert pseudo_images <= {e["image"] for e in train}
        assert not pseudo_images & {e["image"] for e in val}
        assert len(val) == 3 and all(e["fold"] == fold for e in val)
    everything, none = load_fold(data / "r1.json", -1)
    assert len(everything) == len(TRAIN) + 3 and none == []


def test_relative_paths_when_written_to_another_folder(data, tmp_path):
    p1 = write_predictions(tmp_path / "preds" / "r1.csv", {TEST[0]: 0.99, EXTRA[0]: 0.0}, data)
    out = tmp_path / "elsewhere" / "deeper" / "r1.json"
    assert main(["--datalist", str(data / "datalist.json"), "--predictions", str(p1), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert all(not Path(e["image"]).is_absolute() for e in written["training"] + written["test"])
    assert pseudo(written)[0]["image"] == "../../data/" + EXTRA[0]
    for section, rels in (("training", TRAIN + [EXTRA[0], TEST[0]]), ("test", TEST)):
        resolved = {Path(e["image"]).resolve() for e in load_decathlon_datalist(str(out), True, section)}
        assert resolved == {(data / rel).resolve() for rel in rels}
    assert written["pseudo_rounds"][0]["predictions"] == "../../preds/r1.csv"


def test_falling_cv_auc_warns_and_is_recorded(data, tmp_path, capsys):
    run0 = write_run(tmp_path / "runs" / "r0" / "b0", [0.90, 0.94], oof=0.93, test=0.91)
    run1 = write_run(tmp_path / "runs" / "r1" / "b0", [0.88, 0.90])  # no eval_oof: mean of the folds
    p1 = write_predictions(tmp_path / "r1.csv", {TEST[0]: 0.99}, data)
    assert main(["--datalist", str(data / "datalist.json"), "--predictions", str(p1), "--out", str(data / "r1.json"),
                 "--runs", str(run0)]) == 0
    rec1 = json.loads((data / "r1.json").read_text())["pseudo_rounds"][0]
    assert (rec1["cv_auc"], rec1["cv_auc_source"], rec1["test_auc"], rec1["cv_auc_fell"]) == (0.93, "eval_oof", 0.91,
                                                                                           None)
    assert "WARNING" not in capsys.readouterr().err
    p2 = write_predictions(tmp_path / "r2.csv", {TEST[1]: 0.99}, data)
    assert main(["--datalist", str(data / "r1.json"), "--predictions", str(p2), "--out", str(data / "r2.json"),
                 "--runs", str(run1)]) == 0
    captured = capsys.readouterr()
    assert "WARNING" in captured.err and "CV AUC fell from 0.9300 (round 1) to 0.8900" in captured.err
    assert "FELL" in captured.out
    rec2 = json.loads((data / "r2.json").read_text())["pseudo_rounds"][1]
    assert rec2["cv_auc"] == pytest.approx(0.89) and rec2["cv_auc_fell"] is True and rec2["test_auc"] is None
    assert rec2["runs"] == "../runs/r1/b0"
    # a rise is recorded as not fallen
    run2 = write_run(tmp_path / "runs" / "r2" / "b0", [0.97, 0.99])
    p3 = write_predictions(tmp_path / "r3.csv", {TEST[2]: 0.99}, data)
    assert main(["--datalist", str(data / "r2.json"), "--predictions", str(p3), "--out", str(data / "r3.json"),
                 "--runs", str(run2)]) == 0
    assert json.loads((data / "r3.json").read_text())["pseudo_rounds"][2]["cv_auc_fell"] is False
    # --runs must name one run
    assert main(["--datalist", str(data / "r2.json"), "--predictions", str(p3), "--out", str(data / "x.json"),
                 "--runs", str(tmp_path / "runs")]) == 2
    assert "not a training run" in capsys.readouterr().err and not (data / "x.json").exists()


def test_bad_rows_skipped_with_error(data, tmp_path, capsys):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("image,prob\n"
                        f"{(data / TEST[0]).resolve()},0.99\n"
                        f"{(data / TEST[1]).resolve()},abc\n"
                        f"{(data / TEST[2]).resolve()},1.5\n"
                        f"{(data / TEST[3]).resolve()},nan\n"
                        f"{(data / TEST[0]).resolve()},0.5\n"
                        f"{data / 'missing.png'},0.0\n")
    out = data / "r1.json"
    assert main(["--datalist", str(data / "datalist.json"), "--predictions", str(csv_path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"ERROR {(data / TEST[1]).resolve()}: prob 'abc' is not a number" in err
    assert f"ERROR {(data / TEST[2]).resolve()}: prob 1.5 is outside [0, 1]" in err
    assert "prob nan is outside" in err and "listed again on line 6" in err
    assert f"ERROR {data / 'missing.png'}: no such image file" in err
    assert [e["image"] for e in pseudo(json.loads(out.read_text()))] == [TEST[0]]


@pytest.mark.parametrize("content, message", [
    ("image,score\na.png,0.5\n", "no 'prob' column (header: image, score)"),
    ("path,prob\na.png,0.5\n", "no 'image' column"),
    ("", "no 'image' or 'prob' column"),
    ("image,prob\n", "no usable prediction row"),
    (b"image,prob\n\xff\xfe,0.5\n", "cannot read the predictions CSV"),
])
def test_unusable_csv_is_one_line_and_exit_2(data, tmp_path, capsys, content, message):
    csv_path = tmp_path / "p.csv"
    csv_path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = data / "r1.json"
    assert main(["--datalist", str(data / "datalist.json"), "--predictions", str(csv_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_thresholds_validated_and_outputs_kept(data, tmp_path, capsys):
    p1 = write_predictions(tmp_path / "r1.csv", {TEST[0]: 0.99}, data)
    args = ["--datalist", str(data / "datalist.json"), "--predictions", str(p1), "--out", str(data / "r1.json")]
    assert main([*args, "--low", "0.6", "--high", "0.6"]) == 2
    assert "--low 0.6 must be below --high 0.6" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*args, "--high", "1.5"])
    assert exc.value.code == 2
    assert not (data / "r1.json").exists()
    assert main(args) == 0
    before = (data / "r1.json").read_text()
    assert main(args) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert (data / "r1.json").read_text() == before
    # --overwrite: the datalist may even be rewritten in place, as the next round
    assert main(["--datalist", str(data / "r1.json"), "--predictions", str(p1), "--out", str(data / "r1.json"),
                 "--high", "0.5", "--overwrite"]) == 0
    assert [r["round"] for r in json.loads((data / "r1.json").read_text())["pseudo_rounds"]] == [1, 2]


def test_nothing_confident_is_written_with_a_warning(data, tmp_path, capsys):
    p1 = write_predictions(tmp_path / "r1.csv", {TEST[0]: 0.5}, data)
    assert main(["--datalist", str(data / "datalist.json"), "--predictions", str(p1), "--out",
                 str(data / "r1.json")]) == 0
    assert "the training data is unchanged" in capsys.readouterr().err
    assert json.loads((data / "r1.json").read_text())["pseudo_rounds"][0]["added"] == 0
