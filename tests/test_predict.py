"""Inference: TTA inversion, sliding-window reassembly, ensembles, original-size outputs, bad input, the bundle entry,
validation's chain (no train/inference skew)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import run
from monai.data import load_decathlon_datalist
from PIL import Image
from torch import nn

from stas_pipeline import cli
from stas_pipeline.core.lmdb_cache import LMDBCacheDataset
from stas_pipeline.core.options import TTA_VIEWS
from stas_pipeline.tasks.segmentation.inference import load_run_model, predict_images, predict_probabilities

REPO = Path(__file__).resolve().parents[1]


def pointwise_model(seed: int = 0) -> nn.Module:
    """A 1x1 convolution: equivariant to flips and translations, so TTA and windows must not change it."""
    torch.manual_seed(seed)
    return nn.Conv2d(3, 1, kernel_size=1)


def image_tensor(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w)).astype(np.float32))


def image_file(folder: Path, h: int, w: int, seed: int = 0) -> tuple[Path, torch.Tensor]:
    """A lossless RGB file of ``image_tensor(h, w, seed)`` and that tensor."""
    image = image_tensor(h, w, seed)
    path = folder / f"img{seed}_{h}x{w}.png"
    Image.fromarray(image.permute(1, 2, 0).numpy().astype(np.uint8)).save(path)
    return path, image


def min_max(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min())


def test_flip_tta_is_inverted_exactly(tmp_path):
    path, image = image_file(tmp_path, 40, 56)
    equivariant = [(pointwise_model(), 32)]
    plain = predict_probabilities(equivariant, [path], tta="none")[0]
    for tta in ("h", "v", "hv"):
        assert torch.allclose(predict_probabilities(equivariant, [path], tta=tta)[0], plain, atol=1e-6)

    torch.manual_seed(1)
    contextual = nn.Conv2d(3, 1, kernel_size=5, padding=2)  # not flip-equivariant: TTA changes the answer
    # the declared order: area resize of the 0..255 image, rounded to uint8 as the cache stores it, then min-max
    # scaling of the small image (ScaleIntensityd)
    small = min_max(F.interpolate(image[None], size=(32, 32), mode="area").round())
    by_hand = sum(torch.flip(torch.sigmoid(contextual(torch.flip(small, d) if d else small)), d) if d
                  else torch.sigmoid(contextual(small)) for d, _ in TTA_VIEWS["hv"]) / 4
    by_hand = F.interpolate(by_hand, size=(40, 56), mode="bilinear", align_corners=False)[0]
    got = predict_probabilities([(contextual, 32)], [path], tta="hv")[0]
    assert torch.allclose(got, by_hand, atol=1e-6)
    assert not torch.allclose(got, predict_probabilities([(contextual, 32)], [path])[0], atol=1e-4)


def test_d4_tta_averages_the_eight_symmetries(tmp_path):
    """``--tta d4``: the mean over the four rotations by 90 degrees of the image and of its mirror image, each
    turned back (written here with ``torch.rot90``); so the prediction of a rotated image is the rotated
    prediction, for a network that is not rotation-equivariant itself."""
    path, image = image_file(tmp_path, 40, 56)
    torch.manual_seed(1)
    contextual = nn.Conv2d(3, 1, kernel_size=(5, 3), padding=(2, 1))
    small = min_max(F.interpolate(image[None], size=(32, 32), mode="area").round())
    by_hand = sum(torch.rot90(torch.sigmoid(contextual(torch.rot90(x, k, (-2, -1)))), -k, (-2, -1)).flip(-1) if m
                  else torch.rot90(torch.sigmoid(contextual(torch.rot90(x, k, (-2, -1)))), -k, (-2, -1))
                  for m, x in ((False, small), (True, small.flip(-1))) for k in range(4)) / 8
    by_hand = F.interpolate(by_hand, size=(40, 56), mode="bilinear", align_corners=False)[0]
    got = predict_probabilities([(contextual, 32)], [path], tta="d4")[0]
    assert torch.allclose(got, by_hand, atol=1e-6)
    assert not torch.allclose(got, predict_probabilities([(contextual, 32)], [path], tta="hv")[0], atol=1e-4)

    turned = tmp_path / "turned.png"
    Image.open(path).transpose(Image.Transpose.ROTATE_90).save(turned)
    for tta, equal in (("d4", True), ("hv", False)):
        pair = predict_probabilities([(contextual, 32)], [path, turned], tta=tta)
        assert torch.allclose(pair[1], torch.rot90(pair[0], 1, (-2, -1)), atol=1e-5) is equal


def test_sliding_window_reassembles_an_image_larger_than_the_window(tmp_path):
    model = pointwise_model()
    path, image = image_file(tmp_path, 100, 150)
    whole = torch.sigmoid(model(min_max(image)[None]))[0]
    windows = predict_probabilities([(model, 32)], [path], mode="sliding_window", overlap=0.25)[0]
    assert windows.shape == (1, 100, 150)
    assert torch.allclose(windows, whole, atol=1e-5)


def test_runs_of_different_sizes_average(tmp_path):
    paths = [image_file(tmp_path, 40, 56, seed)[0] for seed in (0, 1)]
    torch.manual_seed(2)
    runs = [(nn.Conv2d(3, 1, kernel_size=3, padding=1), 32), (pointwise_model(), 48)]
    for mode in ("resize", "sliding_window"):
        alone = [predict_probabilities([run], paths, mode) for run in runs]
        for k, together in enumerate(predict_probabilities(runs, paths, mode)):
            assert torch.allclose(together, (alone[0][k] + alone[1][k]) / 2, atol=1e-6)


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


@pytest.fixture(scope="module")
def trained(synthetic_dataset, tmp_path_factory) -> tuple[Path, dict, Path]:
    """One epoch of deeplab_lite0 at 64 px, then the bundle's inference entry over three training images listed as
    the test list: the run folder, the datalist and a folder of (links to) those images."""
    out = tmp_path_factory.mktemp("trained")
    datalist = json.loads((synthetic_dataset / "datalist.json").read_text())
    datalist["test"] = [{"image": e["image"]} for e in datalist["training"][:3]]
    (synthetic_dataset / "with_test.json").write_text(json.dumps(datalist))
    overrides = dict(dataset_dir=str(synthetic_dataset), datalist=str(synthetic_dataset / "with_test.json"),
                     image_size=64, epochs=1, batch_size=4, encoder_weights="none", output_dir=str(out),
                     device="cpu", amp=False, num_workers=0)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        run(run_id="training", config_file="bundles/deeplab_lite0.json", **overrides)
        run(run_id="inference", config_file="bundles/deeplab_lite0.json", **overrides)
    finally:
        os.chdir(cwd)
    folder = out / "test_images"
    folder.mkdir()
    for e in datalist["test"]:
        (folder / Path(e["image"]).name).symlink_to(synthetic_dataset / e["image"])
    return out / "deeplab_lite0" / "fold0", datalist, folder


def stas_predict(checkpoint: Path, images: Path, out: Path) -> None:
    assert cli.main(["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out / "masks"),
                     "--save-probs", str(out / "probs"), "--probs-format", "npy", "--device", "cpu",
                     "--workers", "0"]) == 0


def test_bundle_inference_entry_and_stas_predict_agree(trained, tmp_path):
    """The bundle's entry predicted the datalist's test list; ``stas predict`` over a folder: the same masks."""
    run_dir, datalist, folder = trained
    bundle_masks = sorted((run_dir / "predictions").glob("*.png"))
    assert [p.stem for p in bundle_masks] == [Path(e["image"]).stem for e in datalist["test"]]
    stas_predict(run_dir / "best.pt", folder, tmp_path)
    for mask in bundle_masks:
        assert np.array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(tmp_path / "masks" / mask.name)))


def test_stas_predict_is_validation_on_the_cached_item(trained, synthetic_dataset, tmp_path):
    """No train/inference skew: the probability ``stas predict`` writes for a training image is the model's
    output on that image's cache item (through the run's val transforms), resized back to the original size.
    A run recorded without a bundle gets the segmentation bundle's chain: the same probabilities."""
    run_dir, _, folder = trained
    stas_predict(run_dir / "best.pt", folder, tmp_path / "bundle")
    seg_run = load_run_model(run_dir / "best.pt")
    items = [e for e in load_decathlon_datalist(str(synthetic_dataset / "datalist.json"), True, "training")
             if (folder / Path(e["image"]).name).exists()]
    assert len(items) == 3
    cached = LMDBCacheDataset(items, synthetic_dataset / "cache_64", seg_run.preprocessing, seg_run.transform)
    for item, sample in zip(items, cached, strict=True):
        with torch.no_grad():
            expected = torch.sigmoid(seg_run.model(sample["image"][None]))
        expected = F.interpolate(expected, size=sample["orig_size"], mode="bilinear", align_corners=False)[0, 0]
        got = np.load(tmp_path / "bundle" / "probs" / f"{Path(item['image']).stem}.npy")
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "best.pt").symlink_to(run_dir / "best.pt")
    info = json.loads((run_dir / "best.json").read_text())
    (bare / "best.json").write_text(json.dumps({k: v for k, v in info.items() if k not in ("bundle", "task")}))
    stas_predict(bare / "best.pt", folder, tmp_path / "bare_out")
    for probs in (tmp_path / "bundle" / "probs").glob("*.npy"):
        np.testing.assert_array_equal(np.load(probs), np.load(tmp_path / "bare_out" / "probs" / probs.name))


def test_predict_help():
    out = subprocess.run([sys.executable, "-m", "stas_pipeline.stages.predict", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "--tta" in out and "--mode" in out and "sliding_window" in out
