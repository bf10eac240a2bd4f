"""Image-level inference (classification, and grading with its own scores): trained runs over a list of images
-> a CSV of one score per image.

Each image goes through the run's own declared chain (the bundle's ``task#preprocessing``, rounded to uint8 as
the cache stores it, then ``task#val_transforms``), so inference sees exactly what validation saw. Each run's
``score`` turns logits into one number per image (classification: the sigmoid of the logit; grading: the head's
grade score); TTA averages it over views of the model input. The CSV has one row per image::

    image,prob,<run>,<run>...            (classification)
    image,score,grade,<run>,<run>...     (grading: ``value="score"`` and ``grade_of``)

``image`` is the resolved path, ``prob``/``score`` the mean over the runs (the fold mean), and one column per run
(``<bundle>/fold<k>``). With ``assignments`` each image is predicted only by the runs named for it (out-of-fold
predictions: every training image by the model that did not train on it).

TTA (``tta``), on the model input x of size S = H x W (the training size, after the chain), one forward pass per
view, the score averaged over the views:

- ``none``: x (1 pass); ``h`` / ``v``: x and its horizontal / vertical flip (2); ``hv``: x, both flips and
  their composition (4); ``d4``: those four and each transposed: the rotations by 90 degrees and reflections
  (8; the transposed views are W x H, for networks that take any input size).
- ``two-crop``: x and its centre crop (2).
- ``ten-crop``: torchvision's ``TenCrop``: the four corner crops and the centre crop of x, and the same five of
  x flipped horizontally (10).

Crops are round(0.875 H) x round(0.875 W) (the centre one placed as torchvision's ``center_crop`` places it),
each resized back to S (bilinear, ``align_corners=False``) so that the model sees its training size.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF
from tqdm import tqdm

from stas_pipeline.core.datalist import load_fold, test_images
from stas_pipeline.core.errors import NothingWrittenError
from stas_pipeline.core.images import images_in_folder, read_failure
from stas_pipeline.core.lmdb_cache import describe, to_uint8
from stas_pipeline.core.options import TTA_VIEWS
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.sharding import Journal
from stas_pipeline.core.trained_runs import TrainedRun, load_trained_run, tta_view
from stas_pipeline.tasks.base import Predictor
from stas_pipeline.tasks.classification.scores_csv import scores_cells, scores_header, write_scores_csv
from stas_pipeline.tasks.classification.task import TTA_MODES

CROP_FRACTION = 0.875


class _Inputs(torch.utils.data.Dataset):
    """Each image through the runs' chains, in DataLoader workers, each distinct chain once (the folds of one
    bundle share theirs: one decode per image, not one per run); an unreadable file yields its error."""

    def __init__(self, paths: Sequence[Path], runs: Sequence[TrainedRun]):
        keys = [json.dumps([r.preprocessing.spec, describe(r.transform)], default=str) for r in runs]
        distinct = list(dict.fromkeys(keys))
        self.paths = list(paths)
        self.chains = [(runs[keys.index(k)].preprocessing, runs[keys.index(k)].transform) for k in distinct]
        self.index = [distinct.index(k) for k in keys]  # run -> its chain

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Path, list[torch.Tensor] | str]:
        try:
            inputs = []
            for preprocessing, transform in self.chains:
                image = torch.from_numpy(to_uint8(preprocessing({"image": str(self.paths[i])})["image"]))
                inputs.append(torch.as_tensor(transform({"image": image})["image"]).float())
            return self.paths[i], [inputs[k] for k in self.index]
        except Exception as err:  # noqa: BLE001 - an unreadable image is reported, the rest go on
            return self.paths[i], read_failure(self.paths[i], err)


def tta_views(x: torch.Tensor, tta: str) -> Iterator[torch.Tensor]:
    """The views of ``x`` (N, C, H, W) that ``tta`` averages over (see module doc), one at a time."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {list(TTA_MODES)}, got {tta!r}")
    if tta in TTA_VIEWS:
        yield from (tta_view(x, view) for view in TTA_VIEWS[tta])
        return
    size = [round(CROP_FRACTION * s) for s in x.shape[-2:]]
    crops = [x, TF.center_crop(x, size)] if tta == "two-crop" else TF.ten_crop(x, size)
    for crop in crops:
        yield crop if crop.shape == x.shape else F.interpolate(crop, size=x.shape[-2:], mode="bilinear",
                                                               align_corners=False)


@torch.no_grad()
def tta_mean_score(run: TrainedRun, x: torch.Tensor, tta: str = "none", amp: bool = False) -> torch.Tensor:
    """Mean of ``run.score`` over the TTA views of ``x`` (N, C, H, W): one score per image."""
    total, views = torch.zeros(x.shape[0], device=x.device), 0
    for view in tta_views(x, tta):
        with torch.autocast(x.device.type, enabled=amp and x.device.type == "cuda"):
            logits = run.model(view)
        total, views = total + run.score(logits.float()), views + 1
    return total / views


def predict_scores(
    runs: Sequence[TrainedRun | Sequence],
    images: Sequence[str | Path],
    out: str | Path | None = None,
    tta: str = "none",
    batch_size: int = 8,
    num_workers: int = 0,
    amp: bool = False,
    overwrite: bool = False,
    problems: Problems | None = None,
    assignments: Mapping[str, Sequence[str]] | None = None,
    value: str = "prob",
    grade_of: Callable[[float], int] | None = None,
    journal: Journal | None = None,
) -> tuple[Problems, list[dict]]:
    """Predict ``images`` with ``runs`` into the CSV ``out`` (see module doc); returns the problems and rows.
    ``value`` names the mean's column; ``grade_of`` adds a ``grade`` column from the mean. An image that cannot be
    read is reported and skipped; :class:`NothingWrittenError` (nothing written) when every image is. With a
    ``journal`` (a part of a sharded run) each row goes to it as predicted, and no CSV is written."""
    problems = problems or Problems("predict")
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {list(TTA_MODES)}, got {tta!r}")
    runs = [TrainedRun.of(r) for r in runs]
    columns = [value, *(["grade"] if grade_of is not None else [])]
    header = scores_header([r.name for r in runs], columns)
    if journal is not None:
        journal.start(header)
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
                values = tta_mean_score(run, x, tta, amp).cpu().tolist()
                probs.update({(i, run.name): v for i, v in zip(chosen, values, strict=True)})
        for i, (path, _) in enumerate(readable):
            values = {name: probs[i, name] for name in members[i]}
            if not values:
                problems.skip(path, "no run assigned to this image")
                continue
            mean = float(np.mean(list(values.values())))
            grade = {"grade": grade_of(mean)} if grade_of is not None else {}
            rows.append({"image": str(path), value: mean, **grade, **values})
            if journal is not None:
                journal.record(path, scores_cells(rows[-1], header))
            problems.count("predicted")
    if journal is not None:
        return problems, rows
    if paths and not rows:
        raise NothingWrittenError(f"{out or 'predict'}: every image was skipped; nothing written")
    if out is not None:
        write_scores_csv(out, rows, [r.name for r in runs], overwrite, columns)
    return problems, rows


def predictor(args: argparse.Namespace, infos: list[dict], scorer_for: Callable[[dict], Callable | None],
              value: str = "prob", grade_of: Callable[[float], int] | None = None
              ) -> tuple[list[Path], Predictor]:
    """``stas predict`` of image-level runs: the images to predict (``--images``, the datalist's test list, or
    with ``--out-of-fold`` each training image by the run of its fold) and their predictor, writing the CSV of
    :func:`predict_scores` (``scorer_for(info)``: a run's score, None for the probability)."""
    runs = []
    for checkpoint, info in zip(args.checkpoint, infos, strict=True):
        run = load_trained_run(checkpoint, info, args.device, args.stain_shift, args.backend)
        run.score = scorer_for(info) or run.score
        runs.append(run)
    assignments = None
    if args.out_of_fold:
        assignments = {}
        for run in runs:
            for entry in load_fold(args.datalist, run.fold)[1]:
                assignments.setdefault(str(Path(entry["image"]).resolve()), []).append(run.name)
        images = list(assignments)
    else:
        images = images_in_folder(args.images) if args.images else test_images(args.datalist)

    def predict(chosen: Sequence[Path], estimating: bool, journal: Journal | None = None) -> Problems:
        return predict_scores(runs, chosen, None if estimating else args.out, args.tta, args.batch_size,
                              args.workers, args.amp, args.overwrite, assignments=assignments, value=value,
                              grade_of=grade_of, journal=journal)[0]

    return images, predict
