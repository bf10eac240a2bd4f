"""Image-level inference (classification, and grading with its own scores): trained runs over a list of images
-> a CSV of one score per image.

Each image goes through the run's own declared chain (the bundle's ``task#preprocessing``, rounded to uint8 as
the cache stores it, then ``task#val_transforms``), so inference sees exactly what validation saw. Each run's
``score`` turns logits into one number per image (classification: the sigmoid of the logit; grading: the head's
grade score); flip TTA averages it over flipped copies. The CSV has one row per image::

    image,prob,<run>,<run>...            (classification)
    image,score,grade,<run>,<run>...     (grading: ``value="score"`` and ``grade_of``)

``image`` is the resolved path, ``prob``/``score`` the mean over the runs (the fold mean), and one column per run
(``<bundle>/fold<k>``). With ``assignments`` each image is predicted only by the runs named for it (out-of-fold
predictions: every training image by the model that did not train on it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stas_pipeline.core.lmdb_cache import to_uint8
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.trained_runs import TTA_FLIPS, TrainedRun
from stas_pipeline.tasks.classification.scores_csv import write_scores_csv


class _Inputs(torch.utils.data.Dataset):
    """Each image through every run's chain, in DataLoader workers; an unreadable file yields its error."""

    def __init__(self, paths: Sequence[Path], runs: Sequence[TrainedRun]):
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
def flip_mean_score(run: TrainedRun, x: torch.Tensor, tta: str = "none", amp: bool = False) -> torch.Tensor:
    """Mean of ``run.score`` over flipped copies of ``x`` (N, C, H, W): one score per image."""
    total = torch.zeros(x.shape[0], device=x.device)
    for dims in TTA_FLIPS[tta]:
        with torch.autocast(x.device.type, enabled=amp and x.device.type == "cuda"):
            logits = run.model(torch.flip(x, dims) if dims else x)
        total += run.score(logits.float())
    return total / len(TTA_FLIPS[tta])


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
) -> tuple[Problems, list[dict]]:
    """Predict ``images`` with ``runs`` into the CSV ``out`` (see module doc); returns the problems and rows.
    ``value`` names the mean's column; ``grade_of`` adds a ``grade`` column from the mean."""
    problems = problems or Problems("predict")
    if tta not in TTA_FLIPS:
        raise ValueError(f"tta must be one of {list(TTA_FLIPS)}, got {tta!r}")
    runs = [TrainedRun.of(r) for r in runs]
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
                values = flip_mean_score(run, x, tta, amp).cpu().tolist()
                probs.update({(i, run.name): v for i, v in zip(chosen, values, strict=True)})
        for i, (path, _) in enumerate(readable):
            values = {name: probs[i, name] for name in members[i]}
            if not values:
                problems.skip(path, "no run assigned to this image")
                continue
            mean = float(np.mean(list(values.values())))
            grade = {"grade": grade_of(mean)} if grade_of is not None else {}
            rows.append({"image": str(path), value: mean, **grade, **values})
            problems.count("predicted")
    if out is not None:
        columns = [value, *(["grade"] if grade_of is not None else [])]
        write_scores_csv(out, rows, [r.name for r in runs], overwrite, columns)
    return problems, rows
