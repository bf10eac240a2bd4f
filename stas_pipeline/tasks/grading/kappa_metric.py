"""The grading task's key metric for the MONAI evaluator: quadratic weighted kappa of the scores cut at the default
cut points, over the whole validation fold (gathered across DDP ranks). Where the kappa is undefined (every true
and predicted grade the same one) it counts as 0, no better than chance, so checkpointing can compare it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from stas_pipeline.tasks.grading.metrics import DEFAULT_CUTS, cut, kappa_from_confusion


class QuadraticKappa(Metric):
    """``output_transform`` gives ``(scores, grades)``: tensors or lists of per-image tensors (decollated)."""

    def __init__(self, output_transform=lambda x: x, cuts: Sequence[float] = DEFAULT_CUTS,
                 device: str | torch.device = "cpu"):
        self.cuts = tuple(cuts)
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._confusion = torch.zeros(5, 5, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: tuple) -> None:
        scores, grades = (torch.cat([torch.as_tensor(v).reshape(-1).float().cpu() for v in part])
                          if isinstance(part, (list, tuple)) else torch.as_tensor(part).reshape(-1).float().cpu()
                          for part in output)
        predicted = cut(scores.numpy(), self.cuts)
        for t, p in zip(grades.round().long().tolist(), predicted.tolist(), strict=True):
            self._confusion[t, p] += 1

    @sync_all_reduce("_confusion")
    def compute(self) -> float:
        kappa = kappa_from_confusion(self._confusion.cpu().numpy())
        return 0.0 if math.isnan(kappa) else float(kappa)
