"""Image-level inference: trained runs over a list of images -> a CSV of per-image probabilities.

Each image goes through the run's own declared chain (the bundle's ``task#preprocessing``, rounded to uint8 as
the cache stores it, then ``task#val_transforms``), so inference sees exactly what validation saw. Flip TTA
averages the sigmoid over flipped copies. The CSV has one row per image::

    image,prob,<run>,<run>...

``image`` is the resolved path, ``prob`` the mean over the runs (the fold mean), and one column per run
(``<bundle>/fold<k>``). With ``assignments`` each image is predicted only by the runs named for it (out-of-fold
predictions: every training image by the model that did not train on it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stas_pipeline.core.bundles import parsed_content
from stas_pipeline.core.lmdb_cache import Preprocessing, to_uint8
from stas_pipeline.core.models import build_network
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.run_recorder import CheckpointError, load_model_weights
from stas_pipeline.tasks.classification.scores_csv import write_scores_csv

RECORDED_NOT_KNOBS = {"bundle", "task"}  # recorded beside the knobs, but names of bundle sections, not values
TTA_FLIPS = {"none": [()], "h": [(), (-1,)], "v": [(), (-2,)], "hv": [(), (-1,), (-2,), (-2, -1)]}


@dataclass
class ImageLevelRun:
    """A trained image-level model with the chain its images go through."""

    name: str
    model: nn.Module
    preprocessing: Preprocessing
    transform: Callable
    fold: int | None = None

    @classmethod
    def of(cls, spec: ImageLevelRun | Sequence) -> ImageLevelRun:
        """A run, or ``[name, model, preprocessing, transform]`` as a bundle declares it."""
        if isinstance(spec, ImageLevelRun):
            return spec
        name, model, preprocessing, transform = spec
        return cls(name, model, Preprocessing.of(preprocessing), transform)


def load_image_level_run(checkpoint: str | Path, info: dict, device: str | torch.device = "cpu") -> ImageLevelRun:
    """The run of ``checkpoint`` (``info`` is its best.json): the recorded network with the checkpoint's weights,
    and the chain of its bundle with the run's recorded knobs (image size, crop, ...)."""
    model = build_network(**{**info["network"], "encoder_weights": None})
    load_model_weights(model, checkpoint)
    knobs = {k: v for k, v in info.items() if k not in RECORDED_NOT_KNOBS and not isinstance(v, (dict, list))}
    preprocessing, transform = parsed_content(info["bundle"], ["task#preprocessing", "task#val_transforms"],
                                              {**knobs, "encoder_weights": "none"})
    name = f"{info['bundle']}/fold{info.get('fold')}"
    return ImageLevelRun(name, model.to(device).eval(), Preprocessing.of(preprocessing), transform, info.get("fold"))


def run_info_of(checkpoint: str | Path) -> dict:
    """The ``best.json`` (or ``metrics.json``) written beside a checkpoint by training."""
    checkpoint = Path(checkpoint)
    for name in ("best.json", "metrics.json"):
        if checkpoint.with_name(name).is_file():
            return json.loads(checkpoint.with_name(name).read_text())
    raise CheckpointError(f"{checkpoint}: no best.json or metrics.json beside it to rebuild its model from")


class _Inputs(torch.utils.data.Dataset):
    """Each image through every run's chain, in DataLoader workers; an unreadable file yields its error."""

    def __init__(self, paths: Sequence[Path], runs: Sequence[ImageLevelRun]):
        self.paths, self.chains = list(paths), [(r.preprocessing, r.transform) for r in runs]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Path, list[torch.Tensor] | str]:
        try:
            inputs = []
            for preprocessing, transform in self.chains:
                image = torch.from_numpy(to_uint8(preprocessing({"image": str(self.paths[i])})["image"]))
                inputs.append(torch.as_tensor(transform({"image": image})["image"]).float())
            return self.paths[i], inputs
        except Exception as err:  # noqa: BLE001 - an unreadable image is reported, the rest go on
            return self.paths[i], f"{type(err).__name__}: {err}".splitlines()[0]


@torch.no_grad()
def flip_mean_probability(model: nn.Module, x: torch.Tensor, tta: str = "none", amp: bool = False) -> torch.Tensor:
    """Mean sigmoid of the first logit over flipped copies of ``x`` (N, C, H, W): one probability per image."""
    total = torch.zeros(x.shape[0], device=x.device)
    for dims in TTA_FLIPS[tta]:
        with torch.autocast(x.device.type, enabled=amp and x.device.type == "cuda"):
            logits = model(torch.flip(x, dims) if dims else x)
        total += torch.sigmoid(logits.float().reshape(x.shape[0], -1)[:, 0])
    return total / len(TTA_FLIPS[tta])


def predict_scores(
    runs: Sequence[ImageLevelRun | Sequence],
    images: Sequence[str | Path],
    out: str | Path | None = None,
    tta: str = "none",
    batch_size: int = 8,
    num_workers: int = 0,
    amp: bool = False,
    overwrite: bool = False,
    problems: Problems | None = None,
    assignments: Mapping[str, Sequence[str]] | None = None,
) -> tuple[Problems, list[dict]]:
    """Predict ``images`` with ``runs`` into the CSV ``out`` (see module doc); returns the problems and rows."""
    problems = problems or Problems("predict")
    if tta not in TTA_FLIPS:
        raise ValueError(f"tta must be one of {list(TTA_FLIPS)}, got {tta!r}")
    runs = [ImageLevelRun.of(r) for r in runs]
    for run in runs:
        run.model.eval()
    paths = [Path(p).resolve() for p in images]
    loader = torch.utils.data.DataLoader(_Inputs(paths, runs), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=list)
    rows = []
    for batch in tqdm(loader, desc="predict", unit="batch"):
        readable = [(path, inputs) for path, inputs in batch if not isinstance(inputs, str)]
        for path, error in batch:
            if isinstance(error, str):
                problems.skip(path, f"cannot read image: {error}")
        if not readable:
            continue
        members = [assignments.get(str(path), []) if assignments is not None else [r.name for r in runs]
                   for path, _ in readable]
        probs: dict[tuple[int, str], float] = {}
        for k, run in enumerate(runs):  # each run on the images it is assigned to only
            chosen = [i for i, names in enumerate(members) if run.name in names]
            if chosen:
                x = torch.stack([readable[i][1][k] for i in chosen]).to(next(run.model.parameters()).device)
                values = flip_mean_probability(run.model, x, tta, amp).cpu().tolist()
                probs.update({(i, run.name): v for i, v in zip(chosen, values, strict=True)})
        for i, (path, _) in enumerate(readable):
            values = {name: probs[i, name] for name in members[i]}
            if not values:
                problems.skip(path, "no run assigned to this image")
                continue
            rows.append({"image": str(path), "prob": float(np.mean(list(values.values()))), **values})
            problems.count("predicted")
    if out is not None:
        write_scores_csv(out, rows, [r.name for r in runs], overwrite)
    return problems, rows
