"""Losses: the segmentation task's (the STAS recipe's Dice loss or the HuBMAP recipe's BCE + Lovasz hinge, plus the
auxiliary "image has foreground" head and deep supervision when the model has them); and the glaucoma recipe's
binary cross-entropy with asymmetrically smoothed targets and an optional focal term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.losses import DiceLoss
from segmentation_models_pytorch.losses import LovaszLoss
from torch import nn

MASK_LOSSES = ("dice", "bce_lovasz")


class SegmentationLoss(nn.Module):
    """The segmentation task's loss on what the network returns in training (see
    :class:`stas_pipeline.core.models.AuxOutputInTraining`): mask logits, ``(mask_logits, class_logits)`` or a dict
    ``{"masks", "labels", "deep"}``.

    - the mask term, ``mask_loss``: ``"dice"`` (the STAS recipe's ``DiceLoss(sigmoid=True)``, plus ``bce_weight``
      x the pixelwise BCE when > 0: nnU-Net's Dice + BCE) or ``"bce_lovasz"`` (the HuBMAP recipe's BCE + Lovasz
      hinge, smp's binary ``LovaszLoss``, Berman et al. 2018); ``batch``: Dice over the whole batch, or one Lovasz
      hinge over the batch's pixels (else per image, averaged); ``dice_batch`` sets the Dice's alone (None: as
      ``batch``): per image, each image's foreground weighs the same however small (an empty mask's Dice is
      nearly constant, so add BCE to penalise false positives there);
    - with class logits, ``aux_weight`` x their BCE against "the mask has foreground";
    - with deep-supervision logits, ``deep_weight`` x (BCE + Lovasz hinge) of each, on the images whose mask has
      foreground only (zero, still in the graph, when none has).
    """

    def __init__(self, mask_loss: str = "dice", aux_weight: float = 0.1, bce_weight: float = 0.0,
                 deep_weight: float = 0.1, batch: bool = False, dice_batch: bool | None = None):
        super().__init__()
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {', '.join(MASK_LOSSES)}, got {mask_loss!r}")
        if mask_loss != "dice" and bce_weight:
            raise ValueError(f"bce_weight {bce_weight} adds BCE to the Dice loss; mask_loss {mask_loss!r} has its own")
        self.mask_loss, self.bce_weight = mask_loss, bce_weight
        self.aux_weight, self.deep_weight = aux_weight, deep_weight
        self.dice = DiceLoss(sigmoid=True, batch=batch if dice_batch is None else dice_batch)
        self.lovasz = LovaszLoss("binary", per_image=not batch)

    def bce_lovasz(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE + Lovasz hinge of mask logits (N, 1, H, W) against a 0/1 mask of the same shape."""
        logits = logits.float()
        return F.binary_cross_entropy_with_logits(logits, target) + self.lovasz(logits, target)

    def forward(self, pred: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | dict, target: torch.Tensor
                ) -> torch.Tensor:
        if isinstance(pred, dict):
            masks, logits, deep = pred["masks"], pred.get("labels"), pred.get("deep", [])
        else:
            (masks, logits), deep = (pred if isinstance(pred, (tuple, list)) else (pred, None)), []
        target = torch.as_tensor(target).float()
        if self.mask_loss == "dice":
            loss = self.dice(masks, target)
            if self.bce_weight > 0:
                loss = loss + self.bce_weight * F.binary_cross_entropy_with_logits(masks.float(), target)
        else:
            loss = self.bce_lovasz(masks, target)
        has_fg = target.flatten(1).amax(dim=1) > 0
        if logits is not None:
            loss = loss + self.aux_weight * F.binary_cross_entropy_with_logits(logits, has_fg[:, None].float())
        if deep:
            keep = has_fg.nonzero()[:, 0]
            for stage in deep:
                loss = loss + self.deep_weight * (self.bce_lovasz(stage[keep], target[keep]) if len(keep)
                                                  else stage.sum() * 0.0)
        return loss


class SmoothedBCELoss(nn.Module):
    """Binary cross-entropy with logits for one logit per image, against targets smoothed as in the glaucoma
    recipe: a positive's target is ``1 - smoothing``, a negative's ``smoothing / 2`` (a soft target t in [0, 1]
    becomes ``t * (1 - smoothing) + (1 - t) * smoothing / 2``); ``smoothing = 0`` is plain BCE.

    ``focal_gamma > 0`` multiplies each term by ``(1 - p_t) ** focal_gamma`` (Lin et al. 2017), where
    ``p_t = p * t + (1 - p) * (1 - t)`` is the probability given to the (smoothed) target, as
    ``torchvision.ops.sigmoid_focal_loss`` with ``alpha=-1`` computes it: confident right answers weigh less.

    Logits (N,) or (N, 1); targets (N,) or (N, 1), integers, booleans or floats in [0, 1] (not checked, to keep
    the loss free of device synchronisation). ``reduction``: "mean" (default), "sum" or "none" (a (N,) tensor).
    """

    def __init__(self, smoothing: float = 0.0, focal_gamma: float = 0.0, reduction: str = "mean"):
        super().__init__()
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 2 / 3:
            raise ValueError("smoothing must be a number in [0, 2/3) (the positive target 1 - a must stay above the "
                             f"negative target a / 2), got {smoothing!r}")
        if isinstance(focal_gamma, bool) or not isinstance(focal_gamma, (int, float)) or not focal_gamma >= 0.0:
            raise ValueError(f"focal_gamma must be a number >= 0 (0 = no focal term), got {focal_gamma!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.smoothing, self.focal_gamma, self.reduction = float(smoothing), float(focal_gamma), reduction

    def smooth(self, target: torch.Tensor) -> torch.Tensor:
        """Targets in [0, 1] -> the smoothed targets the loss is computed against."""
        return target * (1.0 - self.smoothing) + (1.0 - target) * (self.smoothing / 2)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = _one_per_image(logits, "logits"), _one_per_image(target, "targets")
        if logits.shape != target.shape:
            raise ValueError(f"{logits.shape[0]} logits but {target.shape[0]} targets")
        target = self.smooth(target.to(device=logits.device, dtype=logits.dtype))
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.focal_gamma > 0:
            p = torch.sigmoid(logits)
            p_t = p * target + (1 - p) * (1 - target)
            loss = loss * (1 - p_t) ** self.focal_gamma
        if self.reduction == "mean":
            return loss.mean()
        return loss.sum() if self.reduction == "sum" else loss

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, focal_gamma={self.focal_gamma}, reduction={self.reduction!r}"


def _one_per_image(x: torch.Tensor, what: str) -> torch.Tensor:
    """(N,) or (N, 1) -> (N,); anything else is refused."""
    x = torch.as_tensor(x)
    if isinstance(x, MetaTensor):
        x = x.as_tensor()
    if x.ndim == 2 and x.shape[1] == 1:
        return x[:, 0]
    if x.ndim == 1:
        return x
    raise ValueError(f"expected {what} of shape (N,) or (N, 1) (one per image), got {tuple(x.shape)}")
