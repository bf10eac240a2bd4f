"""stas export-model: tiny runs of every task (DeepLabV3+ and U-Net Lite0 segmentation, fundus classification,
grading with its three heads) exported to model-zoo bundles; TorchScript and ONNX Runtime against PyTorch on real
images through the runs' chains; each bundle run by MONAI's own CLI from elsewhere writes what ``stas predict``
writes; the metadata against MONAI's schema; an existing --out left alone; ``onnx_model_for`` beside a run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import prepare_fundus, train

from stas_pipeline import cli
from stas_pipeline.core.exported import (
    TOLERANCE,
    ExportError,
    OnnxRuntimeModel,
    exported_model,
    input_size,
    onnx_model_for,
    running_bundle_root,
)
from stas_pipeline.core.lmdb_cache import to_uint8
from stas_pipeline.core.trained_runs import load_trained_run, run_info_of
from stas_pipeline.tasks.classification.inference import predict_scores
from stas_pipeline.tasks.grading.metrics import grade_of
from stas_pipeline.tasks.model_zoo import bundle_runs
from stas_pipeline.tasks.segmentation.inference import predict_images

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "monai" / "meta_schema_20240725.json"
HEADS = ("regression", "cumulative", "expectation")


def image_folder(folder: Path, images: list[Path]) -> Path:
    folder.mkdir()
    for image in images:
        (folder / image.name).symlink_to(image)
    return folder


def export(out: Path, *checkpoints: Path) -> Path:
    assert cli.main(["export-model", *map(str, checkpoints), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def segmentation(synthetic_dataset, tmp_path_factory) -> tuple[list[Path], Path, Path]:
    """deeplab_lite0 and unet_lite0 at 64 px on the tiny datalist, exported as one bundle: the checkpoints, the
    bundle, a folder of three H&E-like images."""
    root = tmp_path_factory.mktemp("segmentation")
    checkpoints = [train(synthetic_dataset, bundle, datalist=str(synthetic_dataset / "tiny.json"),
                         cache_dir=str(synthetic_dataset / "cache_64"), image_size=64,
                         output_dir=str(root / "runs")) / "best.pt"
                   for bundle in ("deeplab_lite0", "unet_lite0")]
    images = image_folder(root / "images", sorted((synthetic_dataset / "images").glob("*"))[:3])
    return checkpoints, export(root / "bundle", *checkpoints), images


@pytest.fixture(scope="module")
def classification(tmp_path_factory) -> tuple[list[Path], Path, Path]:
    """fundus_lite0 on 30 fundus-like images (labels 0/1, 2 folds, 32 px) with timm's tiny ``test_efficientnet``
    for its classifier (the grading runs export Lite0 classifiers; this run is exported four times, each a few
    seconds instead of tens), exported: the checkpoint, the bundle, a folder of four of the images."""
    root = tmp_path_factory.mktemp("fundus")
    prepare_fundus(root)
    checkpoints = [train(root, "fundus_lite0", batch_size=8, model_name="test_efficientnet") / "best.pt"]
    images = image_folder(root / "cls_images", sorted((root / "data" / "images").glob("*"))[:4])
    return checkpoints, export(root / "cls_bundle", *checkpoints), images


@pytest.fixture(scope="module")
def grading(graded, grading_runs, tmp_path_factory) -> tuple[list[Path], Path, Path]:
    """The three heads, one run each (folds 0, 1, 0), in one bundle."""
    root = tmp_path_factory.mktemp("grading_export")
    checkpoints = [grading_runs[head] / "best.pt" for head in HEADS]
    images = image_folder(root / "grading_images", sorted((graded / "data" / "images").glob("*"))[4:8])
    return checkpoints, export(root / "grading_bundle", *checkpoints), images


def members(bundle: Path) -> list[str]:
    return json.loads((bundle / "configs" / "inference.json").read_text())["members"]


def chain_inputs(checkpoint: Path, images: Path) -> torch.Tensor:
    """The images of ``images`` through the run's own chain, as inference sees them: one batch."""
    trained = load_trained_run(checkpoint, run_info_of(checkpoint))
    inputs = []
    for path in sorted(images.iterdir()):
        image = torch.from_numpy(to_uint8(trained.preprocessing({"image": str(path)})["image"]))
        inputs.append(torch.as_tensor(trained.transform({"image": image})["image"]).float())
    return torch.stack(inputs)


@pytest.mark.parametrize("family", ["segmentation", "classification", "grading"])
def test_torchscript_and_onnxruntime_give_the_networks_outputs(family, request):
    """Each member's TorchScript and ONNX files against its PyTorch network, on real images through the run's
    chain, at the batch of all of them and at a batch of one (the batch axis is dynamic)."""
    checkpoints, bundle, images = request.getfixturevalue(family)
    for checkpoint, member in zip(checkpoints, members(bundle), strict=True):
        x = chain_inputs(checkpoint, images)
        assert tuple(x.shape[-2:]) == input_size(run_info_of(checkpoint))
        network = load_trained_run(checkpoint, run_info_of(checkpoint)).model
        folder = bundle / "models" / member
        with torch.no_grad():
            expected = network(x)
            for backend in ("torchscript", "onnxruntime"):
                model = exported_model(folder, backend)
                got = model(x)
                assert got.shape == expected.shape and got.dtype == torch.float32
                diff = (got - expected).abs().max().item()
                print(f"{member} {backend}: max |diff| {diff:.2e}")
                assert diff <= TOLERANCE
                torch.testing.assert_close(model(x[:1]), expected[:1], atol=TOLERANCE, rtol=0)


def test_segmentation_masks_are_identical_on_every_backend(segmentation, tmp_path):
    """The bundle's two members averaged with flip TTA: the same mask bytes from the state dicts, TorchScript and
    ONNX Runtime."""
    _, bundle, images = segmentation
    written = {}
    for backend in ("torch", "torchscript", "onnxruntime"):
        runs = bundle_runs(bundle, members(bundle), backend=backend)
        predict_images(runs, sorted(images.iterdir()), tmp_path / backend, tta="hv")
        written[backend] = {p.name: p.read_bytes() for p in sorted((tmp_path / backend).iterdir())}
    assert len(written["torch"]) == 3
    assert written["torchscript"] == written["torch"] and written["onnxruntime"] == written["torch"]


def test_grades_are_identical_on_every_backend(grading):
    """The three heads' scores within the tolerance and the same grades from every backend."""
    _, bundle, images = grading
    rows = {}
    for backend in ("torch", "torchscript", "onnxruntime"):
        runs = bundle_runs(bundle, members(bundle), backend=backend)
        rows[backend] = predict_scores(runs, sorted(images.iterdir()), tta="hv", value="score", grade_of=grade_of)[1]
    for backend in ("torchscript", "onnxruntime"):
        assert [r["grade"] for r in rows[backend]] == [r["grade"] for r in rows["torch"]]
        np.testing.assert_allclose([r["score"] for r in rows[backend]], [r["score"] for r in rows["torch"]],
                                   atol=TOLERANCE)


def monai_run(bundle: Path, images: Path, out: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """The bundle run by MONAI's own CLI from ``cwd``, with relative paths where they can be."""
    cwd.mkdir(exist_ok=True)
    config = os.path.relpath(bundle / "configs" / "inference.json", cwd)
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", config, "--input_dir",
                           str(images), "--output_dir", str(out), "--num_workers", "0", *extra],
                          cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_segmentation_bundle_through_monais_cli_writes_what_stas_predict_writes(segmentation, tmp_path):
    checkpoints, bundle, images = segmentation
    done = monai_run(bundle, images, tmp_path / "bundle_out", tmp_path / "elsewhere")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predict: written 3, skipped 0" in done.stdout
    assert cli.main(["predict", "--checkpoint", *map(str, checkpoints), "--images", str(images), "--out",
                     str(tmp_path / "predict_out"), "--tta", "hv", "--workers", "0", "--device", "cpu"]) == 0
    masks = sorted((tmp_path / "predict_out").iterdir())
    assert [p.name for p in masks] == sorted(p.name for p in (tmp_path / "bundle_out").iterdir())
    assert all((tmp_path / "bundle_out" / p.name).read_bytes() == p.read_bytes() for p in masks)
    (tmp_path / "bundle_out" / masks[0].name).write_bytes(b"mine")  # "--overwrite false" is a word, not True
    again = monai_run(bundle, images, tmp_path / "bundle_out", tmp_path / "elsewhere", "--overwrite", "false")
    assert (tmp_path / "bundle_out" / masks[0].name).read_bytes() == b"mine", again.stdout[-2000:]


@pytest.mark.parametrize("family", ["classification", "grading"])
def test_image_level_bundle_through_monais_cli_writes_what_stas_predict_writes(family, request, tmp_path):
    checkpoints, bundle, images = request.getfixturevalue(family)
    done = monai_run(bundle, images, tmp_path / "bundle_out", tmp_path / "elsewhere")
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli.main(["predict", "--checkpoint", *map(str, checkpoints), "--images", str(images), "--out",
                     str(tmp_path / "predict.csv"), "--tta", "hv", "--workers", "0", "--device", "cpu"]) == 0
    expected = (tmp_path / "predict.csv").read_text()
    assert (tmp_path / "bundle_out" / "predictions.csv").read_text() == expected
    columns = ["image", "score", "grade"] if family == "grading" else ["image", "prob", "fundus_lite0/fold0"]
    assert expected.splitlines()[0].split(",")[:3] == columns


@pytest.mark.parametrize("family", ["segmentation", "classification", "grading"])
def test_bundle_layout_and_metadata(family, request):
    """Every member stands alone beside the first member's files at the top; the metadata validates against
    MONAI's model-zoo schema and records each member's key metric."""
    checkpoints, bundle, _ = request.getfixturevalue(family)
    names = members(bundle)
    assert len(names) == len(set(names)) == len(checkpoints)
    for name in names:
        assert {p.name for p in (bundle / "models" / name).iterdir()} == {
            "model.pt", "model.ts", "model.onnx", "best.json", "config.json"}
    for name in ("model.pt", "model.ts", "model.onnx"):
        assert (bundle / "models" / name).read_bytes() == (bundle / "models" / names[0] / name).read_bytes()
    assert (bundle / "LICENSE").read_text().startswith("MIT License")
    readme = (bundle / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run --config_file" in readme and all(name in readme for name in names)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    info = run_info_of(checkpoints[0])
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == list(input_size(info))
    assert set(metadata["eval_metrics"]) == {f"{name}/{metric}" for name in names
                                             for metric in ("val_dice", "val_auc", "val_kappa") if metric in info}
    assert "stas_pipeline" in metadata["required_packages_version"]
    if not SCHEMA.is_file():
        pytest.skip(f"{SCHEMA}: MONAI's metadata schema is not there to validate against")
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(metadata, json.loads(SCHEMA.read_text()))


def test_an_existing_out_is_refused_and_left_alone(classification, tmp_path, capsys):
    checkpoints, _, _ = classification
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    capsys.readouterr()
    assert cli.main(["export-model", *map(str, checkpoints), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ERROR {out}: exists; pass --overwrite to replace it"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"] and [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "keep"


def test_runs_of_several_tasks_are_refused(classification, grading, tmp_path, capsys):
    assert cli.main(["export-model", str(classification[0][0]), str(grading[0][0]), "--out",
                     str(tmp_path / "b")]) == 2
    assert "runs of several tasks (classification, grading)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_run_whose_inputs_vary_in_size_is_refused(segmentation):
    info = {**run_info_of(segmentation[0][0]), "keep_aspect": True}
    with pytest.raises(ExportError, match="keep_aspect without crop_size"):
        input_size(info)
    assert input_size({**info, "crop_size": 32, "network": {**info["network"], "image_size": 32}}) == (32, 32)


def test_bundle_root_outside_monais_workflow_asks_for_it():
    with pytest.raises(ExportError, match="pass --bundle_root DIR"):
        running_bundle_root()


def test_onnx_model_for_exports_beside_the_checkpoint_once(classification, tmp_path):
    """model.onnx appears beside best.pt on first use, is reused while not older than it, and is exported again
    for a newer checkpoint; its outputs are the network's."""
    checkpoints, _, images = classification
    checkpoint = checkpoints[0]
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint.parent, run_dir, ignore=shutil.ignore_patterns("tensorboard", "last.pt"))
    checkpoint, info = run_dir / "best.pt", run_info_of(run_dir / "best.pt")
    x = chain_inputs(checkpoint, images)
    model = onnx_model_for(checkpoint, info, (1, *x.shape[1:]))
    onnx = run_dir / "model.onnx"
    assert isinstance(model, OnnxRuntimeModel) and model.path == onnx and onnx.is_file()
    with torch.no_grad():
        torch.testing.assert_close(model(x), load_trained_run(checkpoint, info).model(x), atol=TOLERANCE, rtol=0)
    stamp = onnx.stat().st_mtime_ns
    assert onnx_model_for(checkpoint, info, tuple(x.shape)).path == onnx and onnx.stat().st_mtime_ns == stamp
    os.utime(checkpoint, ns=(stamp + 10**9, stamp + 10**9))
    onnx_model_for(checkpoint, info, tuple(x.shape))
    assert onnx.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []


def test_stas_predict_backend_onnxruntime_writes_what_torch_writes(segmentation, classification, tmp_path):
    """``stas predict --backend onnxruntime``: the same masks and, within the tolerance, the same probabilities and
    image scores as the torch backend. The classification run's model.onnx is made beside its checkpoint on first
    use; the segmentation runs' are their exported bundle's files put there first (newer than the checkpoints, so
    reused: one export, not three, each tens of seconds)."""
    seg_checkpoints, seg_bundle, seg_images = segmentation
    cls_checkpoints, _, cls_images = classification
    for checkpoint, member in zip(seg_checkpoints, members(seg_bundle), strict=True):
        shutil.copyfile(seg_bundle / "models" / member / "model.onnx", checkpoint.with_name("model.onnx"))
    assert not cls_checkpoints[0].with_name("model.onnx").exists()
    out = {}
    for backend in ("torch", "onnxruntime"):
        common = ["--tta", "hv", "--workers", "0", "--backend", backend]
        assert cli.main(["predict", "--checkpoint", *map(str, seg_checkpoints), "--images", str(seg_images),
                         "--out", str(tmp_path / backend / "masks"), "--save-probs", str(tmp_path / backend / "p"),
                         "--probs-format", "npy", *common]) == 0
        assert cli.main(["predict", "--checkpoint", *map(str, cls_checkpoints), "--images", str(cls_images),
                         "--out", str(tmp_path / backend / "scores.csv"), *common]) == 0
        folder = tmp_path / backend
        out[backend] = {"masks": {p.name: p.read_bytes() for p in sorted((folder / "masks").iterdir())},
                        "probs": [np.load(p) for p in sorted((folder / "p").iterdir())],
                        "scores": [float(r["prob"]) for r in csv.DictReader((folder / "scores.csv").open())]}
    assert all(c.with_name("model.onnx").is_file() for c in [*seg_checkpoints, *cls_checkpoints])
    assert out["onnxruntime"]["masks"] == out["torch"]["masks"] and len(out["torch"]["masks"]) == 3
    for a, b in zip(out["onnxruntime"]["probs"], out["torch"]["probs"], strict=True):
        np.testing.assert_allclose(a, b, atol=TOLERANCE)
    np.testing.assert_allclose(out["onnxruntime"]["scores"], out["torch"]["scores"], atol=TOLERANCE)
