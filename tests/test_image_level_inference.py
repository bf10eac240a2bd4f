"""Image-level inference: the TTA views (flips, two-crop, ten-crop) and their forward passes, and
``stas predict --estimate`` (a projection printed, nothing written) for image-level and segmentation runs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stas_pipeline import cli
from stas_pipeline.core.lmdb_cache import Preprocessing
from stas_pipeline.core.models import build_network
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.trained_runs import TrainedRun
from stas_pipeline.stages import predict as predict_stage
from stas_pipeline.tasks.classification.inference import predict_scores, tta_mean_score, tta_views
from stas_pipeline.tasks.classification.task import TTA_MODES

PASSES = {"none": 1, "h": 2, "v": 2, "hv": 4, "d4": 8, "two-crop": 2, "ten-crop": 10}  # as documented
S = 32


class Counting(nn.Module):
    """A model that records the shape of every batch it is called on."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.model(x)


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 1))


def run_of(model: nn.Module) -> TrainedRun:
    return TrainedRun("m/fold0", model, Preprocessing.resize(S, keys=("image",)), lambda d: d)


def image_files(folder: Path, n: int, size: tuple[int, int] = (40, 48)) -> list[Path]:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"img{i}.png" for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return paths


def test_every_mode_has_a_documented_number_of_passes():
    assert set(PASSES) == set(TTA_MODES)


def test_ten_crop_and_two_crop_views_are_the_documented_crops_resized_back():
    x = torch.rand(2, 3, S, S)
    side, o = 28, 2  # round(0.875 * 32); the centre crop starts (32 - 28) / 2 in
    resized = [F.interpolate(c, size=(S, S), mode="bilinear", align_corners=False) for c in (
        x[..., :side, :side], x[..., :side, -side:], x[..., -side:, :side], x[..., -side:, -side:],
        x[..., o:o + side, o:o + side])]
    flipped = [torch.flip(v, (-1,)) for v in resized]  # crops of the flipped image: the flipped crops, mirrored
    flipped = [flipped[1], flipped[0], flipped[3], flipped[2], flipped[4]]
    views = list(tta_views(x, "ten-crop"))
    assert len(views) == 10
    for view, expected in zip(views, resized + flipped, strict=True):
        torch.testing.assert_close(view, expected)
    two = list(tta_views(x, "two-crop"))
    assert len(two) == 2 and two[0] is x
    torch.testing.assert_close(two[1], resized[4])
    wide = torch.rand(1, 3, 40, 24)
    assert all(v.shape == wide.shape for tta in TTA_MODES if tta != "d4" for v in tta_views(wide, tta))
    assert [v.shape[-2:] for v in tta_views(wide, "d4")] == [(40, 24)] * 4 + [(24, 40)] * 4
    with pytest.raises(ValueError, match="tta must be one of"):
        list(tta_views(x, "five-crop"))


def test_the_score_is_the_mean_over_the_views():
    model, x = convnet(), torch.rand(3, 3, S, S)
    run = run_of(model)
    for tta in TTA_MODES:
        with torch.no_grad():
            expected = torch.stack([torch.sigmoid(model(v))[:, 0] for v in tta_views(x, tta)]).mean(0)
        torch.testing.assert_close(tta_mean_score(run, x, tta), expected)


def test_an_invariant_model_scores_the_same_under_every_tta(tmp_path):
    """Constant images look the same in every view: every TTA gives the plain score. Textured images do not."""
    folder = tmp_path / "flat"
    folder.mkdir()
    paths = []
    for i, colour in enumerate([(10, 200, 90), (250, 0, 128), (60, 60, 60)]):
        paths.append(folder / f"flat{i}.png")
        Image.fromarray(np.full((40, 48, 3), colour, np.uint8)).save(paths[-1])
    textured = image_files(tmp_path / "textured", 3)
    model = convnet()

    def scores(images, tta):
        return [row["m/fold0"] for row in predict_scores([run_of(model)], images, tta=tta, batch_size=2)[1]]

    plain = scores(paths, "none")
    for tta in TTA_MODES:
        np.testing.assert_allclose(scores(paths, tta), plain, rtol=1e-6)
        if tta != "none":
            assert scores(textured, tta) != scores(textured, "none")


@pytest.mark.parametrize("tta", TTA_MODES)
def test_forward_passes_per_tta(tmp_path, tta):
    model = Counting(convnet())
    problems, rows = predict_scores([run_of(model)], image_files(tmp_path, 3), tta=tta, batch_size=2)
    assert len(rows) == 3 and problems.counts["predicted"] == 3
    assert model.calls == [(2, 3, S, S)] * PASSES[tta] + [(1, 3, S, S)] * PASSES[tta]


# --- stas predict --estimate -------------------------------------------------------------------------------------


def test_estimate_projects_from_the_timed_images_and_the_loading(monkeypatch):
    """A clock that advances 0.9 s per predicted image: 12,800 images take 3 h 12 min."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(predict_stage, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    calls = []

    def predict(images, estimating):
        calls.append((len(images), estimating))
        clock.now += 0.9 * len(images)
        return Problems("predict")

    images = [Path(f"img{i}.png") for i in range(12_800)]
    text = predict_stage.estimate(images, predict, 8, 4, loading_s=0.0)
    assert text.startswith("projected 3 h 12 min for 12,800 images: 0.9 s/image timed on 8")
    assert calls == [(4, True), (8, True)]  # a warm-up batch, then the timed images
    assert predict_stage.estimate(images[:5], predict, 8, 16, loading_s=30.0).startswith(
        "projected 34 s for 5 images")  # at least one batch, never more than the list


def classifier_checkpoint(folder: Path) -> Path:
    """An untrained Lite0 classifier saved as a fundus_lite0 run at 32 px, with the best.json training writes."""
    network = {"kind": "classification", "model_name": "tf_efficientnet_lite0", "num_classes": 1, "drop_rate": 0.0,
               "image_size": S}
    folder.mkdir(parents=True)
    torch.save(build_network(**network).state_dict(), folder / "best.pt")
    info = {"bundle": "fundus_lite0", "task": "classification", "network": network, "image_size": S, "fold": 0}
    (folder / "best.json").write_text(json.dumps(info))
    return folder / "best.pt"


def segmentation_checkpoint(folder: Path) -> Path:
    network = {"kind": "segmentation", "encoder_name": "tf_efficientnet_lite0", "image_size": S}
    folder.mkdir(parents=True)
    torch.save(build_network(**network).state_dict(), folder / "best.pt")
    (folder / "best.json").write_text(json.dumps({"network": network, "image_size": S}))
    return folder / "best.pt"


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_stas_predict_estimate_prints_a_projection_and_writes_nothing(tmp_path, capsys, task):
    make = classifier_checkpoint if task == "classification" else segmentation_checkpoint
    checkpoint = make(tmp_path / "run")
    image_files(tmp_path / "images", 6)
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / ("test.csv" if task == "classification" else "masks")
    extra = ["--tta", "ten-crop"] if task == "classification" else ["--tta", "hv", "--save-probs",
                                                                      str(tmp_path / "probs")]
    assert cli.main(["predict", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "images"),
                     "--out", str(out), "--estimate", "3", "--batch-size", "2", "--workers", "0", "--device", "cpu",
                     *extra]) == 0
    assert re.search(r"^projected \d+ s for 6 images: \S+ s/image timed on 3 after a warm-up batch, plus \d+ s "
                     r"loading the checkpoints$", capsys.readouterr().out, flags=re.M)
    assert sorted(tmp_path.rglob("*")) == before


def test_crop_tta_is_refused_for_segmentation(tmp_path, capsys):
    checkpoint = segmentation_checkpoint(tmp_path / "run")
    image_files(tmp_path / "images", 1)
    assert cli.main(["predict", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "images"),
                     "--out", str(tmp_path / "masks"), "--tta", "ten-crop", "--device", "cpu"]) == 2
    assert "is for image-level runs" in capsys.readouterr().err
