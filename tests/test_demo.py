"""``stas demo``: every stage end to end on a tiny synthetic set, stage failures, the synthetic LabelMe data."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stas_pipeline.cli import STAGES
from stas_pipeline.core.demo_runner import MARKER
from stas_pipeline.core.synthetic import make_challenge_dataset
from stas_pipeline.stages.demo import main
from stas_pipeline.tasks.segmentation.demo import SegmentationDemo
from stas_pipeline.tasks.segmentation.labelme import convert_folder

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n-images", "14", "--image-size", "64", "--epochs", "1", "--weights", "none", "--batch-size", "4",
        "--device", "cpu", "--worst", "2"]


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("demo") / "out"
    return main([*TINY, "--out", str(out)], prog="stas demo"), out


def test_demo_runs_every_stage_and_writes_every_output(demo_run):
    code, out = demo_run
    assert code == 0
    data = out / "data"
    assert len(list((data / "Train_Images").glob("*.jpg"))) == 14
    assert len(list((data / "Train_Annotations").glob("*.json"))) == 14
    assert len(list((out / "masks").glob("*.png"))) == 14
    datalist = json.loads((out / "datalist.json").read_text())
    test_stems = sorted(Path(e["image"]).stem for e in datalist["test"])
    train_stems = {Path(e["image"]).stem for e in datalist["training"]}
    assert test_stems and not train_stems & set(test_stems) and len(train_stems) + len(test_stems) == 14
    assert {e["fold"] for e in datalist["training"]} >= {0, 1}
    assert sorted(p.stem for p in (out / "split" / "test_masks").glob("*.png")) == test_stems
    assert (out / "cache_deeplab_lite0_64" / "data.mdb").is_file()
    for fold in (0, 1):
        run_dir = out / "runs" / "deeplab_lite0" / f"fold{fold}"
        assert (run_dir / "best.pt").is_file() and (run_dir / "metrics.json").is_file()
        for folder in (f"fold{fold}", f"fold{fold}_probs"):
            assert sorted(p.stem for p in (out / "predictions" / folder).glob("*.png")) == test_stems
    ensemble = sorted((out / "predictions" / "ensemble").glob("*.png"))
    assert [p.stem for p in ensemble] == test_stems
    assert all(set(np.unique(png(p))) <= {0, 255} for p in ensemble)
    assert {p.name for p in (out / "evaluation").glob("*.csv")} == {"fold0.csv", "fold1.csv", "ensemble.csv"}
    overlays = sorted((out / "overlays").glob("*_overlay.png"))
    assert len(overlays) == min(2, len(test_stems)) and png(overlays[0]).ndim == 3
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert sorted(zf.namelist()) == [f"{s}.png" for s in test_stems]
    assert (out / MARKER).is_file()


def test_crop_recipe_demo_trains_on_crops_and_predicts_by_windows(tmp_path):
    out = tmp_path / "out"
    args = [*TINY, "--recipe", "crops", "--crop-size", "32", "--batch-size", "2", "--folds-to-train", "1"]
    assert main([*args, "--out", str(out)], prog="stas demo") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["bundle"] == "deeplab_lite0_crops" and summary["settings"]["crop_size"] == 32
    info = json.loads((out / "runs" / "deeplab_lite0_crops" / "fold0" / "best.json").read_text())
    assert info["crop_size"] == 32 and info["keep_aspect"] is True and info["image_size"] == 64
    assert (out / "cache_deeplab_lite0_crops_64" / "data.mdb").is_file()
    test_stems = sorted(Path(e["image"]).stem for e in json.loads((out / "datalist.json").read_text())["test"])
    assert sorted(p.stem for p in (out / "predictions" / "ensemble").glob("*.png")) == test_stems
    assert 0.0 <= summary["ensemble"]["test_dice"] <= 1.0
    assert main([*TINY, "--recipe", "crops", "--crop-size", "40", "--out", str(tmp_path / "odd")]) == 2


def test_demo_summary_holds_every_dice_and_timing(demo_run):
    _, out = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert [row["fold"] for row in summary["folds"]] == [0, 1]
    for row in summary["folds"]:
        assert 0 <= row["best_val_dice"] <= 1 and 0 <= row["test_dice"] <= 1
    assert 0 <= summary["ensemble"]["test_dice"] <= 1 and "mean" in summary["ensemble"]["method"]
    assert set(summary["seconds"]) == {"startup", "data", "masks", "datalist", "cache", "train", "predict",
                                       "ensemble", "evaluate", "export"}
    assert summary["total_seconds"] > 0 and summary["images"]["test"] >= 1
    assert Path(summary["outputs"]["submission"]) == out / "submission.zip"


def test_existing_non_empty_out_is_refused(demo_run, capsys):
    _, out = demo_run
    before = sorted(p.name for p in out.iterdir())
    assert main([*TINY, "--out", str(out)]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_data_without_annotations_fails_in_the_masks_stage(tmp_path, capsys):
    (tmp_path / "data" / "Train_Images").mkdir(parents=True)
    code = main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "demo: stage 'masks' failed:" in err and "Train_Annotations" in err and "challenge layout" in err


def test_overwrite_removes_only_the_demos_own_outputs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    (out / "cache_64").mkdir()
    (out / "summary.json").write_text("{}")
    (out / "mine.txt").write_text("keep me")
    def stop(self):
        raise RuntimeError("stop here")

    monkeypatch.setattr(SegmentationDemo, "stage_data", stop)
    assert main(["--out", str(out), "--overwrite"]) == 1
    assert "demo: stage 'data' failed: RuntimeError: stop here" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "mine.txt"]


def test_synthetic_labelme_files_match_the_drawn_masks(tmp_path):
    images, annotations = make_challenge_dataset(tmp_path, n=12, height=88, width=160, masks=tmp_path / "drawn")
    kinds, empty = set(), 0
    for path in sorted(annotations.glob("*.json")):
        doc = json.loads(path.read_text())
        assert doc["imagePath"] == f"{path.stem}.jpg" and (images / doc["imagePath"]).is_file()
        assert (doc["imageHeight"], doc["imageWidth"]) == (88, 160)
        assert all(s["label"] == "STAS" for s in doc["shapes"])
        kinds |= {s["shape_type"] for s in doc["shapes"]}
        empty += not doc["shapes"]
    assert kinds == {"circle", "polygon", "rectangle"} and 1 <= empty < 12
    problems = convert_folder(annotations, tmp_path / "masks", images=images)
    assert not problems.skipped
    for drawn in sorted((tmp_path / "drawn").glob("*.png")):
        a, b = png(drawn) > 0, png(tmp_path / "masks" / drawn.name) > 0
        dice = 1.0 if not a.any() and not b.any() else 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.95, drawn.name
        with Image.open(images / f"{drawn.stem}.jpg") as im:
            rgb = np.asarray(im.convert("RGB")).astype(int)
        if a.any():  # the clusters are purple where the mask is, the stroma pink elsewhere
            assert rgb[a][:, 1].mean() < rgb[~a][:, 1].mean() - 50


def test_demo_is_a_stas_stage_with_help():
    assert STAGES["demo"][0] == "stas_pipeline.stages.demo"
    result = subprocess.run([sys.executable, "-m", "stas_pipeline.stages.demo", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--data", "--out", "--overwrite", "--n-images", "--image-size", "--epochs", "--folds-to-train",
                   "--test-fraction", "--seed", "--device", "--weights"):
        assert option in result.stdout


def test_classification_demo_runs_the_recipe_end_to_end(tmp_path):
    """``stas demo --task classification``: folds, fold mean, out-of-fold, a pseudo-label round trained again,
    the experiments table, every file where the docstring says."""
    out = tmp_path / "out"
    code = main(["--task", "classification", "--n-images", "40", "--image-size", "32", "--epochs", "1",
                 "--folds", "2", "--batch-size", "8", "--weights", "none", "--device", "cpu", "--out", str(out)],
                prog="stas demo")
    assert code == 0
    assert len(list((out / "data" / "images").glob("*.jpg"))) == 40
    for round_ in (0, 1):
        run_dir = out / "runs" / f"round{round_}" / "fundus_lite0"
        for fold in (0, 1):
            assert (run_dir / f"fold{fold}" / "best.pt").is_file()
        for split in ("test", "oof"):
            header = (out / "predictions" / f"round{round_}_{split}.csv").read_text().splitlines()[0]
            assert header == "image,prob,fundus_lite0/fold0,fundus_lite0/fold1"
            assert (run_dir / f"eval_{split}" / "roc.png").stat().st_size > 0
    assert (out / "datalist_round1.json").is_file()
    table = (out / "experiments.md").read_text()
    assert "round0/fundus_lite0" in table and "round1/fundus_lite0" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "classification" and set(summary["auc"]) == {
        "round0_test", "round0_oof", "round1_test", "round1_oof"}
    assert all(0.0 <= auc <= 1.0 for auc in summary["auc"].values())


def test_classification_demo_refuses_data(tmp_path, capsys):
    assert main(["--task", "classification", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--data is for the segmentation demo" in capsys.readouterr().err


def test_grading_demo_runs_three_heads_and_their_ensembles(tmp_path):
    out = tmp_path / "out"
    code = main(["--task", "grading", "--n-images", "40", "--image-size", "32", "--epochs", "1", "--folds", "2",
                 "--batch-size", "8", "--weights", "none", "--device", "cpu", "--out", str(out)], prog="stas demo")
    assert code == 0
    for head in ("regression", "cumulative", "expectation"):
        assert (out / "runs" / head / "grading_lite0" / "fold1" / "best.pt").is_file()
        assert (out / "runs" / head / "eval_oof" / "confusion.png").stat().st_size > 0
        header = (out / "predictions" / f"{head}_test.csv").read_text().splitlines()[0]
        assert header == "image,score,grade,grading_lite0/fold0,grading_lite0/fold1"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "grading" and set(summary["ensembles"]) == {"mean", "label-average", "scaled-average"}
    assert all(v is None or -1 <= v <= 1 for v in summary["ensembles"].values())


def test_slide_demo_tiles_trains_and_predicts_whole_slides(tmp_path):
    """``stas demo --task slide`` on three small runs of its synthetic slides: two labelled (one per fold), one held
    out; out-of-fold and held-out slides predicted whole and scored, the threshold chosen out of fold."""
    out = tmp_path / "out"
    code = main(["--task", "slide", "--n-images", "3", "--epochs", "1", "--batch-size", "8", "--weights", "none",
                 "--device", "cpu", "--out", str(out)], prog="stas demo")
    assert code == 0
    for split, ident in (("oof", "slide0"), ("oof", "slide1"), ("test", "slide2")):
        assert {f"{ident}.tif", f"{ident}_prob.npy", f"{ident}_overlay.png"} <= {
            p.name for p in (out / "predictions" / split).iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "slide" and 0 <= summary["test_dice_at_threshold"] <= 1
    assert summary["threshold"] == json.loads((out / "evaluation" / "oof" / "metrics.json").read_text())[
        "best_threshold"]
