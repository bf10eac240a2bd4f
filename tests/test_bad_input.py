"""Every file-based stage on a batch of good files mixed with bad ones (made here from real-looking images):
no traceback, each bad file named on its own ERROR line, the good outputs written, the exit code as the README
says (1: some inputs skipped), and a second run without --overwrite refused with nothing changed. The same stages
given only bad files exit 2 (nothing could be done) and write nothing; ``export`` refuses a submission with any
bad file (exit 2, nothing written).

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


def case_experiments(root: Path) -> tuple[list[str], list[str], list[str]]:
    runs = root / "runs"
    for name, fold in (("good", 0), ("good", 1), ("cut", 0)):
        info = {"bundle": "fundus_lite0", "task": "classification", "fold": fold, "epochs": 2, "lr": 0.001}
        (runs / name / f"fold{fold}").mkdir(parents=True)
        (runs / name / f"fold{fold}" / "metrics.json").write_text(json.dumps(
            {**info, "best_epoch": 2, "best_val_auc": 0.8 + 0.01 * fold,
             "history": [{"epoch": e, "loss": 1.0 / e, "val_auc": 0.7 + 0.05 * e} for e in (1, 2)]}))
        (runs / name / f"fold{fold}" / "best.json").write_text(json.dumps({**info, "epoch": 2, "val_auc": 0.8}))
    cut = runs / "cut" / "fold0" / "metrics.json"
    cut.write_bytes(cut.read_bytes()[:60])  # a run killed while writing
    (root / "out").mkdir()
    return (["experiments", str(runs), "--out", str(root / "out" / "runs.md"), "--csv", str(root / "out" / "runs.csv")],
            ["cut"], ["runs.md", "runs.csv"])


CASES: dict[str, Callable[[Path], tuple[list[str], list[str], list[str]]]] = {
    "labelme-to-masks": case_labelme_to_masks, "make-datalist": case_make_datalist, "ensemble": case_ensemble,
    "postprocess": case_postprocess, "evaluate": case_evaluate, "rle-encode": case_rle_encode,
    "pseudo-label": case_pseudo_label, "experiments": case_experiments,
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


def all_bad_labelme(root: Path) -> list[str]:
    images, _ = make_dataset(root, n=2)
    notes = root / "annotations"
    notes.mkdir()
    (notes / "broken.json").write_text('{"shapes": [')
    labelme(notes / "nowhere.json", "nowhere.jpg", [[10, 10], [50, 12], [30, 40]])
    return ["labelme-to-masks", str(notes), "--images", str(images), "--out", str(root / "out")]


def all_bad_ensemble(root: Path) -> list[str]:
    members = [make_dataset(root / name, n=2, seed=seed)[1] for seed, name in enumerate("ab")]
    for path in members[0].iterdir():
        not_an_image(path)
    return ["ensemble", *map(str, members), "--out", str(root / "out")]


def all_bad_postprocess(root: Path) -> list[str]:
    _, masks = make_dataset(root, n=2)
    for path in masks.iterdir():
        not_an_image(path)
    return ["postprocess", "--pred", str(masks), "--out", str(root / "out"), "--min-size", "5"]


def all_bad_evaluate(root: Path) -> list[str]:
    _, masks = make_dataset(root / "ref", n=2)
    _, pred = make_dataset(root / "pred", n=2, seed=1)
    for path in pred.iterdir():
        not_an_image(path)
    return ["evaluate", "--pred", str(pred), "--ref", str(masks), "--csv", str(root / "out" / "scores.csv")]


def all_bad_rle_encode(root: Path) -> list[str]:
    _, masks = make_dataset(root, n=2)
    for path in masks.iterdir():
        not_an_image(path)
    return ["rle", "encode", *map(str, sorted(masks.iterdir())), "--out", str(root / "out" / "masks.csv")]


def all_bad_export(root: Path) -> list[str]:
    images, masks = make_dataset(root, n=3)
    not_an_image(masks / "case_001.png")  # one bad mask refuses the whole submission
    return ["export", "--pred", str(masks), "--test-images", str(images), "--out", str(root / "out" / "s.zip")]


ALL_BAD: dict[str, Callable[[Path], list[str]]] = {
    "labelme-to-masks": all_bad_labelme, "ensemble": all_bad_ensemble, "postprocess": all_bad_postprocess,
    "evaluate": all_bad_evaluate, "rle-encode": all_bad_rle_encode, "export": all_bad_export,
}


@pytest.mark.parametrize("stage", ALL_BAD)
def test_nothing_could_be_done_exits_2_and_writes_nothing(stage, tmp_path, capfd):
    argv = ALL_BAD[stage](tmp_path)
    (tmp_path / "out").mkdir(exist_ok=True)
    code = cli.main(argv)
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and any(line.startswith("ERROR ") for line in err.splitlines())
    assert snapshot(tmp_path / "out") == {}
