"""Trained networks as files other runtimes load: TorchScript (traced), ONNX (a dynamic batch axis), and an ONNX
file run by ONNX Runtime as a torch module, in place of the network.

Each export is checked before it is kept: the traced module is traced again at another batch size (the same graph,
so the batch is not baked in), the ONNX graph passes ``onnx.checker``, and the saved file, loaded back, must give
the network's output on the example within :data:`TOLERANCE` (absolute, plus as much relative: large logits of
large networks). A run's network is exported as :func:`exportable_network` rebuilds it: from its run record under
timm's exportable layer config (no custom-autograd activations), with the checkpoint's weights, in eval mode
(segmentation networks with an auxiliary head output the mask logits alone, as inference reads them).

The input's height and width are fixed at the run's network input size (:func:`input_size`: the training size,
or the crop size of runs trained on crops), which is all a run is ever given (resized images, windows of that
size): timm's TF-style EfficientNets pad "SAME" by the input size, which the export fixes; an ONNX graph with
symbolic height and width exports in minutes instead of seconds. ONNX Runtime refuses another size.

onnx, onnxscript and onnxruntime are optional (``pip install stas_pipeline[export]``); they are imported when
used.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from types import ModuleType

import timm
import torch
from torch import nn

from stas_pipeline.core.bundles import RUN_CONFIG, resolved_config
from stas_pipeline.core.errors import StasError, refused
from stas_pipeline.core.fileio import atomic_path, write_json
from stas_pipeline.core.lmdb_cache import image_size_pair
from stas_pipeline.core.models import build_network
from stas_pipeline.core.options import ONNX_OPSET
from stas_pipeline.core.run_recorder import load_model_weights
from stas_pipeline.core.runs import read_json_object
from stas_pipeline.core.trained_runs import RECORDS

TOLERANCE = 1e-4  # an export's output may differ from the network's by this, plus this times |output| (float32)
ONNX_INPUT, ONNX_OUTPUT = "image", "pred"
WEIGHTS_FILE = "model.pt"  # an exported run's state dict, beside its record (best.json) and config.json
ONNX_FILE = "model.onnx"  # beside a run's checkpoint (onnx_model_for) and in an exported bundle's member folder
TORCHSCRIPT_FILE = "model.ts"
JIT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"  # torch 2.14 warns at each TorchScript call
BACKENDS = ("torch", "torchscript", "onnxruntime")  # what runs an exported bundle's members


class ExportError(StasError, RuntimeError):
    """A network that cannot be exported or run from its exported file."""


def _module(name: str) -> ModuleType:
    """An optional dependency of exporting, or an ExportError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ExportError(f"{name}: not installed ({err}); pip install 'stas_pipeline[export]'") from None


def input_size(info: dict) -> tuple[int, int]:
    """(H, W) of the network input of a run recorded as ``info``: its network's ``image_size`` (the crop size of a
    run trained on crops), else the run's. ExportError for runs whose inputs vary in size (``keep_aspect`` without
    crops)."""
    if info.get("keep_aspect") and not info.get("crop_size"):
        raise ExportError(f"{info.get('bundle')}/fold{info.get('fold')}: keep_aspect without crop_size: its inputs "
                          "vary in size, an export takes one size")
    return image_size_pair(info["network"].get("image_size") or info["image_size"])


def example_input(shape: tuple[int, ...] | torch.Size, seed: int = 0) -> torch.Tensor:
    """A reproducible example batch of ``shape`` (N, C, H, W), uniform in [0, 1)."""
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(seed))


def exportable_network(checkpoint: str | Path, info: dict) -> nn.Module:
    """The network of a run (``info``: its record), built under timm's exportable layer config, with the weights
    of ``checkpoint``, in eval mode."""
    with timm.layers.set_layer_config(exportable=True):
        model = build_network(**{**info["network"], "encoder_weights": None})
    return load_model_weights(model, checkpoint).eval()


def _two_or_more(example: torch.Tensor) -> torch.Tensor:
    """``example``, a batch of one repeated: ``torch.export`` specialises a batch of one, the trace check needs
    another batch size."""
    return example if example.shape[0] > 1 else torch.cat([example, example])


@torch.no_grad()
def _check_close(model: nn.Module, exported: nn.Module, example: torch.Tensor, path: Path) -> None:
    expected, got = model(example), exported(example)
    if expected.shape != got.shape:
        raise ExportError(f"{path}: output of shape {tuple(got.shape)}, the network's is {tuple(expected.shape)}")
    diff = (expected.float() - got.float()).abs()
    if not (diff <= TOLERANCE * (1 + expected.float().abs())).all():
        raise ExportError(f"{path}: differs from the network by up to {diff.max().item():.3g} (more than "
                          f"{TOLERANCE} + {TOLERANCE} x |output|)")


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """``model`` traced on ``example`` (N, C, H, W) and saved to ``path`` (atomically, replacing it); checked: the
    trace at another batch size gives the same graph, and the saved file gives the model's output."""
    path, model, example = Path(path), model.eval(), _two_or_more(example)
    with warnings.catch_warnings(), atomic_path(path, overwrite=True) as tmp:
        warnings.filterwarnings("ignore", JIT_DEPRECATED, FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_inputs=[(example,), (example[:1],)])
        torch.jit.save(traced, str(tmp))
        _check_close(model, torch.jit.load(str(tmp), map_location="cpu"), example, path)
    return path


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = ONNX_OPSET) -> Path:
    """``model`` exported by ``torch.export`` on ``example`` (N, C, H, W) to the ONNX file ``path`` (one file,
    written atomically, replacing it): input ``image``, output ``pred``, the batch axis dynamic, height and width
    those of ``example``. Checked with ``onnx.checker`` and against the model's output in ONNX Runtime."""
    onnx = _module("onnx")
    _module("onnxscript")  # torch.export's ONNX translation
    if opset < ONNX_OPSET:
        raise ExportError(f"{path}: opset {opset}: the exporter writes opset {ONNX_OPSET} or newer")
    path, model, example = Path(path), model.eval(), _two_or_more(example)
    with atomic_path(path, overwrite=True) as tmp:
        torch.onnx.export(model, (example,), str(tmp), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          opset_version=opset, dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
        onnx.checker.check_model(str(tmp), full_check=True)
        _check_close(model, OnnxRuntimeModel(tmp), example, path)
    return path


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by ONNX Runtime on the CPU, as a torch module in place of the network: ``forward`` takes a
    float tensor (N, C, H, W) on any device and returns the file's (first) output, float32, on that device.
    ``eval``/``train``/``to`` leave the session as it is; the module holds one empty tensor, so
    ``next(model.parameters()).device`` names the device inputs are put on, as the inference code asks.
    ``threads``: ONNX Runtime's intra-op threads (default: torch's number of threads)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        ort = _module("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    @property
    def input_shape(self) -> list[int | str]:
        """The file's input shape, a name for each dynamic axis (``["batch", 3, 512, 512]``)."""
        return self.session.get_inputs()[0].shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run([self.output_name], {self.input_name: feed})
        return torch.from_numpy(out).to(x.device)


def onnx_model_for(checkpoint: str | Path, info: dict, example_shape: tuple[int, ...]) -> OnnxRuntimeModel:
    """The run of ``checkpoint`` (``info``: its record) as an :class:`OnnxRuntimeModel` of ``model.onnx`` beside
    the checkpoint, for inputs of ``example_shape`` (N, C, H, W; any N): exported on first use, reused while it
    is not older than the checkpoint and takes that (C, H, W). ExportError when the folder cannot be written."""
    checkpoint = Path(checkpoint)
    path = checkpoint.with_name(ONNX_FILE)
    if path.is_file() and path.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns:
        model = OnnxRuntimeModel(path)
        if model.input_shape[1:] == list(example_shape[1:]):
            return model
    with refused((OSError,), ExportError):
        export_onnx(exportable_network(checkpoint, info), example_input(example_shape), path)
    return OnnxRuntimeModel(path)


def export_run(checkpoint: str | Path, info: dict, folder: str | Path, opset: int = ONNX_OPSET) -> Path:
    """A run (``checkpoint``, ``info``: its record) as a folder that stands alone, made here: its weights
    (``model.pt``, a state dict), TorchScript (``model.ts``) and ONNX (``model.onnx``) files, its record
    (``best.json``) and its bundle's resolved configuration (``config.json``: the one training wrote beside the
    checkpoint, else the bundle's by name), so that ``load_trained_run(folder / "model.pt", info)`` rebuilds it
    as it rebuilds the run."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    model = exportable_network(checkpoint, info)
    example = example_input((2, 3, *input_size(info)))
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    export_torchscript(model, example, folder / TORCHSCRIPT_FILE)
    export_onnx(model, example, folder / ONNX_FILE, opset)
    config = Path(checkpoint).with_name(RUN_CONFIG)
    try:
        resolved = read_json_object(config) if config.is_file() else resolved_config(info["bundle"])
    except ValueError as err:
        raise ExportError(f"{config}: {err}") from None
    write_json(folder / RUN_CONFIG, resolved)
    write_json(folder / RECORDS[0], info)
    return folder


def exported_model(folder: str | Path, backend: str) -> nn.Module:
    """The network saved in ``folder`` for ``backend``: ``torchscript`` (``model.ts``) or ``onnxruntime``
    (``model.onnx``), in eval mode."""
    files = {"torchscript": TORCHSCRIPT_FILE, "onnxruntime": ONNX_FILE}
    if backend not in files:
        raise ExportError(f"{folder}: backend {backend!r}: expected one of {', '.join(files)}")
    path = Path(folder, files[backend])
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    if backend == "onnxruntime":
        return OnnxRuntimeModel(path).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", JIT_DEPRECATED, FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def running_bundle_root() -> str:
    """The root (the folder above ``configs/``) of the bundle whose configuration MONAI's bundle workflow is
    running, found on the call stack, as :func:`stas_pipeline.core.bundles.running_parser` finds its parser: an
    exported bundle's default ``bundle_root``, so that ``python -m monai.bundle run --config_file
    DIR/configs/inference.json`` runs from any working directory. ExportError outside a workflow (a config parsed
    by hand): pass ``bundle_root``."""
    from monai.bundle import ConfigWorkflow

    frame = sys._getframe(1)
    while frame is not None:
        workflow = frame.f_locals.get("self")
        if isinstance(workflow, ConfigWorkflow):
            root = Path(workflow.config_root_path).resolve()
            return str(root.parent if root.name == "configs" else root)
        frame = frame.f_back
    raise ExportError("bundle_root: not run by MONAI's bundle workflow; pass --bundle_root DIR (the folder holding "
                      "configs/ and models/)")
