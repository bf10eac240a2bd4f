"""Labels a bundle cannot learn are refused before the first step, in one line naming the bundle to use; a key
metric that is not a number ends the run. Real bundles through MONAI's runner, real images and cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import run

from stas_pipeline import cli
from stas_pipeline.core.datalist import write_datalist
from stas_pipeline.core.label_checks import LabelError, values_text
from stas_pipeline.core.synthetic import make_fundus_dataset

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
CPU = {"device": "cpu", "amp": False, "num_workers": 0, "encoder_weights": "none", "image_size": SIZE,
       "epochs": 1, "batch_size": 4}


@pytest.fixture(scope="module")
def fundus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 fundus-like images (labels 0/1) and their 32 px cache for the image-level bundles."""
    root = tmp_path_factory.mktemp("labels")
    make_fundus_dataset(root / "data", n=12, size=64, seed=0)
    assert cli.main(["make-datalist", "--labels-csv", str(root / "data" / "labels.csv"), "--folds", "2",
                     "--out", str(root / "binary.json")]) == 0
    assert cli.main(["build-lmdb", "--datalist", str(root / "binary.json"), "--out", str(root / "cache"),
                     "--bundle", "fundus_lite0", "--image-size", str(SIZE), "--no-progress"]) == 0
    return root


def relabel(root: Path, name: str, label_of, task: str = "classification", kind: str = "number",
            fold_of=None) -> Path:
    """A datalist of the fixture's images with ``label_of(i, image)`` as labels (and ``fold_of(i, label)``)."""
    images = sorted((root / "data" / "images").iterdir())
    training = []
    for i, image in enumerate(images):
        label = label_of(i, image)
        training.append({"image": str(image.relative_to(root)), "label": label,
                         "fold": fold_of(i, label) if fold_of else i % 2})
    path = root / f"{name}.json"
    write_datalist(path, {"training": training, "test": []}, task, kind, overwrite=True)
    return path


def run_bundle(bundle: str, **overrides) -> None:
    cwd = os.getcwd()
    os.chdir(REPO)  # the bundles reference bundles/common.json from the repository root
    try:
        run(run_id="training", config_file=f"bundles/{bundle}.json", **{**CPU, **overrides})
    finally:
        os.chdir(cwd)


def command(bundle: str, datalist: Path, root: Path, out: Path, epochs: int = 1) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", f"bundles/{bundle}.json",
            "--dataset_dir", str(root), "--datalist", str(datalist), "--cache_dir", str(root / "cache"),
            "--image_size", str(SIZE), "--epochs", str(epochs), "--batch_size", "4", "--encoder_weights", "none",
            "--device", "cpu", "--amp", "false", "--num_workers", "0", "--output_dir", str(out)]


def label_error(err: BaseException) -> LabelError | None:
    while err is not None and not isinstance(err, LabelError):
        err = err.__cause__ or err.__context__
    return err


@pytest.mark.parametrize(
    ("bundle", "labels", "expected", "hint"),
    [
        ("fundus_lite0", "grades", "fundus_lite0 learns labels 0/1, not labels 0-4",
         "a grading bundle (e.g. grading_lite0) learns labels 0-4"),
        ("grading_lite0", "grades_0_6", "grading_lite0 learns labels 0-4, not labels 0-6",
         "no bundle here learns them"),
        ("deeplab_lite0", "binary", "deeplab_lite0 learns masks (a mask path per image), not labels 0/1",
         "a classification bundle (e.g. fundus_lite0) learns labels 0/1"),
        ("fundus_lite0", "masks", "fundus_lite0 learns labels 0/1, not mask paths",
         "a segmentation bundle (e.g. deeplab_lite0) learns masks (a mask path per image)"),
    ],
)
def test_a_bundle_refuses_labels_it_cannot_learn_before_training(bundle, labels, expected, hint, fundus, tmp_path):
    datalist = {
        "grades": lambda: relabel(fundus, "grades", lambda i, _: i % 5),
        "grades_0_6": lambda: relabel(fundus, "grades_0_6", lambda i, _: i % 7),
        "binary": lambda: fundus / "binary.json",
        "masks": lambda: relabel(fundus, "masks", lambda _, image: str(image.relative_to(fundus)),
                                 task="segmentation", kind="mask"),
    }[labels]()
    with pytest.raises(Exception) as err:
        run_bundle(bundle, dataset_dir=str(fundus), datalist=str(datalist), cache_dir=str(fundus / "cache"),
                   output_dir=str(tmp_path / "runs"))
    found = label_error(err.value)
    assert found is not None, err.value
    message = str(found)
    assert message.startswith(f"{datalist}: {expected} (e.g. fundus_") and message.endswith(f"); {hint}")
    assert not (tmp_path / "runs").exists()  # refused before anything (the TensorBoard writer) was made


def test_the_refusal_is_one_error_line_from_the_command_line(fundus, tmp_path):
    datalist = relabel(fundus, "grades", lambda i, _: i % 5)
    out = subprocess.run(command("fundus_lite0", datalist, fundus, tmp_path / "runs"), cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    errors = [line for line in (out.stderr + out.stdout).splitlines() if "ERROR" in line]
    assert len(errors) == 1 and errors[0].startswith(f"ERROR {datalist}: fundus_lite0 learns labels 0/1")
    assert errors[0].endswith("a grading bundle (e.g. grading_lite0) learns labels 0-4")
    assert not (tmp_path / "runs").exists()


def test_a_nan_key_metric_is_never_a_best_and_ends_the_run(fundus, tmp_path):
    """Binary labels, but the validation fold holds label 0 only: AUC is nan."""
    datalist = relabel(fundus, "one_class", lambda i, _: int(i % 3 == 0), fold_of=lambda i, label: 0 if
                       (label == 0 and i < 6) else 1)
    out = subprocess.run(command("fundus_lite0", datalist, fundus, tmp_path / "runs", epochs=2), cwd=REPO,
                         capture_output=True, text=True)
    run_dir = tmp_path / "runs" / "fundus_lite0" / "fold0"
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "Traceback" not in text
    assert "new best" not in text.lower()
    errors = [line for line in text.splitlines() if "ERROR" in line]
    assert errors == [f"ERROR {run_dir}: validation gave val_auc nan at epoch 1; no checkpoint is judged by it "
                      "(a validation fold whose labels are all one class has no AUC: check the fold's labels)"]
    assert not (run_dir / "best.pt").exists() and not (run_dir / "best.json").exists()


def test_labels_that_fit_train(fundus, tmp_path):
    """Grades 0-4 are what a grading bundle learns; 0/1 entries in a grading datalist are grades too."""
    grades = relabel(fundus, "grades", lambda i, _: i % 5)
    run_bundle("grading_lite0", dataset_dir=str(fundus), datalist=str(grades), cache_dir=str(fundus / "cache"),
               output_dir=str(tmp_path / "runs"))
    assert (tmp_path / "runs" / "grading_lite0" / "fold0" / "best.pt").is_file()


def test_values_are_named_as_a_user_would():
    assert values_text([1, 0, 1]) == "0/1"
    assert values_text([4, 0, 2, 3, 1]) == "0-4"
    assert values_text([0.5, 2]) == "0.5/2"
    assert values_text(range(0, 20, 2)) == "0..18 (10 values)"
