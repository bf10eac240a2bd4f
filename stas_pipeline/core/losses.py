"""Losses: the recipe's Dice loss, plus the auxiliary "image has STAS" head when the model has one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn


class DiceWithAuxLoss(nn.Module):
    """``DiceLoss(sigmoid=True)`` on the mask logits; when the prediction is ``(mask_logits, class_logits)``
    (a model with an auxiliary head, in training) adds ``aux_weight`` x BCE of the class logits against
    "the mask has foreground"."""

    def __init__(self, aux_weight: float = 0.1, **dice_kwargs):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, **dice_kwargs)
        self.aux_weight = aux_weight

    def forward(self, pred: torch.Tensor | tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(pred, (tuple, list)):
            masks, logits = pred
            has_fg = target.flatten(1).amax(dim=1, keepdim=True).float()
            return self.dice(masks, target) + self.aux_weight * F.binary_cross_entropy_with_logits(logits, has_fg)
        return self.dice(pred, target)
