"""Inference: TTA inversion, sliding-window reassembly, original-size outputs, bad input, the bundle entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run
from PIL import Image
from torch import nn

from stas_pipeline import cli
from stas_pipeline.stages.predict import TTA_FLIPS, predict_images, predict_probabilities, scale_intensity

REPO = Path(__file__).resolve().parents[1]


def pointwise_model(seed: int = 0) -> nn.Module:
    """A 1x1 convolution: equivariant to flips and translations, so TTA and windows must not change it."""
    torch.manual_seed(seed)
    return nn.Conv2d(3, 1, kernel_size=1)


def image_tensor(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w)).astype(np.float32))


def test_flip_tta_is_inverted_exactly():
    image = image_tensor(40, 56)
    equivariant = [(pointwise_model(), 32)]
    plain = predict_probabilities(equivariant, [image], tta="none")[0]
    for tta in ("h", "v", "hv"):
        assert torch.allclose(predict_probabilities(equivariant, [image], tta=tta)[0], plain, atol=1e-6)

    torch.manual_seed(1)
    contextual = nn.Conv2d(3, 1, kernel_size=5, padding=2)  # not flip-equivariant: TTA changes the answer
    small = torch.nn.functional.interpolate(scale_intensity(image)[None], size=(32, 32), mode="area")
    by_hand = sum(torch.flip(torch.sigmoid(contextual(torch.flip(small, d) if d else small)), d) if d
                  else torch.sigmoid(contextual(small)) for d in TTA_FLIPS["hv"]) / 4
    by_hand = torch.nn.functional.interpolate(by_hand, size=(40, 56), mode="bilinear", align_corners=False)[0]
    got = predict_probabilities([(contextual, 32)], [image], tta="hv")[0]
    assert torch.allclose(got, by_hand, atol=1e-6)
    assert not torch.allclose(got, predict_probabilities([(contextual, 32)], [image])[0], atol=1e-4)


def test_sliding_window_reassembles_an_image_larger_than_the_window():
    model = pointwise_model()
    image = image_tensor(100, 150)
    whole = torch.sigmoid(model(scale_intensity(image)[None]))[0]
    windows = predict_probabilities([(model, 32)], [image], mode="sliding_window", overlap=0.25)[0]
    assert windows.shape == (1, 100, 150)
    assert torch.allclose(windows, whole, atol=1e-5)


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"img{i}.jpg"
        Image.fromarray(image_tensor(h, w, i).permute(1, 2, 0).numpy().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_outputs_at_original_size_and_bad_images_skipped(tmp_path, capsys):
    paths = write_images(tmp_path / "images", [(40, 56), (30, 20), (64, 64)])
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_bytes(b"not an image")
    problems = predict_images([(pointwise_model(), 32)], [*paths, broken], tmp_path / "masks",
                              save_probs=tmp_path / "probs", batch_size=2)
    assert problems.exit_code() == 1
    assert f"ERROR {broken}: cannot read image" in capsys.readouterr().err
    for path in paths:
        mask = Image.open(tmp_path / "masks" / f"{path.stem}.png")
        prob = Image.open(tmp_path / "probs" / f"{path.stem}.png")
        assert mask.mode == prob.mode == "L" and mask.size == prob.size == Image.open(path).size
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert np.array_equal(np.asarray(mask) == 255, np.asarray(prob) > 127.5)

    (tmp_path / "masks" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        predict_images([(pointwise_model(), 32)], paths, tmp_path / "masks")
    assert (tmp_path / "masks" / "mine.txt").read_text() == "keep"


def test_bundle_inference_entry_and_stas_predict_agree(synthetic_dataset, tmp_path, capsys):
    """Train one epoch, predict the datalist's test list with the bundle's entry, then the same with
    ``stas predict`` over a folder: the same masks."""
    datalist = json.loads((synthetic_dataset / "datalist.json").read_text())
    datalist["test"] = [{"image": e["image"]} for e in datalist["training"][:3]]
    (synthetic_dataset / "with_test.json").write_text(json.dumps(datalist))
    overrides = dict(dataset_dir=str(synthetic_dataset), datalist=str(synthetic_dataset / "with_test.json"),
                     image_size=64, epochs=1, batch_size=4, encoder_weights="none", output_dir=str(tmp_path),
                     device="cpu", amp=False, num_workers=0)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        run(run_id="training", config_file="bundles/deeplab_lite0.json", **overrides)
        run(run_id="inference", config_file="bundles/deeplab_lite0.json", **overrides)
    finally:
        os.chdir(cwd)
    run_dir = tmp_path / "deeplab_lite0" / "fold0"
    bundle_masks = sorted((run_dir / "predictions").glob("*.png"))
    assert [p.stem for p in bundle_masks] == [Path(e["image"]).stem for e in datalist["test"]]

    folder = tmp_path / "test_images"
    folder.mkdir()
    for e in datalist["test"]:
        (folder / Path(e["image"]).name).symlink_to(synthetic_dataset / e["image"])
    assert cli.main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--images", str(folder),
                     "--out", str(tmp_path / "cli"), "--device", "cpu", "--workers", "0"]) == 0
    for mask in bundle_masks:
        assert np.array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(tmp_path / "cli" / mask.name)))


def test_predict_help():
    out = subprocess.run([sys.executable, "-m", "stas_pipeline.stages.predict", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "--tta" in out and "--mode" in out and "sliding_window" in out
