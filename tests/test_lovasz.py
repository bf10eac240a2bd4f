"""The segmentation loss's BCE + Lovasz hinge (``mask_loss: "bce_lovasz"``) against an independent transcription
of Berman et al.'s reference ``lovasz_hinge`` (``lovasz_losses.py``, 2018) on fixed tensors, plus cases computed
by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stas_pipeline.core.losses import SegmentationLoss


def lovasz_grad(gt_sorted: np.ndarray) -> np.ndarray:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. the sorted errors (Alg. 1 of the paper)."""
    gts = gt_sorted.sum()
    intersection = gts - np.cumsum(gt_sorted)
    union = gts + np.cumsum(1.0 - gt_sorted)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_hinge_flat(logits: np.ndarray, labels: np.ndarray) -> float:
    signs = 2.0 * labels - 1.0
    errors = 1.0 - logits * signs
    order = np.argsort(-errors, kind="stable")
    return float(np.dot(np.maximum(errors[order], 0.0), lovasz_grad(labels[order])))


def lovasz_hinge(logits: np.ndarray, labels: np.ndarray, per_image: bool = True) -> float:
    """The reference: per image (averaged) or over the whole batch at once."""
    if per_image:
        return float(np.mean([lovasz_hinge_flat(g.ravel(), t.ravel()) for g, t in zip(logits, labels, strict=True)]))
    return lovasz_hinge_flat(logits.ravel(), labels.ravel())


def fixed_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four 8 x 8 logit maps and masks: one mask empty, one full, two random."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 1, 8, 8, generator=g) * 2
    target = (torch.rand(4, 1, 8, 8, generator=g) > 0.6).float()
    target[0], target[1] = 0.0, 1.0
    return logits, target


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_image", [True, False])
def test_the_lovasz_hinge_matches_the_reference(seed, per_image):
    logits, target = fixed_batch(seed)
    loss = SegmentationLoss("bce_lovasz", batch=not per_image)
    expected = lovasz_hinge(logits.double().numpy(), target.double().numpy(), per_image)
    assert loss.lovasz(logits, target).item() == pytest.approx(expected, rel=1e-5)
    total = loss(logits, target).item()
    assert total == pytest.approx(F.binary_cross_entropy_with_logits(logits, target).item() + expected, rel=1e-5)


def test_per_image_and_whole_batch_differ():
    logits, target = fixed_batch(0)
    ref = (lovasz_hinge(logits.numpy(), target.numpy(), True), lovasz_hinge(logits.numpy(), target.numpy(), False))
    assert ref[0] != pytest.approx(ref[1])


def test_cases_computed_by_hand():
    lovasz = SegmentationLoss("bce_lovasz").lovasz
    target = torch.zeros(2, 1, 4, 4)
    target[0, :, 1:3, 1:3] = 1
    right = torch.where(target > 0, 3.0, -3.0)  # every pixel on the right side with a margin over 1: no hinge
    assert lovasz(right, target).item() == 0.0
    # one foreground pixel at logit 0: error 1, gradient 1
    assert lovasz(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)).item() == pytest.approx(1.0)
    # foreground at 0.5 (error 0.5) and background at 0 (error 1): sorted [bg, fg], Jaccard losses [1/2, 1],
    # gradient [1/2, 1/2]: 1 x 1/2 + 0.5 x 1/2
    two = lovasz(torch.tensor([[[[0.5, 0.0]]]]), torch.tensor([[[[1.0, 0.0]]]]))
    assert two.item() == pytest.approx(0.75)


def test_the_loss_trains_towards_the_mask():
    logits, target = fixed_batch(3)
    logits = logits.requires_grad_()
    loss = SegmentationLoss("bce_lovasz")(logits, target)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[target.bool()] <= 0).all() and (logits.grad[~target.bool()] >= 0).all()


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="mask_loss must be one of dice, bce_lovasz"):
        SegmentationLoss("lovasz")
    with pytest.raises(ValueError, match="bce_weight 0.5 adds BCE to the Dice loss"):
        SegmentationLoss("bce_lovasz", bce_weight=0.5)
