"""The grading recipe's three heads on one timm classifier: what each outputs and how it becomes a grade score.

- ``regression``: one output, trained with MSE against the grade; the score is the output.
- ``cumulative``: four outputs, BCE against "grade > k" for k = 0..3; the score is the sum of the sigmoids.
- ``expectation``: five outputs, cross-entropy plus MSE between the softmax expectation and the grade; the score
  is the expectation.

Every head gives a continuous score on the grade scale (0..4), cut into a grade at [0.5, 1.5, 2.5, 3.5] (or
searched cut points), so heads can be ensembled. :func:`prior_bias` gives the output biases at which a head
starts from its training grades (the bundles' ``prior_init``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from monai.transforms import MapTransform
from torch import nn

N_GRADES = 5
HEAD_OUTPUTS = {"regression": 1, "cumulative": N_GRADES - 1, "expectation": N_GRADES}


def head_outputs(head: str) -> int:
    """Number of network outputs of ``head``."""
    if head not in HEAD_OUTPUTS:
        raise ValueError(f"unknown grading head {head!r}; known: {', '.join(HEAD_OUTPUTS)}")
    return HEAD_OUTPUTS[head]


def grade_score(logits: torch.Tensor, head: str) -> torch.Tensor:
    """Scores (N,) on the grade scale from logits (N, outputs); one image's logits (outputs,) give a (1,) score."""
    x = logits.float().reshape(-1, head_outputs(head))
    if head == "regression":
        return x[:, 0]
    if head == "cumulative":
        return torch.sigmoid(x).sum(dim=1)
    return (torch.softmax(x, dim=1) * torch.arange(N_GRADES, device=x.device, dtype=x.dtype)).sum(dim=1)


def prior_bias(head: str, grades: Sequence[float]) -> list[float]:
    """Output biases at which ``head`` starts from the grade distribution of ``grades`` (the training labels)
    instead of from the middle of the scale: regression the mean grade; cumulative the logits of the shares of
    "grade > k"; expectation the log shares of each grade. Shares are clipped to [1e-3, 1 - 1e-3]."""
    g = torch.as_tensor([float(x) for x in grades])
    if g.numel() == 0:
        raise ValueError("prior_bias needs at least one training grade")
    if head == "regression":
        return [float(g.mean())]
    steps = torch.arange(N_GRADES - 1 if head == "cumulative" else N_GRADES, dtype=g.dtype)
    if head == "cumulative":
        return torch.logit((g.round()[:, None] > steps).float().mean(0).clamp(1e-3, 1 - 1e-3)).tolist()
    head_outputs(head)
    return torch.log((g.round()[:, None] == steps).float().mean(0).clamp(1e-3, 1 - 1e-3)).tolist()


def scorer_for_run(info: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The scores of a trained run recorded with ``head`` in its best.json."""
    return partial(grade_score, head=info["head"])


class GradeScored(MapTransform):
    """Replaces ``keys`` (a model's logits) by their grade score, for the evaluator's post-processing."""

    def __init__(self, keys: str | list[str], head: str):
        super().__init__(keys)
        self.head = head
        head_outputs(head)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = grade_score(torch.as_tensor(d[key]), self.head)
        return d


class OrdinalLoss(nn.Module):
    """The loss of a grading head (see the module doc); ``expectation_weight`` weighs the expectation-MSE term of
    the ``expectation`` head. Targets: grades 0..4, shape (N,) or (N, 1)."""

    def __init__(self, head: str = "regression", expectation_weight: float = 1.0):
        super().__init__()
        head_outputs(head)
        self.head, self.expectation_weight = head, float(expectation_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        grade = torch.as_tensor(target).to(logits.device).reshape(-1).float()
        x = logits.float().reshape(grade.shape[0], -1)
        if self.head == "regression":
            return F.mse_loss(x[:, 0], grade)
        if self.head == "cumulative":
            steps = torch.arange(N_GRADES - 1, device=x.device, dtype=x.dtype)
            return F.binary_cross_entropy_with_logits(x, (grade[:, None] > steps).to(x.dtype))
        ce = F.cross_entropy(x, grade.round().long())
        return ce + self.expectation_weight * F.mse_loss(grade_score(x, "expectation"), grade)
