"""Tests of stas experiments (core/runs.py, core/experiments_table.py): runs found recursively, CV mean/std,
differing vs common knobs, eval summaries, sorting, CSV/markdown outputs, fold inconsistencies, bad files."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from stas_pipeline import cli
from stas_pipeline.core.experiments_table import build_table, to_markdown
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.runs import find_runs, read_run, read_runs
from stas_pipeline.stages.experiments import main

BASE_INFO = {
    "bundle": "glaucoma_b0", "task": "classification",
    "network": {"kind": "classification", "model_name": "efficientnet_b0", "num_classes": 1, "drop_rate": 0.2,
                "image_size": 224},
    "encoder_weights": "none", "image_size": 224, "batch_size": 16, "epochs": 3, "lr": 0.0003, "seed": 0,
    "datalist": "/data/glaucoma/datalist.json", "model": "efficientnet_b0", "label_smoothing": 0.1,
    "focal_gamma": 0.0, "augmix_severity": 0,
}


def write_run(root: Path, name: str, best: dict[int, float | None], key: str = "val_auc", evals: dict | None = None,
              per_fold: dict[int, dict] | None = None, **knobs) -> Path:
    """A run folder as training writes it: fold<k>/metrics.json and best.json for each fold in ``best``."""
    run = root / name
    for fold, value in best.items():
        info = {**BASE_INFO, **knobs, **(per_fold or {}).get(fold, {}), "fold": fold}
        epochs = info["epochs"]
        history = [{"epoch": e, "loss": 1.0 / e, key: (value or 0) - 0.01 * (epochs - e), "lr": info["lr"],
                    "seconds": 1.0} for e in range(1, epochs + 1)]
        best_epoch = epochs - fold % 2 if epochs > 1 else epochs
        (run / f"fold{fold}").mkdir(parents=True)
        (run / f"fold{fold}" / "metrics.json").write_text(json.dumps(
            {**info, "best_epoch": best_epoch, f"best_{key}": value, "history": history}))
        (run / f"fold{fold}" / "best.json").write_text(json.dumps({**info, "epoch": best_epoch, key: value}))
    for which, summary in (evals or {}).items():
        (run / f"eval_{which}").mkdir()
        (run / f"eval_{which}" / "metrics.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write_run(root, "b0_ls0.1", {0: 0.90, 1: 0.94, 2: 0.92, 3: 0.96},
              evals={"oof": {"auc": 0.93, "n": 400}, "test": {"auc": 0.91, "n": 100}})
    write_run(root, "b0_ls0.0", {0: 0.95, 1: 0.97, 2: 0.96, 3: 0.98}, label_smoothing=0.0,
              evals={"test": {"auc": 0.89, "n": 100}})
    write_run(root, "round1/b0_ls0.1", {0: 0.80, 1: 0.84, 2: 0.82, 3: 0.86}, lr=0.001,
              datalist="/data/glaucoma/datalist_r1.json")
    return root


def rows_by_run(table) -> dict[str, dict]:
    return {row["run"]: row for row in table.rows}


def test_finds_runs_recursively_and_names_them_relative(runs_dir):
    assert [p.relative_to(runs_dir).as_posix() for p in find_runs(runs_dir)] == [
        "b0_ls0.0", "b0_ls0.1", "round1/b0_ls0.1"]
    runs = read_runs([runs_dir], Problems("t"))
    assert [r.name for r in runs] == ["b0_ls0.0", "b0_ls0.1", "round1/b0_ls0.1"]
    # the root may itself be a run; several roots prefix the names with the root as given
    assert [r.name for r in read_runs([runs_dir / "b0_ls0.0"], Problems("t"))] == [(runs_dir / "b0_ls0.0").as_posix()]
    two = read_runs([runs_dir / "round1", runs_dir / "b0_ls0.0"], Problems("t"))
    assert [r.name for r in two] == [(runs_dir / "round1/b0_ls0.1").as_posix(), (runs_dir / "b0_ls0.0").as_posix()]


def test_cv_mean_std_and_evals(runs_dir):
    run = read_run(runs_dir / "b0_ls0.1")
    assert run.key == "val_auc" and run.folds == [0, 1, 2, 3]
    assert run.cv_mean == pytest.approx(statistics.fmean([0.90, 0.94, 0.92, 0.96]))
    assert run.cv_std == pytest.approx(statistics.stdev([0.90, 0.94, 0.92, 0.96]))
    assert run.oof_auc == 0.93 and run.test_auc == 0.91 and run.cv_auc == 0.93  # OOF AUC preferred
    other = read_run(runs_dir / "b0_ls0.0")
    assert other.oof_auc is None and other.cv_auc == pytest.approx(0.965)  # else the folds' mean
    assert run.best_epochs == {0: 3, 1: 2, 2: 3, 3: 2} and run.notes == []


def test_table_shows_differing_knobs_and_lists_common_ones_once(runs_dir, capsys):
    assert cli.main(["experiments", str(runs_dir)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].startswith("common: ")
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["run", "folds", "cv_val_auc", "cv_val_auc_std", "oof_auc", "test_auc", "best_epochs", "lr",
                      "datalist", "label_smoothing", "notes"]
    for knob in ("batch_size=16", "bundle=glaucoma_b0", "model=efficientnet_b0", "epochs=3", "focal_gamma=0.0"):
        assert knob in lines[0]
    assert "fold=" not in lines[0] and "history" not in printed and "lr=" not in lines[0]
    row = next(line for line in lines if line.startswith("| b0_ls0.1 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:8] == ["b0_ls0.1", "0,1,2,3", "0.9300", "0.0258", "0.9300", "0.9100", "3,2,3,2", "0.0003"]
    assert cells[8] == "datalist.json"  # the common leading folders /data/glaucoma/ stripped
    assert "| round1/b0_ls0.1 | 0,1,2,3 | 0.8300 |" in printed and "datalist_r1.json" in printed


def test_csv_parses_and_sorts(runs_dir, tmp_path, capsys):
    md, table_csv = tmp_path / "t.md", tmp_path / "t.csv"
    assert main([str(runs_dir), "--out", str(md), "--csv", str(table_csv), "--sort", "cv"]) == 0
    with table_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["b0_ls0.0", "b0_ls0.1", "round1/b0_ls0.1"]  # best CV first
    assert float(rows[1]["cv_val_auc"]) == pytest.approx(0.93)
    assert float(rows[1]["cv_val_auc_std"]) == pytest.approx(statistics.stdev([0.90, 0.94, 0.92, 0.96]))
    assert rows[0]["oof_auc"] == "" and rows[1]["test_auc"] == "0.91" and rows[0]["label_smoothing"] == "0.0"
    assert "batch_size" not in rows[0]
    assert md.read_text() == capsys.readouterr().out.split("wrote ")[0]
    # inner-test order, the run without an inner-test AUC last; existing outputs are kept without --overwrite
    assert main([str(runs_dir), "--csv", str(table_csv)]) == 2
    assert main([str(runs_dir), "--csv", str(table_csv), "--sort", "test", "--overwrite"]) == 0
    with table_csv.open(newline="") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["b0_ls0.1", "b0_ls0.0", "round1/b0_ls0.1"]


def test_nested_knob_repeating_another_column_is_dropped(tmp_path):
    write_run(tmp_path, "b0", {0: 0.9})
    write_run(tmp_path, "b2", {0: 0.9}, model="efficientnet_b2",
              network={**BASE_INFO["network"], "model_name": "efficientnet_b2", "drop_rate": 0.3})
    table = build_table(read_runs([tmp_path], Problems("t")))
    assert "model" in table.columns and "network.model_name" not in table.columns
    assert "network.drop_rate" in table.columns and "network.kind" in table.common
    assert rows_by_run(table)["b2"]["cv_val_auc_std"] is None  # one fold: no std


def test_folds_with_different_knobs_are_flagged(tmp_path):
    write_run(tmp_path, "mixed", {0: 0.9, 1: 0.8, 2: 0.85}, per_fold={2: {"lr": 0.01, "epochs": 5}})
    run = read_run(tmp_path / "mixed")
    assert run.knobs["lr"] == "0.0003 / 0.01"
    assert any("knobs differ between folds: epochs, lr" in n for n in run.notes)
    assert not any("trained" in n for n in run.notes)  # fold 2 ran its 5 epochs, the others their 3
    write_run(tmp_path, "plain", {0: 0.9, 1: 0.8, 2: 0.85})
    table = build_table(read_runs([tmp_path], Problems("t")))
    assert "knobs differ between folds" in rows_by_run(table)["mixed"]["notes"]
    assert rows_by_run(table)["plain"]["notes"] == ""


def test_unfinished_fold_and_all_data_fold_noted(tmp_path):
    run_dir = write_run(tmp_path, "r", {0: 0.9, 1: 0.7, -1: None})
    metrics = json.loads((run_dir / "fold1" / "metrics.json").read_text())
    metrics["history"] = metrics["history"][:1]
    (run_dir / "fold1" / "metrics.json").write_text(json.dumps(metrics))
    run = read_run(run_dir)
    assert run.folds == [-1, 0, 1] and run.cv_mean == pytest.approx(0.8)  # fold -1 not in the CV
    assert "fold-1: all data, not in the CV" in run.notes and "fold1: trained 1 of 3 epochs" in run.notes


def test_segmentation_runs_name_the_metric_after_their_key(tmp_path, capsys):
    write_run(tmp_path, "deeplab", {0: 0.80, 1: 0.84}, key="val_dice", bundle="deeplab_lite0")
    write_run(tmp_path, "glaucoma", {0: 0.9, 1: 0.92})
    assert main([str(tmp_path)]) == 0
    table = build_table(read_runs([tmp_path], Problems("t")))
    assert table.columns[2:6] == ["cv_val_dice", "cv_val_dice_std", "cv_val_auc", "cv_val_auc_std"]
    rows = rows_by_run(table)
    assert rows["deeplab"]["cv_val_dice"] == pytest.approx(0.82) and rows["deeplab"]["cv_val_auc"] is None
    assert rows["glaucoma"]["cv_val_auc"] == pytest.approx(0.91)
    assert "| deeplab | 0,1 | 0.8200 |" in to_markdown(table)


def test_bad_metrics_file_skipped_with_error(tmp_path, capsys):
    run_dir = write_run(tmp_path, "r", {0: 0.9, 1: 0.8})
    (run_dir / "fold1" / "metrics.json").write_text("{not json")
    (run_dir / "eval_test").mkdir()
    (run_dir / "eval_test" / "metrics.json").write_text("[1, 2]")
    assert main([str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert f"ERROR {run_dir / 'fold1' / 'metrics.json'}: not valid JSON" in captured.err
    assert f"ERROR {run_dir / 'eval_test' / 'metrics.json'}: not a JSON object" in captured.err
    assert "| r | 0 | 0.9000 |" in captured.out


def test_nothing_to_show(tmp_path, capsys):
    (tmp_path / "empty" / "fold0").mkdir(parents=True)
    assert main([str(tmp_path / "empty")]) == 2
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no run found" in err and "not a folder" in err
