"""Tests of stas postprocess (tasks/segmentation/postprocess.py): small-component removal, hole filling,
the folder stage."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stas_pipeline import cli
from stas_pipeline.stages.postprocess import main
from stas_pipeline.tasks.segmentation.postprocess import postprocess_mask, remove_small_components

REPO = Path(__file__).resolve().parents[1]


def hand_made() -> np.ndarray:
    """A 5x5 ring (25 pixels, a 1-pixel hole), a 2-pixel diagonal pair, a single speck."""
    mask = np.zeros((12, 12), np.uint8)
    mask[1:6, 1:6] = 255
    mask[3, 3] = 0  # the hole: 24 foreground pixels in the ring
    mask[8, 8] = mask[9, 9] = 255  # diagonal neighbours: one 8-connected component of 2
    mask[10, 2] = 7  # a grey-level speck
    return mask


def test_nothing_by_default():
    mask = hand_made()
    np.testing.assert_array_equal(postprocess_mask(mask), mask > 0)


@pytest.mark.parametrize("min_size, kept", [(1, 27), (2, 26), (3, 24), (24, 24), (25, 0)])
def test_min_size_removes_components_below_it(min_size, kept):
    out = postprocess_mask(hand_made(), min_size=min_size)
    assert out.dtype == bool and int(out.sum()) == kept


def test_diagonal_pixels_are_one_component():
    out = remove_small_components(hand_made(), 2)
    assert out[8, 8] and out[9, 9] and not out[10, 2]


def test_fill_holes():
    out = postprocess_mask(hand_made(), fill_holes=True)
    assert out[3, 3] and int(out.sum()) == 28


def test_border_background_is_not_a_hole():
    mask = np.zeros((5, 5), bool)
    mask[:, 2] = True  # splits the background into two parts, both touching the border
    np.testing.assert_array_equal(postprocess_mask(mask, fill_holes=True), mask)


def test_both_steps_and_any_dimension():
    out = postprocess_mask(hand_made(), min_size=3, fill_holes=True)
    assert int(out.sum()) == 25
    volume = np.zeros((3, 5, 5), bool)
    volume[0, 4, 4] = True
    volume[1:3, 1:3, 1:3] = True
    assert int(postprocess_mask(volume, min_size=2).sum()) == 8


def test_folder_stage(tmp_path, capsys):
    pred, out = tmp_path / "pred", tmp_path / "out"
    pred.mkdir()
    Image.fromarray(hand_made()).save(pred / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(pred / "empty.png")
    (pred / "broken.png").write_bytes(b"not a png")
    assert main(["--pred", str(pred), "--out", str(out), "--min-size", "3", "--fill-holes"]) == 1
    captured = capsys.readouterr()
    assert f"ERROR {pred / 'broken.png'}" in captured.err
    assert "written 2, pixels removed 3, pixels filled 1, skipped 1" in captured.out
    with Image.open(out / "a.png") as img:
        assert img.mode == "L"
        result = np.array(img)
    assert set(np.unique(result)) == {0, 255} and int((result > 0).sum()) == 25
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "empty.png"]


def test_existing_out_refused_then_replaced(tmp_path, capsys):
    pred, out = tmp_path / "pred", tmp_path / "out"
    pred.mkdir()
    out.mkdir()
    Image.fromarray(hand_made()).save(pred / "a.png")
    (out / "mine.txt").write_text("mine")
    assert main(["--pred", str(pred), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["mine.txt"]
    assert main(["--pred", str(pred), "--out", str(out), "--overwrite"]) == 0
    assert [p.name for p in out.iterdir()] == ["a.png"]


def test_threshold_option(tmp_path):
    pred, out = tmp_path / "pred", tmp_path / "out"
    pred.mkdir()
    Image.fromarray(hand_made()).save(pred / "a.png")
    assert main(["--pred", str(pred), "--out", str(out), "--threshold", "0.1"]) == 0
    with Image.open(out / "a.png") as img:
        assert int((np.array(img) > 0).sum()) == 26  # the grey speck (7) is below 0.1 * 255


def test_empty_pred_folder(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    assert main(["--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "out")]) == 2
    assert "no *.png masks" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_module_help():
    out = subprocess.run(
        [sys.executable, "-m", "stas_pipeline.stages.postprocess", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--min-size" in out and "--fill-holes" in out


def test_stas_postprocess_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["postprocess", "--help"])
    assert exit_info.value.code == 0 and "usage: stas postprocess" in capsys.readouterr().out


def test_study_scores_every_setting_and_prints_the_best(tmp_path, capsys):
    """Probability maps whose reference is the > 0.6 region plus a hole: the study finds the 0.6 cut and hole
    filling; a speck of 0.9 smaller than 100 pixels is removed by min size 100."""
    probs, refs = tmp_path / "probs", tmp_path / "refs"
    probs.mkdir()
    refs.mkdir()
    ramp = np.tile(np.linspace(0, 1, 80), (60, 1))
    ref = ramp > 0.6
    pred = ramp.copy()
    pred[25:35, 60:70] = 0.0  # a hole in the prediction, not in the reference
    pred[5:9, 5:9] = 0.9  # a 16-pixel speck
    for name in ("a", "b"):
        Image.fromarray(np.rint(pred * 255).astype(np.uint8)).save(probs / f"{name}.png")
        Image.fromarray(ref.astype(np.uint8) * 255).save(refs / f"{name}.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(probs / "c.png")  # no reference: not scored
    csv_path = tmp_path / "study.csv"
    assert main(["--pred", str(probs), "--ref", str(refs), "--study", str(csv_path), "--thresholds", "0.5", "0.6",
                 "--min-sizes", "0", "100"]) == 0
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == (4 + 3) * 2 * 2 and rows[0]["images"] == "2"  # seeds 0 0.6 0.7 0.8 at cut 0.5; 0 0.7 0.8
    assert (rows[0]["threshold"], rows[0]["min_size"], rows[0]["seed_threshold"], rows[0]["fill_holes"]) == (
        "0.6", "100", "0.0", "True")
    assert float(rows[0]["dice"]) == pytest.approx(1.0, abs=2e-3) and rows[0]["better"] == "2"
    assert "--threshold 0.6 --min-size 100 --fill-holes" in capsys.readouterr().out
    assert main(["--pred", str(probs), "--ref", str(refs), "--study", str(csv_path)]) == 2  # exists: refused
    with pytest.raises(SystemExit):
        main(["--pred", str(probs), "--study", str(tmp_path / "x.csv")])  # --study needs --ref


def test_seed_threshold_drops_faint_components_a_low_cut_keeps(tmp_path, capsys):
    """A double threshold: the reference is the > 0.5 part of a ramp; a faint 0.55 blob outside it survives the
    0.5 cut, and a 0.6 cut loses the ramp's 0.5-0.6 band; cut 0.5 with seed 0.6 gets both right, in the study
    and in the folder stage."""
    probs, refs, out = tmp_path / "probs", tmp_path / "refs", tmp_path / "out"
    probs.mkdir()
    refs.mkdir()
    ramp = np.tile(np.linspace(0, 1, 80), (60, 1))
    ref = ramp > 0.5
    pred = ramp.copy()
    pred[5:20, 5:20] = 0.55  # 225 pixels, peak 0.55, not in the reference
    Image.fromarray(np.rint(pred * 255).astype(np.uint8)).save(probs / "a.png")
    Image.fromarray(ref.astype(np.uint8) * 255).save(refs / "a.png")
    csv_path = tmp_path / "study.csv"
    assert main(["--pred", str(probs), "--ref", str(refs), "--study", str(csv_path), "--thresholds", "0.5", "0.6",
                 "--min-sizes", "0", "--seed-thresholds", "0.6"]) == 0
    rows = {(r["threshold"], r["seed_threshold"], r["fill_holes"]): float(r["dice"])
            for r in csv.DictReader(open(csv_path))}
    assert set(rows) == {(t, s, f) for t, s in [("0.5", "0.0"), ("0.5", "0.6"), ("0.6", "0.0")]
                         for f in ("False", "True")}
    assert rows[("0.5", "0.6", "False")] == pytest.approx(1.0, abs=5e-3)
    assert max(rows[("0.5", "0.0", "False")], rows[("0.6", "0.0", "False")]) < 0.98
    assert "--threshold 0.5 --min-size 0 --seed-threshold 0.6" in capsys.readouterr().out
    assert main(["--pred", str(probs), "--out", str(out), "--threshold", "0.5", "--seed-threshold", "0.6"]) == 0
    kept = np.asarray(Image.open(out / "a.png")) > 0
    assert not kept[5:20, 5:20].any() and np.array_equal(kept, ref & ~(pred == 0.55))
