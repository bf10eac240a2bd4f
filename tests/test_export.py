"""Tests of stas export (tasks/segmentation/export.py): zip contents, refusals, --allow-missing, no overwriting."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stas_pipeline import cli
from stas_pipeline.stages.export import main

REPO = Path(__file__).resolve().parents[1]
SIZES = {"img_a": (16, 10), "img_b": (12, 8), "img_c": (9, 9)}  # stem -> (width, height)


def make_case(tmp_path: Path) -> tuple[Path, Path]:
    """Test images (JPEG, PNG, TIFF) and a matching grey-level prediction for each."""
    images, pred = tmp_path / "images", tmp_path / "pred"
    images.mkdir()
    pred.mkdir()
    for (stem, (w, h)), suffix in zip(SIZES.items(), (".jpg", ".png", ".tif"), strict=True):
        Image.new("RGB", (w, h), (180, 120, 190)).save(images / f"{stem}{suffix}")
        mask = np.zeros((h, w), np.uint8)
        mask[1:4, 2:5] = [[1, 128, 255]] * 3  # any grey level > 0 becomes 255
        Image.fromarray(mask).save(pred / f"{stem}.png")
    return images, pred


def zip_masks(path: Path) -> dict[str, Image.Image]:
    with zipfile.ZipFile(path) as zf:
        out = {}
        for name in zf.namelist():
            img = Image.open(io.BytesIO(zf.read(name)))
            img.load()
            out[name] = img
        return out


def run(images: Path, pred: Path, out: Path, *extra: str) -> int:
    return main(["--pred", str(pred), "--out", str(out), "--test-images", str(images), *extra])


def test_zip_contents(tmp_path, capsys):
    images, pred = make_case(tmp_path)
    out = tmp_path / "submission.zip"
    assert run(images, pred, out) == 0
    masks = zip_masks(out)
    assert sorted(masks) == ["img_a.png", "img_b.png", "img_c.png"]
    for name, img in masks.items():
        assert img.mode == "L" and img.size == SIZES[name[:-4]]
        array = np.array(img)
        assert set(np.unique(array)) == {0, 255} and int((array == 255).sum()) == 9
    printed = capsys.readouterr().out
    assert f"wrote {out}: 3 masks" in printed and f"({out.stat().st_size} bytes)" in printed


def test_rgb_and_palette_predictions_are_made_single_channel(tmp_path, capsys):
    images, pred = make_case(tmp_path)
    with Image.open(pred / "img_a.png") as img:
        img.convert("RGB").save(pred / "img_a.png")
    with Image.open(pred / "img_b.png") as img:
        img.convert("P").save(pred / "img_b.png")
    assert run(images, pred, tmp_path / "s.zip") == 0
    assert "WARNING" in capsys.readouterr().err
    for img in zip_masks(tmp_path / "s.zip").values():
        assert img.mode == "L" and int((np.array(img) == 255).sum()) == 9


def test_missing_mask_refused(tmp_path, capsys):
    images, pred = make_case(tmp_path)
    (pred / "img_b.png").unlink()
    out = tmp_path / "s.zip"
    assert run(images, pred, out) == 2
    err = capsys.readouterr().err
    assert f"ERROR {images / 'img_b.png'}: no mask img_b.png (pass --allow-missing" in err
    assert f"ERROR {out}: not written" in err and not out.exists()
    assert list(tmp_path.glob(".s.zip*")) == []


def test_allow_missing(tmp_path, capsys):
    images, pred = make_case(tmp_path)
    (pred / "img_b.png").unlink()
    out = tmp_path / "s.zip"
    assert run(images, pred, out, "--allow-missing") == 0
    assert "WARNING" in capsys.readouterr().err
    assert sorted(zip_masks(out)) == ["img_a.png", "img_c.png"]


def test_extra_prediction_refused(tmp_path, capsys):
    images, pred = make_case(tmp_path)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(pred / "stray.png")
    np.save(pred / "img_a.npy", np.zeros((10, 16)))  # probabilities beside the masks are ignored
    out = tmp_path / "s.zip"
    assert run(images, pred, out, "--allow-missing") == 2
    err = capsys.readouterr().err
    assert f"ERROR {pred / 'stray.png'}: no test image with this name" in err and not out.exists()


def test_size_mismatch_refused(tmp_path, capsys):
    images, pred = make_case(tmp_path)
    Image.fromarray(np.zeros((10, 15), np.uint8)).save(pred / "img_a.png")
    out = tmp_path / "s.zip"
    assert run(images, pred, out) == 2
    err = capsys.readouterr().err
    assert f"ERROR {images / 'img_a.jpg'}: mask {pred / 'img_a.png'} is 15x10, the image 16x10" in err
    assert not out.exists()


def test_unreadable_mask_refused(tmp_path, capsys):
    images, pred = make_case(tmp_path)
    (pred / "img_c.png").write_bytes(b"broken")
    assert run(images, pred, tmp_path / "s.zip") == 2
    assert "cannot read mask" in capsys.readouterr().err and not (tmp_path / "s.zip").exists()


def test_existing_zip_never_overwritten(tmp_path, capsys):
    images, pred = make_case(tmp_path)
    out = tmp_path / "s.zip"
    out.write_bytes(b"previous")
    assert run(images, pred, out) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"previous"
    assert run(images, pred, out, "--overwrite") == 0
    assert len(zip_masks(out)) == 3


def test_same_masks_same_zip_bytes(tmp_path):
    images, pred = make_case(tmp_path)
    assert run(images, pred, tmp_path / "1.zip") == 0
    assert run(images, pred, tmp_path / "2.zip") == 0
    assert (tmp_path / "1.zip").read_bytes() == (tmp_path / "2.zip").read_bytes()


def test_test_images_from_a_datalist(tmp_path):
    images, pred = make_case(tmp_path)
    datalist = tmp_path / "lists" / "datalist.json"
    datalist.parent.mkdir()
    test = [{"image": "../images/img_a.jpg"}, {"image": "../images/img_c.tif"}]
    datalist.write_text(json.dumps({"training": [], "test": test}))
    out = tmp_path / "s.zip"
    argv = ["--pred", str(pred), "--out", str(out), "--datalist", str(datalist)]
    assert main(argv) == 2  # img_b.png has no test image
    (pred / "img_b.png").unlink()
    assert main(argv) == 0 and sorted(zip_masks(out)) == ["img_a.png", "img_c.png"]
    datalist.write_text(json.dumps({"training": []}))
    assert main([*argv, "--overwrite"]) == 2


def test_test_images_needed(tmp_path, capsys):
    images, pred = make_case(tmp_path)
    with pytest.raises(SystemExit):
        main(["--pred", str(pred), "--out", str(tmp_path / "s.zip")])
    (tmp_path / "none").mkdir()
    assert run(tmp_path / "none", pred, tmp_path / "s.zip") == 2
    assert "none: no images (" in capsys.readouterr().err  # core.images.images_in_folder's message


def test_module_help():
    out = subprocess.run(
        [sys.executable, "-m", "stas_pipeline.stages.export", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--allow-missing" in out and "--datalist" in out


def test_stas_export_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--help"])
    assert exit_info.value.code == 0 and "usage: stas export" in capsys.readouterr().out
