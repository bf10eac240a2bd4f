"""Tests of stas evaluate --pred (stages/evaluate.py, tasks/segmentation/evaluation.py): metrics on
hand-computed cases, the CSV, overlays, errors."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stas_pipeline import cli
from stas_pipeline.stages.evaluate import main
from stas_pipeline.tasks.segmentation.evaluation import CAPTION, dice_iou_precision_recall, evaluate_folders, summarize

REPO = Path(__file__).resolve().parents[1]
H, W = 10, 12


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def box(y0: int, y1: int, x0: int, x1: int, value: int = 255) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = value
    return mask


def test_metrics_known_overlap():
    pred = np.zeros(10, bool)
    ref = np.zeros(10, bool)
    pred[:6], ref[2:8] = True, True  # |P| 6, |R| 6, overlap 4, union 8
    m = dice_iou_precision_recall(pred, ref)
    assert m == {
        "dice": pytest.approx(8 / 12),
        "iou": pytest.approx(4 / 8),
        "precision": pytest.approx(4 / 6),
        "recall": pytest.approx(4 / 6),
        "pred_pixels": 6,
        "ref_pixels": 6,
    }


def test_metrics_asymmetric_case_and_grey_values():
    pred = np.array([[0, 9, 9, 0]])  # nonzero is foreground
    ref = np.array([[0, 255, 0, 0]])
    m = dice_iou_precision_recall(pred, ref)
    assert (m["dice"], m["iou"], m["precision"], m["recall"]) == (2 / 3, 1 / 2, 1 / 2, 1.0)


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ([0, 0], [0, 0], (1.0, 1.0, 1.0, 1.0)),  # both empty: a correct empty prediction
        ([1, 0], [0, 0], (0.0, 0.0, 0.0, 0.0)),  # false positive on an empty image
        ([0, 0], [1, 0], (0.0, 0.0, 0.0, 0.0)),  # nothing predicted, something to find
        ([1, 1], [1, 1], (1.0, 1.0, 1.0, 1.0)),
    ],
)
def test_metrics_empty_cases(pred, ref, expected):
    m = dice_iou_precision_recall(np.array(pred), np.array(ref))
    assert (m["dice"], m["iou"], m["precision"], m["recall"]) == expected


def test_metrics_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        dice_iou_precision_recall(np.zeros((2, 2)), np.zeros((2, 3)))


def test_summarize_is_the_mean_per_image():
    rows = [
        {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0},
        {"dice": 0.0, "iou": 0.5, "precision": 0, "recall": 1},
    ]
    assert summarize(rows) == {"dice": 0.5, "iou": 0.75, "precision": 0.5, "recall": 1.0, "count": 2}
    assert summarize([])["count"] == 0


def make_folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    pred, ref, images = tmp_path / "pred", tmp_path / "ref", tmp_path / "images"
    save_png(ref / "perfect.png", box(2, 6, 2, 6))
    save_png(pred / "perfect.png", box(2, 6, 2, 6, value=3))  # grey level: still foreground
    save_png(ref / "half.png", box(0, 4, 0, 4))  # 16 pixels
    save_png(pred / "half.png", box(0, 4, 0, 2))  # 8 pixels inside: dice 16/24
    save_png(ref / "empty.png", np.zeros((H, W)))
    save_png(pred / "empty.png", np.zeros((H, W)))
    save_png(ref / "miss.png", box(5, 7, 5, 7))
    save_png(pred / "miss.png", box(0, 2, 0, 2))
    for stem in ("perfect", "half", "empty", "miss"):
        images.mkdir(exist_ok=True)
        Image.new("RGB", (W, H), (200, 150, 200)).save(images / f"{stem}.png")
    return pred, ref, images


def test_cli_summary_and_csv(tmp_path, capsys):
    pred, ref, _ = make_folders(tmp_path)
    table = tmp_path / "scores.csv"
    assert main(["--pred", str(pred), "--ref", str(ref), "--csv", str(table)]) == 0
    out = capsys.readouterr().out
    mean_dice = (1 + 1 + 16 / 24 + 0) / 4
    assert f"mean over 4 images: dice {mean_dice:.4f}" in out and "evaluate: scored 4, skipped 0" in out
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "dice", "iou", "precision", "recall", "pred_pixels", "ref_pixels"]
    by_image = {r["image"]: r for r in rows}
    assert [r["image"] for r in rows] == ["empty", "half", "miss", "perfect"]
    assert by_image["half"] == {
        "image": "half",
        "dice": "0.666667",
        "iou": "0.500000",
        "precision": "1.000000",
        "recall": "0.500000",
        "pred_pixels": "8",
        "ref_pixels": "16",
    }
    assert by_image["empty"]["dice"] == "1.000000" and by_image["miss"]["dice"] == "0.000000"


def test_threshold_option(tmp_path, capsys):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    save_png(ref / "a.png", box(0, 2, 0, 2))
    save_png(pred / "a.png", box(0, 2, 0, 2, value=100))  # p = 0.39
    assert main(["--pred", str(pred), "--ref", str(ref), "--threshold", "0.5"]) == 0
    assert "dice 0.0000" in capsys.readouterr().out


def test_missing_prediction_and_size_mismatch(tmp_path, capsys):
    pred, ref, _ = make_folders(tmp_path)
    (pred / "half.png").unlink()
    save_png(pred / "miss.png", np.zeros((H + 2, W)))
    save_png(pred / "extra.png", np.zeros((H, W)))
    table = tmp_path / "scores.csv"
    assert main(["--pred", str(pred), "--ref", str(ref), "--csv", str(table)]) == 1
    captured = capsys.readouterr()
    assert f"ERROR half.png: no prediction half.png in {pred}" in captured.err
    assert "ERROR miss.png: size mismatch" in captured.err and "is 12x12, reference 12x10" in captured.err
    assert f"WARNING {pred / 'extra.png'}: no reference mask" in captured.err
    assert "scored 2, skipped 2" in captured.out
    assert table.read_text().count("\n") == 3  # header + the two scored images


def test_existing_csv_not_overwritten(tmp_path, capsys):
    pred, ref, _ = make_folders(tmp_path)
    table = tmp_path / "scores.csv"
    table.write_text("mine")
    assert main(["--pred", str(pred), "--ref", str(ref), "--csv", str(table)]) == 2
    assert "--overwrite" in capsys.readouterr().err and table.read_text() == "mine"
    assert main(["--pred", str(pred), "--ref", str(ref), "--csv", str(table), "--overwrite"]) == 0
    assert table.read_text().startswith("image,dice")


def test_overlays_for_the_worst(tmp_path, capsys):
    pred, ref, images = make_folders(tmp_path)
    overlays = tmp_path / "overlays"
    argv = ["--pred", str(pred), "--ref", str(ref), "--overlays", str(overlays), "--images", str(images)]
    assert main([*argv, "--worst", "2"]) == 0
    assert sorted(p.name for p in overlays.iterdir()) == ["half_overlay.png", "miss_overlay.png"]
    with Image.open(overlays / "miss_overlay.png") as img:
        assert img.mode == "RGB" and img.size == (W, H + CAPTION)
        rgb = np.array(img)[CAPTION:]
    assert (rgb[6, 8] == (0, 255, 0)).all()  # reference contour (box 5:7, 5:7 grown by 2) in green
    assert (rgb[1, 3] == (255, 0, 0)).all()  # prediction contour (box 0:2, 0:2) in red
    assert (rgb[9, 11] == (200, 150, 200)).all()  # the image elsewhere
    capsys.readouterr()
    assert main([*argv, "--worst", "1"]) == 1  # exists: reported, kept
    assert "miss_overlay.png" in capsys.readouterr().err
    assert main([*argv, "--worst", "1", "--overwrite"]) == 0


def test_overlay_needs_images(tmp_path, capsys):
    pred, ref, _ = make_folders(tmp_path)
    with pytest.raises(SystemExit):
        main(["--pred", str(pred), "--ref", str(ref), "--overlays", str(tmp_path / "o")])
    assert "--overlays needs --images" in capsys.readouterr().err


def test_library_returns_rows(tmp_path):
    pred, ref, _ = make_folders(tmp_path)
    rows, problems = evaluate_folders(pred, ref)
    assert len(rows) == 4 and problems.exit_code() == 0


def test_empty_reference_folder(tmp_path, capsys):
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    assert main(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")]) == 2
    assert "no reference *.png masks" in capsys.readouterr().err


def test_module_help():
    out = subprocess.run(
        [sys.executable, "-m", "stas_pipeline.stages.evaluate", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--worst" in out and "--csv" in out


def test_stas_evaluate_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--help"])
    assert exit_info.value.code == 0 and "usage: stas evaluate" in capsys.readouterr().out
