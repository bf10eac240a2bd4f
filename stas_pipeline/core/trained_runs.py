"""Trained runs rebuilt for inference from a checkpoint and the ``best.json`` beside it: the recorded network with
the checkpoint's weights, and the chain the run's bundle declares (``task#preprocessing``, ``task#val_transforms``)
with the run's recorded knobs, so inference sees what validation saw. For every task. The chain is read from the
run's own ``config.json`` (the bundle run's resolved configuration): a run folder stands alone, whatever the
bundle files say now; runs trained before runs kept it are rebuilt from their bundle by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.transforms import Compose
from torch import nn

from stas_pipeline.core.bundles import RUN_CONFIG, parsed_content
from stas_pipeline.core.errors import StasError
from stas_pipeline.core.lmdb_cache import Preprocessing
from stas_pipeline.core.models import build_network
from stas_pipeline.core.run_recorder import CheckpointError, load_model_weights
from stas_pipeline.core.runs import read_json_object
from stas_pipeline.core.stain import StainShiftd

RECORDED_NOT_KNOBS = {"bundle", "task"}  # recorded beside the knobs, but names of bundle sections, not values
RECORDS = ("best.json", "metrics.json")  # the run records beside a checkpoint, in the order they are read


def tta_view(x: torch.Tensor, view: tuple[tuple[int, ...], bool]) -> torch.Tensor:
    """``x`` (..., H, W) seen as ``view`` (a value of core/options.py's ``TTA_VIEWS``): flipped, then transposed."""
    dims, transposed = view
    x = torch.flip(x, dims) if dims else x
    return x.transpose(-2, -1) if transposed else x


def tta_unview(p: torch.Tensor, view: tuple[tuple[int, ...], bool]) -> torch.Tensor:
    """A map predicted on ``tta_view(x, view)`` brought back onto ``x``."""
    dims, transposed = view
    p = p.transpose(-2, -1) if transposed else p
    return torch.flip(p, dims) if dims else p


class PredictError(StasError, ValueError):
    """A prediction that cannot be made: options that do not fit the runs or their task, or runs that cannot be
    predicted together."""


def first_logit_probability(logits: torch.Tensor) -> torch.Tensor:
    """One score per image: the sigmoid of its first logit (a binary classifier's probability)."""
    return torch.sigmoid(logits.float().reshape(logits.shape[0], -1)[:, 0])


@dataclass
class TrainedRun:
    """A trained model with the chain its images go through (``fold`` as recorded) and how its logits become one
    score per image (``score``: the task's, set by its predictor)."""

    name: str
    model: nn.Module
    preprocessing: Preprocessing
    transform: Callable
    fold: int | None = None
    score: Callable[[torch.Tensor], torch.Tensor] = first_logit_probability

    @classmethod
    def of(cls, spec: TrainedRun | Sequence) -> TrainedRun:
        """A run, or ``[name, model, preprocessing, transform[, score]]`` as a bundle declares it."""
        if isinstance(spec, TrainedRun):
            return spec
        name, model, preprocessing, transform, *score = spec
        return cls(name, model, Preprocessing.of(preprocessing), transform, None, *score)


def shifted(transform: Callable, stain_shift: tuple[float, float, float] | None) -> Callable:
    """``transform`` after a fixed stain shift of the image (``predict --stain-shift``: the shift check), or
    ``transform`` itself when there is none."""
    if stain_shift is None:
        return transform
    return Compose([StainShiftd("image", stain_shift), transform])


def load_trained_run(checkpoint: str | Path, info: dict, device: str | torch.device = "cpu",
                     stain_shift: tuple[float, float, float] | None = None, backend: str = "torch") -> TrainedRun:
    """The run of ``checkpoint`` (``info`` is its best.json): the recorded network with the checkpoint's weights,
    and the chain of its bundle with the run's recorded knobs (image size, crop, stain normalisation...), after
    ``stain_shift`` (:func:`shifted`). ``backend`` ``onnxruntime``: the network is ONNX Runtime on the CPU running
    the run's ``model.onnx`` (exported beside the checkpoint on first use)."""
    missing = next((key for key in ("bundle", "network") if key not in info), None)
    if missing is not None:
        raise CheckpointError(f"{record_of(checkpoint)}: no {missing!r} key: not a run record written by a "
                              "bundle's training, its model cannot be rebuilt")
    if backend == "onnxruntime":
        from stas_pipeline.core.exported import input_size, onnx_model_for  # exporting imports this module

        model = onnx_model_for(checkpoint, info, (1, 3, *input_size(info)))
    else:
        model = build_network(**{**info["network"], "encoder_weights": None})
        load_model_weights(model, checkpoint)
    knobs = {k: v for k, v in info.items() if k not in RECORDED_NOT_KNOBS and not isinstance(v, (dict, list))}
    config = Path(checkpoint).with_name(RUN_CONFIG)
    bundle = read_json_object(config) if config.is_file() else info["bundle"]  # runs before config.json: by name
    preprocessing, transform = parsed_content(bundle, ["task#preprocessing", "task#val_transforms"],
                                              {**knobs, "encoder_weights": "none"})
    name = f"{info['bundle']}/fold{info.get('fold')}"
    return TrainedRun(name, inference_ready(model, device), Preprocessing.of(preprocessing),
                      shifted(transform, stain_shift), info.get("fold"))


def inference_ready(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """``model`` on ``device`` in eval mode, its 4-D weights channels_last: convolutions run NHWC, the same maps
    about 1.3x faster on a CPU (docs/benchmarks.md, "stas predict in the channels_last layout")."""
    return model.to(device, memory_format=torch.channels_last).eval()


def record_of(checkpoint: str | Path) -> Path:
    """The run record read for ``checkpoint``: the ``best.json`` beside it, else its ``metrics.json``."""
    checkpoint = Path(checkpoint)
    records = [checkpoint.with_name(name) for name in RECORDS]
    return next((path for path in records if path.is_file()), records[0])


def run_info_of(checkpoint: str | Path) -> dict:
    """The ``best.json`` (or ``metrics.json``) written beside a checkpoint by training. :class:`CheckpointError`
    in one line naming the file: a checkpoint that does not exist, a record that is missing, not a JSON object,
    or without the keys every run records (the model: ``network``, or ``encoder`` in early runs; ``image_size``)."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: a folder, not a checkpoint (give the best.pt in it)")
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint")
    record = record_of(checkpoint)
    if not record.is_file():
        raise CheckpointError(f"{checkpoint}: no {' or '.join(RECORDS)} beside it to rebuild its model from")
    try:
        info = read_json_object(record)
    except ValueError as err:
        raise CheckpointError(f"{record}: {err}") from None
    for keys in (("network", "encoder"), ("image_size",)):
        if not any(key in info for key in keys):
            raise CheckpointError(f"{record}: no {keys[0]!r} key: not a run record written by training, the model "
                                  f"of {checkpoint.name} cannot be rebuilt from it")
    return info
