"""Exported model-zoo bundles (``stas export-model``): trained runs of one task (models x folds) as a MONAI bundle
folder that predicts as ``stas predict`` does, from any working directory, with ``stas_pipeline`` installed::

    python -m monai.bundle run --config_file DIR/configs/inference.json --input_dir IMAGES --output_dir OUT

Layout of ``DIR``:

- ``configs/inference.json``: the entry (``run``); ``bundle_root`` is found from the config file's path
  (:func:`~stas_pipeline.core.exported.running_bundle_root`; ``--bundle_root`` overrides it). Segmentation:
  ``predict_images`` of the members averaged, ``OUT/<image stem>.png`` masks; image-level tasks:
  ``predict_scores``, ``OUT/predictions.csv``. Overrides: ``tta`` (default ``hv``), ``backend`` (``torch``,
  ``torchscript``, ``onnxruntime``), ``device``, ``batch_size``, ``num_workers``, ``overwrite``; segmentation
  also ``threshold``, ``mode``, ``overlap``, ``save_probs``, ``probs_format``.
- ``configs/metadata.json`` (MONAI's model-zoo metadata schema), ``configs/logging.conf``.
- ``models/<member>/``: one run each, standing alone (:func:`~stas_pipeline.core.exported.export_run`):
  ``model.pt`` (state dict), ``model.ts``, ``model.onnx``, ``best.json`` (its record), ``config.json`` (its
  bundle's resolved configuration). ``models/model.pt``, ``model.ts``, ``model.onnx``: the first member's files,
  where model-zoo tools look for them.
- ``docs/README.md`` (what it predicts, the runs and their figures), ``LICENSE`` (the project's, MIT).

The members are rebuilt as ``stas predict`` rebuilds runs (:func:`bundle_runs`): from their own record and
configuration, not from the package's bundles.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import monai
import numpy as np
import torch

from stas_pipeline.core.bundles import BUNDLES_DIR, RUN_CONFIG
from stas_pipeline.core.exported import (
    BACKENDS,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
    ExportError,
    export_run,
    exported_model,
    input_size,
)
from stas_pipeline.core.fileio import atomic_folder, write_json
from stas_pipeline.core.options import ONNX_OPSET
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.trained_runs import load_trained_run, run_info_of
from stas_pipeline.tasks.base import Task, get_task

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
AUTHORS = "stas_pipeline contributors"
MEMBER_FILES = (WEIGHTS_FILE, TORCHSCRIPT_FILE, ONNX_FILE)
PACKAGES = ("stas_pipeline", "segmentation-models-pytorch", "timm", "onnxruntime")  # needed to run the bundle
IMAGENET_RANGE = [round((0 - 0.485) / 0.229, 3), round((1 - 0.406) / 0.225, 3)]  # image-level chains' input range
MIT_LICENSE = """MIT License

Copyright (c) stas_pipeline contributors

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def command(bundle: str | Path, input_dir: str = "IMAGES", output_dir: str = "OUT") -> str:
    """The command that runs an exported bundle."""
    return (f"python -m monai.bundle run --config_file {Path(bundle) / 'configs' / 'inference.json'} "
            f"--input_dir {input_dir} --output_dir {output_dir}")


def member_names(infos: Sequence[dict]) -> list[str]:
    """One folder name per run, ``<bundle>_fold<k>``, made unique (``_2``, ``_3``...) and a valid metadata key."""
    names: list[str] = []
    for info in infos:
        base = re.sub(r"\W", "_", f"{info['bundle']}_fold{info.get('fold')}")
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def task_of(infos: Sequence[dict]) -> Task:
    """The one task of the runs; ExportError for runs of several tasks."""
    names = list(dict.fromkeys(info.get("task", "segmentation") for info in infos))
    if len(names) > 1:
        raise ExportError(f"the checkpoints are runs of several tasks ({', '.join(names)}); export them separately")
    return get_task(names[0])


def export_bundle(checkpoints: Sequence[str | Path], infos: Sequence[dict], out: str | Path, overwrite: bool = False,
                  opset: int = ONNX_OPSET, version: str = "0.1.0") -> list[str]:
    """Write the bundle of the runs (``checkpoints``, ``infos``: their records) to the folder ``out``, which
    appears only when complete (an existing non-empty one is refused without ``overwrite``); its members' names."""
    task = task_of(infos)
    for info in infos:
        input_size(info)  # every run exportable before anything is written
    members = member_names(infos)
    with atomic_folder(out, overwrite) as tmp:
        for checkpoint, info, member in zip(checkpoints, infos, members, strict=True):
            export_run(checkpoint, info, tmp / "models" / member, opset)
        for name in MEMBER_FILES:
            shutil.copyfile(tmp / "models" / members[0] / name, tmp / "models" / name)
        configs = [json.loads((tmp / "models" / m / RUN_CONFIG).read_text()) for m in members]
        metrics = [config.get("task", {}).get("metric_name") for config in configs]
        write_json(tmp / "configs" / "inference.json", inference_config(task, members))
        write_json(tmp / "configs" / "metadata.json", metadata(task, infos, members, metrics, version))
        shutil.copyfile(BUNDLES_DIR / "logging.conf", tmp / "configs" / "logging.conf")
        (tmp / "docs").mkdir()
        (tmp / "docs" / "README.md").write_text(readme(task, infos, members, metrics, Path(out).name))
        (tmp / "LICENSE").write_text(MIT_LICENSE)
    return members


def inference_config(task: Task, members: Sequence[str]) -> dict:
    """``configs/inference.json``: the members predicted by the task's inference, as ``stas predict`` does."""
    config = {
        "imports": [
            "$import os",
            "$import torch",
            "$from stas_pipeline.core.bundles import flag",
            "$from stas_pipeline.core.errors import one_line_errors",
            "$from stas_pipeline.core.exported import running_bundle_root",
            "$from stas_pipeline.core.images import images_in_folder",
            "$from stas_pipeline.tasks import get_task",
            "$from stas_pipeline.tasks.model_zoo import finish",
        ],
        "bundle_root": "$running_bundle_root()",
        "task": task.name,
        "members": list(members),
        "input_dir": "images",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "device": "$'cuda' if torch.cuda.is_available() else 'cpu'",
        "backend": "torch",
        "tta": "hv",
        "batch_size": 1,
        "num_workers": 2,
        "amp": False,
        "overwrite": False,
        "runs": {
            "_target_": "stas_pipeline.tasks.model_zoo.bundle_runs",
            "bundle_root": "@bundle_root",
            "members": "@members",
            "device": "@device",
            "backend": "@backend",
        },
        "initialize": ["$one_line_errors()"],
    }
    shared = {"images": "$images_in_folder(@input_dir)", "tta": "@tta", "batch_size": "@batch_size",
              "num_workers": "@num_workers", "amp": "$flag(@amp, 'amp')",
              "overwrite": "$flag(@overwrite, 'overwrite')"}
    if task.image_level:
        grade_of = "$get_task(@task).grade_of()" if hasattr(task, "grade_of") else None
        config["predict"] = {
            "_target_": "stas_pipeline.tasks.classification.inference.predict_scores",
            "runs": "@runs",
            "out": "$os.path.join(@output_dir, 'predictions.csv')",
            **shared,
            "value": getattr(task, "csv_columns", ("prob",))[0],
            "grade_of": grade_of,
        }
        config["run"] = ["$finish(@predict[0])"]
        return config
    config.update({"mode": "resize", "threshold": 0.5, "overlap": 0.25, "save_probs": None, "probs_format": "png"})
    config["predict"] = {
        "_target_": "stas_pipeline.tasks.segmentation.inference.predict_images",
        "models": "@runs",
        "out": "@output_dir",
        "save_probs": "@save_probs",
        "probs_format": "@probs_format",
        "threshold": "@threshold",
        "mode": "@mode",
        "overlap": "@overlap",
        **shared,
    }
    config["run"] = ["$finish(@predict)"]
    return config


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _data_format(task: Task, info: dict) -> dict:
    """The network's inputs and outputs (metadata's ``network_data_format``) for the run recorded as ``info``."""
    size = list(input_size(info))
    network = info["network"]
    rgb = {"0": "R", "1": "G", "2": "B"}
    image = {"type": "image", "format": "magnitude", "modality": "RGB", "num_channels": 3, "spatial_shape": size,
             "dtype": "float32", "value_range": IMAGENET_RANGE if task.image_level else [0, 1],
             "is_patch_data": bool(info.get("crop_size")), "channel_def": rgb}
    if task.image_level:
        outputs = network.get("num_classes", 1)
        value = getattr(task, "csv_columns", ("prob",))[0]
        return {
            "inputs": {"image": image},
            "outputs": {"pred": {"type": "probabilities", "format": "logits", "num_channels": outputs,
                                 "spatial_shape": [], "dtype": "float32", "value_range": [],
                                 "channel_def": {str(k): f"logit {k}" for k in range(outputs)}}},
            "post_processed_outputs": {value: {"type": "number", "format": value, "num_channels": 1,
                                               "spatial_shape": [], "dtype": "float32",
                                               "value_range": [0, 1] if value == "prob" else []}},
        }
    return {
        "inputs": {"image": image},
        "outputs": {"pred": {"type": "image", "format": "logits", "num_channels": network.get("classes", 1),
                             "spatial_shape": size, "dtype": "float32", "value_range": [],
                             "is_patch_data": image["is_patch_data"], "channel_def": {"0": "foreground logit"}}},
        "post_processed_outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 1,
                                            "spatial_shape": ["H", "W"], "dtype": "uint8", "value_range": [0, 255],
                                            "is_patch_data": False,
                                            "channel_def": {"0": "mask at the image's size: 0 background, 255 "
                                                                 "foreground"}}},
    }


def metadata(task: Task, infos: Sequence[dict], members: Sequence[str], metrics: Sequence[str | None],
             version: str) -> dict:
    """``configs/metadata.json`` (MONAI's model-zoo schema): versions, the task, each member's key metric and
    network format (``network_data_format`` is the first member's, ``<member>_data_format`` each member's)."""
    bundles = ", ".join(dict.fromkeys(info["bundle"] for info in infos))
    output = ("a binary mask per image at its size (0/255 PNG), the members' probabilities averaged with flip TTA"
              if not task.image_level else
              f"a predictions CSV, one row per image: {', '.join(getattr(task, 'csv_columns', ('prob',)))} (the "
              "members' mean) and one column per member")
    meta = {
        "schema": SCHEMA,
        "version": version,
        "changelog": {version: f"exported by stas export-model from {len(infos)} runs of {bundles}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {p: _version(p) for p in PACKAGES},
        "task": f"{task.name}: {task.description}",
        "description": f"{len(infos)} trained runs of {bundles} ({task.name}), averaged; {output}. Each image goes "
                       "through each run's own chain (its bundle's task#preprocessing and task#val_transforms with "
                       "its recorded knobs, models/<member>/config.json and best.json), as stas predict does. See "
                       "docs/README.md.",
        "authors": AUTHORS,
        "copyright": f"Copyright (c) {AUTHORS}",
        "data_type": "image files (.jpg .jpeg .png .tif .tiff), RGB",
        "image_classes": "RGB image, 3 channels",
        "pred_classes": output,
        "eval_metrics": {f"{member}/{metric}": info.get(metric)
                         for member, info, metric in zip(members, infos, metrics, strict=True) if metric},
        "intended_use": "Research and challenge reproduction; not for clinical use",
        "network_data_format": _data_format(task, infos[0]),
    }
    meta.update({f"{member}_data_format": _data_format(task, info) for member, info in zip(members, infos,
                                                                                             strict=True)})
    return meta


def readme(task: Task, infos: Sequence[dict], members: Sequence[str], metrics: Sequence[str | None],
           name: str) -> str:
    """``docs/README.md``: what the bundle predicts, how to run it, its layout and the runs' figures."""
    rows = []
    for member, info, metric in zip(members, infos, metrics, strict=True):
        network = info["network"]
        arch = network.get("arch") or network.get("model_name") or "?"
        encoder = network.get("encoder_name", "")
        score = f"{metric} {info[metric]:.4f}" if metric and isinstance(info.get(metric), (int, float)) else "-"
        size = "x".join(map(str, input_size(info)))
        rows.append(f"| {member} | {info['bundle']} | {info.get('fold')} | {arch} {encoder}".rstrip() +
                    f" | {size} | {info.get('epoch', '-')} of {info.get('epochs', '-')} | {score} | "
                    f"{info.get('datalist', '-')} |")
    what = ("a binary mask per image, `OUT/<image stem>.png` (0/255, at the image's size): the members' sigmoid "
            "probabilities averaged (with flip TTA), thresholded at 0.5" if not task.image_level else
            "`OUT/predictions.csv`: one row per image, "
            f"`image,{','.join(getattr(task, 'csv_columns', ('prob',)))},<member>...` (the mean over the members, "
            "then one column per member)")
    overrides = [
        ("input_dir", "the folder of images to predict"),
        ("output_dir", "where the predictions go (default `eval` in this folder)"),
        ("tta", "none, h, v, hv or d4 (default hv: the four flips; d4 also transposes each: 8 passes)" +
         ("; also two-crop and ten-crop" if task.image_level else "")),
        ("backend", f"{', '.join(BACKENDS)} (default torch: the state dicts)"),
        ("device", "default cuda when available, else cpu"),
        ("batch_size", "1"), ("num_workers", "2"), ("overwrite", "false"),
    ]
    if not task.image_level:
        overrides += [("threshold", "0.5"), ("mode", "resize (default) or sliding_window"), ("overlap", "0.25"),
                      ("save_probs", "a folder for the probability maps (default none)"),
                      ("probs_format", "png or npy")]
    return f"""# {name}

Task: {task.name}, {task.description}. Exported by `stas export-model` (stas_pipeline) from {len(infos)} trained
runs.

## What it predicts

For a folder of RGB images (.jpg .jpeg .png .tif .tiff): {what}. Each image goes through each member's own chain
(its bundle's `task#preprocessing` and `task#val_transforms` with the run's recorded knobs), exactly as
`stas predict` does with the same runs.

## Running it

With `stas_pipeline` installed (`pip install stas_pipeline[export]` for the TorchScript and ONNX Runtime
backends), from any working directory (`{name}`: this folder, by any path):

```
{command(name)}
```

Overrides (`--key value`, as MONAI's runner takes them):

{chr(10).join(f"- `{key}`: {text}" for key, text in overrides)}

`bundle_root` is found from the config file's path; outside MONAI's runner pass `--bundle_root DIR`.

## Layout

- `configs/inference.json` (the entry, `run`), `configs/metadata.json`, `configs/logging.conf`
- `models/<member>/`: each run standing alone: `model.pt` (state dict), `model.ts` (TorchScript, traced),
  `model.onnx` (ONNX opset {ONNX_OPSET}+, dynamic batch, input `image`, output `pred`), `best.json` (the run record),
  `config.json` (its bundle's resolved configuration)
- `models/model.pt`, `models/model.ts`, `models/model.onnx`: the first member's ({members[0]}), where model-zoo
  tools look
- The networks take float32 (N, 3, H, W) at the size below and output logits: (N, 1, H, W) for segmentation,
  (N, outputs) for image-level tasks. Height and width are fixed; the batch is not.

## Training data and figures

| member | bundle | fold | network | input | best epoch | key metric | datalist |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

## Licence

The project's licence (MIT, `LICENSE`). Weights fine-tuned from pretrained encoders also carry the terms of those
weights.
"""


def bundle_runs(bundle_root: str | Path, members: Sequence[str], device: str = "cpu",
                backend: str = "torch") -> list:
    """The members of an exported bundle (``models/<member>/``) as ``stas predict`` loads runs: segmentation runs
    (``load_run_model``), or image-level runs scored as their task scores them; their networks the state dicts
    (``torch``) or the ``torchscript`` / ``onnxruntime`` files."""
    from stas_pipeline.tasks.segmentation.inference import load_run_model

    if backend not in BACKENDS:
        raise ExportError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    runs: list = []
    for member in members:
        folder = Path(bundle_root, "models", member)
        checkpoint = folder / WEIGHTS_FILE
        info = run_info_of(checkpoint)
        task = get_task(info.get("task", "segmentation"))
        if task.image_level:
            run = load_trained_run(checkpoint, info, device)
            run.score = task.scorer_for(info) or run.score
        else:
            run = load_run_model(checkpoint, device)
        if backend != "torch":
            run.model = exported_model(folder, backend).to(device)
        runs.append(run)
    return runs


def finish(problems: Problems) -> None:
    """Print a prediction's summary; exit with its code when images were skipped (MONAI's runner exits 0)."""
    code = problems.finish()
    if code:
        sys.exit(code)
