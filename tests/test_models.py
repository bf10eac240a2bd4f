"""Model factory: encoders, stride check, offline encoder weights in every supported form."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from stas_pipeline.core.models import OFFLINE_WEIGHTS, WeightsError, build_model

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
