"""Every file-based stage on a batch of good files mixed with bad ones (made here from real-looking images):
no traceback, each bad file named on its own ERROR line, the good outputs written, the exit code as the README
says (1: some inputs skipped), and a second run without --overwrite refused with nothing changed.

The stages that train or predict are covered end to end elsewhere: four-channel, grey and undecodable images
through make-datalist, build-lmdb, MONAI's runner and predict (test_image_policy.py), a corrupt cache
(test_cache_integrity.py), labels a bundle cannot learn (test_label_checks.py), slides and their annotations
(test_bad_input_slides.py), exit codes when nothing can be done (test_exit_codes.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stas_pipeline import cli
from stas_pipeline.core.synthetic import make_dataset


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:300])
    return path


def not_an_image(path: Path) -> Path:
    path.write_text("not an image\n")
    return path


def labelme(path: Path, image: str, points: list, height: int = 80, width: int = 96) -> Path:
    path.write_text(json.dumps({"imagePath": image, "imageHeight": height, "imageWidth": width, "shapes": [
        {"label": "STAS", "shape_type": "polygon", "points": points}]}))
    return path


def case_labelme_to_masks(root: Path) -> tuple[list[str], list[str], list[str]]:
    images, _ = make_dataset(root, n=3)
    notes = root / "annotations"
    notes.mkdir()
    for p in sorted(images.iterdir()):
        labelme(notes / f"{p.stem}.json", p.name, [[10, 10], [50, 12], [30, 40]])
    (notes / "broken.json").write_text('{"shapes": [')
    labelme(notes / "nowhere.json", "nowhere.jpg", [[10, 10], [50, 12], [30, 40]])
    argv = ["labelme-to-masks", str(notes), "--images", str(images), "--out", str(root / "out")]
    return argv, ["broken.json", "nowhere.json"], [f"{p.stem}.png" for p in sorted(images.iterdir())]


def case_make_datalist(root: Path) -> tuple[list[str], list[str], list[str]]:
    images, masks = make_dataset(root, n=12)
    truncated(images / "case_003.jpg")
    not_an_image(masks / "case_005.png")
    (root / "out").mkdir()
    return (["make-datalist", "--images", str(images), "--masks", str(masks), "--folds", "2",
             "--out", str(root / "out" / "datalist.json")], ["case_003.jpg", "case_005.png"], ["datalist.json"])


def case_ensemble(root: Path) -> tuple[list[str], list[str], list[str]]:
    members = [make_dataset(root / name, n=4, seed=seed)[1] for seed, name in enumerate("abc")]
    not_an_image(members[1] / "case_002.png")
    return (["ensemble", *map(str, members), "--out", str(root / "out")], ["case_002.png"],
            ["case_000.png", "case_001.png", "case_003.png"])


def case_postprocess(root: Path) -> tuple[list[str], list[str], list[str]]:
    _, masks = make_dataset(root, n=4)
    not_an_image(masks / "case_001.png")
    return (["postprocess", "--pred", str(masks), "--out", str(root / "out"), "--min-size", "5"], ["case_001.png"],
            ["case_000.png", "case_002.png", "case_003.png"])


def case_evaluate(root: Path) -> tuple[list[str], list[str], list[str]]:
    _, masks = make_dataset(root / "ref", n=4)
    _, pred = make_dataset(root / "pred", n=4, seed=1)
    not_an_image(pred / "case_003.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(pred / "case_001.png")  # the wrong size
    (root / "out").mkdir()
    return (["evaluate", "--pred", str(pred), "--ref", str(masks), "--csv", str(root / "out" / "scores.csv")],
            ["case_003.png", "case_001.png"], ["scores.csv"])


def case_rle_encode(root: Path) -> tuple[list[str], list[str], list[str]]:
    _, masks = make_dataset(root, n=3)
    Image.fromarray(np.zeros((80, 96), np.uint8)).save(masks / "lossy.jpg")
    not_an_image(masks / "case_002.png")
    (root / "out").mkdir()
    files = [str(p) for p in sorted(masks.iterdir())]
    return (["rle", "encode", *files, "--out", str(root / "out" / "masks.csv")], ["lossy.jpg", "case_002.png"],
            ["masks.csv"])


def case_pseudo_label(root: Path) -> tuple[list[str], list[str], list[str]]:
    images = [root / f"t{i}.png" for i in range(6)]
    for i, path in enumerate(images):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(path)
    datalist = {"task": "classification", "label_kind": "number",
                "training": [{"image": p.name, "label": i % 2, "fold": i % 2} for i, p in enumerate(images[:4])],
                "test": [{"image": p.name} for p in images[4:]]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    (root / "preds.csv").write_text(f"image,prob\n{images[4]},0.99\n{images[5]},abc\n{root / 'nowhere.png'},0.01\n")
    (root / "out").mkdir()
    return (["pseudo-label", "--datalist", str(root / "datalist.json"), "--predictions", str(root / "preds.csv"),
             "--out", str(root / "out" / "round1.json")], ["t5.png", "nowhere.png"], ["round1.json"])


CASES: dict[str, Callable[[Path], tuple[list[str], list[str], list[str]]]] = {
    "labelme-to-masks": case_labelme_to_masks, "make-datalist": case_make_datalist, "ensemble": case_ensemble,
    "postprocess": case_postprocess, "evaluate": case_evaluate, "rle-encode": case_rle_encode,
    "pseudo-label": case_pseudo_label,
}


@pytest.mark.parametrize("stage", CASES)
def test_good_files_go_on_bad_files_are_named(stage, tmp_path, capfd):
    argv, bad, good = CASES[stage](tmp_path)
    out = tmp_path / "out"
    code = cli.main(argv)
    err = capfd.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("ERROR ")]
    for name in bad:
        assert any(name in line for line in errors), f"{name} not named in: {errors}"
    assert all(name in {p.name for p in out.iterdir()} for name in good), sorted(p.name for p in out.iterdir())

    before = snapshot(out)
    assert cli.main(argv) in (1, 2)  # an existing output without --overwrite: refused, nothing touched
    again = capfd.readouterr().err
    assert "Traceback" not in again and "--overwrite" in again
    assert snapshot(out) == before
