"""Deep supervision and hypercolumns (``deep_supervision``, ``hypercolumns``) for U-Net and DeepLabV3+: the decoder
stages, the extra heads and the wider segmentation head, what the network returns in training and in eval, the
deep-supervision loss on non-empty masks only, a timm SE-ResNeXt encoder, and a one-epoch bundle run through
MONAI's runner with BCE + Lovasz, deep supervision and hypercolumns on (then rebuilt from the run and traced to
TorchScript). Real smp/timm Lite0 networks without weights, 32-64 px."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_runs import prepare, train

from stas_pipeline.core.exported import example_input, export_torchscript, exportable_network
from stas_pipeline.core.losses import SegmentationLoss
from stas_pipeline.core.models import AuxOutputInTraining, build_model, decoder_stages, stage_channels
from stas_pipeline.core.trained_runs import load_trained_run, run_info_of

REPO = Path(__file__).resolve().parents[1]
ENCODER = "tf_efficientnet_lite0"
STAGES = {"Unet": ([256, 128, 64, 32, 16], [4, 8, 16, 32, 64]), "DeepLabV3Plus": ([256, 256], [4, 16])}


@pytest.mark.parametrize("arch", ["Unet", "DeepLabV3Plus"])
def test_the_decoder_stages_end_with_the_decoders_output(arch):
    torch.manual_seed(0)
    model = build_model(ENCODER, arch=arch, image_size=64).eval()
    with torch.no_grad():
        features = model.encoder(torch.randn(2, 3, 64, 64))
        stages = decoder_stages(model.decoder, features)
        assert torch.equal(stages[-1], model.decoder(features))
    channels, sizes = STAGES[arch]
    assert [s.shape[1] for s in stages] == stage_channels(model) == channels
    assert [s.shape[-1] for s in stages] == sizes


@pytest.mark.parametrize("arch", ["Unet", "DeepLabV3Plus"])
def test_heads_and_outputs_in_training_and_eval(arch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    channels, _ = STAGES[arch]
    model = build_model(ENCODER, arch=arch, aux_head=True, deep_supervision=True, hypercolumns=True, image_size=64)
    assert len(model.deep_heads) == len(channels) - 1  # one per stage but the last, which the main head scores
    assert model.model.segmentation_head[0].in_channels == sum(channels)
    out = model.train()(x)
    assert out["masks"].shape == (2, 1, 64, 64) and out["labels"].shape == (2, 1)
    assert [tuple(d.shape) for d in out["deep"]] == [(2, 1, 64, 64)] * (len(channels) - 1)
    assert model.eval()(x).shape == (2, 1, 64, 64)

    plain = build_model(ENCODER, arch=arch, hypercolumns=True, image_size=64)
    assert plain.deep_heads is None and plain.train()(x).shape == (2, 1, 64, 64)
    deep = build_model(ENCODER, arch=arch, deep_supervision=True, image_size=64)
    assert deep.model.segmentation_head[0].in_channels == channels[-1] and deep.train()(x)["labels"] is None


def test_with_the_options_off_the_network_is_todays():
    torch.manual_seed(0)
    bare = build_model(ENCODER, arch="Unet", image_size=64)
    torch.manual_seed(0)
    aux = build_model(ENCODER, arch="Unet", aux_head=True, image_size=64)
    assert not isinstance(bare, AuxOutputInTraining) and isinstance(aux, AuxOutputInTraining)
    assert all(k.startswith("model.") for k in aux.state_dict())
    x = torch.randn(2, 3, 64, 64)
    masks, labels = aux.train()(x)
    assert torch.equal(masks, aux.model(x)[0])


def test_other_decoders_are_refused():
    with pytest.raises(ValueError, match="need a Unet or DeepLabV3Plus decoder, not FPNDecoder"):
        build_model(ENCODER, arch="FPN", deep_supervision=True)


def test_a_seresnext_encoder_with_every_option():
    model = build_model("seresnext26d_32x4d", arch="Unet", aux_head=True, deep_supervision=True, hypercolumns=True,
                        image_size=64)
    out = model.train()(torch.randn(2, 3, 64, 64))
    assert out["masks"].shape == (2, 1, 64, 64) and len(out["deep"]) == 4


def test_deep_supervision_scores_the_non_empty_masks_only():
    torch.manual_seed(0)
    target = torch.zeros(3, 1, 16, 16)
    target[1, :, 4:10, 4:12] = 1
    target[2, :, 0:6, 0:6] = 1
    masks, deep = torch.randn(3, 1, 16, 16), [torch.randn(3, 1, 16, 16) for _ in range(2)]
    loss = SegmentationLoss("bce_lovasz", aux_weight=0.1, deep_weight=0.1)
    expected = loss.bce_lovasz(masks, target) + sum(0.1 * loss.bce_lovasz(d[1:], target[1:]) for d in deep)
    got = loss({"masks": masks, "labels": None, "deep": deep}, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    changed = [d.clone() for d in deep]
    changed[0][0] = 50.0  # the empty image's deep outputs do not count
    assert loss({"masks": masks, "deep": changed}, target).item() == pytest.approx(got.item(), rel=1e-6)

    empty = torch.zeros_like(target)
    stage = torch.randn(3, 1, 16, 16, requires_grad=True)
    alone = loss({"masks": masks, "labels": None, "deep": [stage]}, empty)
    assert alone.item() == pytest.approx(loss(masks, empty).item())
    alone.backward()  # no foreground anywhere: zero, yet in the graph (every head gets a gradient under DDP)
    assert stage.grad is not None and not stage.grad.any()


@pytest.fixture(scope="module", params=["unet_lite0", "deeplab_lite0"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle trained one epoch at 32 px with BCE + Lovasz, deep supervision and hypercolumns."""
    bundle, root = request.param, tmp_path_factory.mktemp("deep")
    prepare(root, bundle)
    return train(root, bundle, batch_size=2, mask_loss="bce_lovasz", deep_supervision=True, hypercolumns=True)


def test_a_bundle_run_trains_the_declared_network(trained):
    info = json.loads((trained / "best.json").read_text())
    assert info["mask_loss"] == "bce_lovasz"
    assert (info["network"]["deep_supervision"], info["network"]["hypercolumns"]) == (True, True)
    (row,) = json.loads((trained / "metrics.json").read_text())["history"]
    assert row["loss"] > 0 and 0.0 <= row["val_dice"] <= 1.0
    channels, _ = STAGES[info["network"]["arch"]]
    state = torch.load(trained / "best.pt", weights_only=True)
    assert [state[f"deep_heads.{k}.weight"].shape[1] for k in range(len(channels) - 1)] == channels[:-1]
    assert f"deep_heads.{len(channels) - 1}.weight" not in state
    assert state["model.segmentation_head.0.weight"].shape[1] == sum(channels)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_the_run_predicts_and_traces_as_plain_logits(trained, tmp_path):
    checkpoint = trained / "best.pt"
    info = run_info_of(checkpoint)
    model = load_trained_run(checkpoint, info).model
    x = example_input((2, 3, 32, 32))
    with torch.no_grad():
        probs = torch.sigmoid(model(x))
    assert probs.shape == (2, 1, 32, 32)
    traced = torch.jit.load(str(export_torchscript(exportable_network(checkpoint, info), x, tmp_path / "m.ts")))
    torch.testing.assert_close(torch.sigmoid(traced(x)), probs, atol=1e-4, rtol=0)
