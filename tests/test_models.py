"""Model factory: encoders and classifiers, stride and fixed-size checks, offline weights in every supported
form, every fundus bundle's classifier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from segmentation_models_pytorch import Unet

from stas_pipeline.core.bundles import parsed_content
from stas_pipeline.core.models import (
    OFFLINE_WEIGHTS,
    WeightsError,
    build_classifier,
    build_model,
    build_network,
    freeze_encoder_stages,
)

REPO = Path(__file__).resolve().parents[1]
ENCODER = "tf_efficientnet_lite0"


def encoder_state(model) -> dict:
    inner = model.model if hasattr(model, "model") and not hasattr(model, "encoder") else model
    return inner.encoder.model.state_dict()


def reference_weights(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return timm.create_model(ENCODER, pretrained=False).state_dict()


def test_model_outputs_and_aux_head():
    model = build_model(ENCODER, aux_head=True, image_size=64)
    model.train()
    masks, labels = model(torch.randn(2, 3, 64, 64))
    assert masks.shape == (2, 1, 64, 64) and labels.shape == (2, 1)
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_unknown_encoder_and_bad_image_size_are_named():
    with pytest.raises(ValueError, match="unknown encoder 'tf_efficientnet_lite9'"):
        build_model("tf_efficientnet_lite9")
    with pytest.raises(ValueError, match="image_size 100 is not a multiple of 16.*use e.g. 96"):
        build_model(ENCODER, image_size=100)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_timm_weights(tmp_path, suffix):
    weights = reference_weights()
    path = tmp_path / f"lite0{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    else:
        torch.save({"state_dict": weights}, path)  # a wrapped checkpoint works too
    loaded = encoder_state(build_model(ENCODER, encoder_weights=str(path)))
    assert all(torch.equal(loaded[k], weights[k]) for k in loaded)


def test_foreign_layout_is_mapped_in_order(tmp_path):
    weights = reference_weights(seed=1)
    renamed = {f"_layer{i}.{k.split('.')[-1]}": v for i, (k, v) in enumerate(weights.items())}
    torch.save(renamed, tmp_path / "foreign.pth")
    loaded = encoder_state(build_model(ENCODER, encoder_weights=str(tmp_path / "foreign.pth")))
    assert all(torch.equal(loaded[k], weights[k]) for k in loaded)


def test_shipped_lite0_imagenet_weights_load_offline():
    pytest.importorskip(OFFLINE_WEIGHTS[ENCODER][0])
    shipped = torch.load(OFFLINE_WEIGHTS[ENCODER][1](), weights_only=True)
    loaded = encoder_state(build_model(ENCODER, encoder_weights="imagenet"))
    assert torch.equal(loaded["conv_stem.weight"], shipped["_conv_stem.weight"])
    assert torch.equal(loaded["bn1.running_var"], shipped["_bn0.running_var"])


def test_bad_weight_files_are_named(tmp_path):
    truncated = tmp_path / "truncated.pth"
    torch.save(reference_weights(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(WeightsError, match=f"{truncated}: cannot read weights"):
        build_model(ENCODER, encoder_weights=str(truncated))
    other = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), other)
    with pytest.raises(WeightsError, match="match tf_efficientnet_lite0 neither by name nor by order and shape"):
        build_model(ENCODER, encoder_weights=str(other))
    with pytest.raises(WeightsError, match="weight file not found"):
        build_model(ENCODER, encoder_weights=str(tmp_path / "missing.pth"))


def test_hub_weights_offline_say_how_to_pass_a_file():
    """HF_HUB_OFFLINE=1 (read when the hub client is imported) makes the failed download immediate."""
    code = "from stas_pipeline.core.models import build_model; build_model('resnet18', encoder_weights='imagenet')"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "pass the file: --encoder_weights /path/to/weights.pth" in out.stderr


def test_classifier_takes_local_weights_for_all_but_its_head(tmp_path):
    """A timm ImageNet checkpoint (1000-class head) loads into a one-logit classifier: every tensor but the
    head, which starts near zero so training does not begin at large logits."""
    weights = reference_weights(seed=2)
    torch.save(weights, tmp_path / "lite0.pth")
    model = build_classifier(ENCODER, encoder_weights=str(tmp_path / "lite0.pth"), num_classes=1)
    state = model.state_dict()
    body = [k for k in state if not k.startswith("classifier.")]
    assert body and all(torch.equal(state[k], weights[k]) for k in body)
    assert state["classifier.weight"].shape == (1, 1280) and state["classifier.weight"].abs().max() < 0.1
    assert torch.equal(state["classifier.bias"], torch.zeros(1))
    model.eval()
    assert model(torch.randn(2, 3, 64, 64)).abs().max() < 1.0


def test_shipped_lite0_imagenet_weights_load_into_the_classifier():
    pytest.importorskip(OFFLINE_WEIGHTS[ENCODER][0])
    shipped = torch.load(OFFLINE_WEIGHTS[ENCODER][1](), weights_only=True)
    model = build_classifier(ENCODER, encoder_weights="imagenet")
    assert torch.equal(model.state_dict()["conv_stem.weight"], shipped["_conv_stem.weight"])


@pytest.mark.parametrize("bundle", sorted(p.stem for pattern in ("fundus_*.json", "grading_*.json")
                                           for p in (REPO / "bundles").glob(pattern)))
def test_every_image_level_bundle_builds_its_classifier(bundle):
    network, = parsed_content(bundle, ["task#network"], {"encoder_weights": "none"})
    model = build_network(**network, encoder_weights=None).eval()
    size = network["image_size"] if bundle == "fundus_deit_base" else 64
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, network["num_classes"])


def test_fixed_size_classifier_refuses_another_size():
    with pytest.raises(ValueError, match="deit_base_patch16_224 takes 224x224 images, not image_size 512"):
        build_classifier("deit_base_patch16_224", image_size=512)


def test_frozen_stages_keep_loaded_weights_through_training_and_decoder_channels_apply(tmp_path):
    """``frozen_stages=2`` freezes the stem and the blocks through stride 4 after the weights are loaded: no
    gradients, batch-norm statistics fixed in training mode; the rest trains. ``decoder_channels`` reaches smp,
    and a checkpoint loads into a network built with the same arguments."""
    weights = reference_weights(seed=3)
    torch.save(weights, tmp_path / "lite0.pth")
    kwargs = {"aux_head": True, "decoder_channels": 64, "frozen_stages": 2}
    model = build_model(ENCODER, encoder_weights=str(tmp_path / "lite0.pth"), **kwargs)
    assert model.model.segmentation_head[0].in_channels == 64
    before = {k: v.clone() for k, v in encoder_state(model).items()}
    assert torch.equal(before["bn1.running_mean"], weights["bn1.running_mean"])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    masks, labels = model(torch.rand(2, 3, 64, 64) * 5)
    (masks.mean() + labels.mean()).backward()
    optimizer.step()
    after = encoder_state(model)
    frozen = [k for k in before if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    trained = [k for k in before if k.startswith("blocks.2.") and k.endswith("weight")]
    assert frozen and trained
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    assert any(not torch.equal(after[k], before[k]) for k in trained)
    assert model.model.encoder.model.conv_stem.weight.grad is None
    rebuilt = build_model(ENCODER, **kwargs)
    rebuilt.load_state_dict(model.state_dict())


def test_frozen_stages_follow_any_timm_encoder_and_are_checked():
    encoder = Unet("tu-resnet18", encoder_weights=None).encoder.model
    assert freeze_encoder_stages(encoder, 2) == ["conv1", "bn1", "act1", "maxpool", "layer1"]
    assert not encoder.layer1[0].conv1.weight.requires_grad and encoder.layer2[0].conv1.weight.requires_grad
    with pytest.raises(ValueError, match="frozen_stages 6: the encoder has 5 feature levels"):
        build_model(ENCODER, frozen_stages=6)
