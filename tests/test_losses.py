"""SmoothedBCELoss: asymmetric label smoothing (positive 1 - a, negative a / 2) and an optional focal term."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.losses import DiceLoss
from torchvision.ops import sigmoid_focal_loss

from stas_pipeline.core.losses import SegmentationLoss, SmoothedBCELoss


def bce(x: float, t: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_matches_hand_computed_bce_with_smoothed_targets():
    logits = torch.tensor([[2.0], [-1.0], [0.5], [-3.0]])
    targets = torch.tensor([1, 0, 1, 0])
    a = 0.1  # positives -> 0.9, negatives -> 0.05
    expected = (bce(2.0, 0.9) + bce(-1.0, 0.05) + bce(0.5, 0.9) + bce(-3.0, 0.05)) / 4
    loss = SmoothedBCELoss(smoothing=a)(logits, targets)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(SmoothedBCELoss(a).smooth(torch.tensor([1.0, 0.0, 0.5])),
                               torch.tensor([0.9, 0.05, 0.475]))


@pytest.mark.parametrize("logit_shape", [(6,), (6, 1)])
@pytest.mark.parametrize("target_kind", ["int", "float", "bool", "column"])
def test_no_smoothing_is_plain_bce(logit_shape, target_kind):
    torch.manual_seed(0)
    logits = torch.randn(logit_shape)
    hard = torch.tensor([1, 0, 0, 1, 1, 0])
    target = {"int": hard, "float": hard.float(), "bool": hard.bool(), "column": hard[:, None].float()}[target_kind]
    expected = F.binary_cross_entropy_with_logits(logits.reshape(-1), hard.float())
    torch.testing.assert_close(SmoothedBCELoss()(logits, target), expected)
    torch.testing.assert_close(SmoothedBCELoss(smoothing=0.0, focal_gamma=0.0)(logits, target), expected)


def test_focal_term_matches_torchvision_and_down_weights_easy_examples():
    torch.manual_seed(1)
    logits, target = torch.randn(16) * 3, (torch.rand(16) > 0.5).float()
    torch.testing.assert_close(SmoothedBCELoss(focal_gamma=2.0)(logits, target),
                               sigmoid_focal_loss(logits, target, alpha=-1, gamma=2.0, reduction="mean"))

    easy, hard = torch.tensor([4.0]), torch.tensor([-1.0])  # both positives: confident right vs wrong
    one = torch.tensor([1])
    plain, focal = SmoothedBCELoss(), SmoothedBCELoss(focal_gamma=2.0)
    easy_weight = (focal(easy, one) / plain(easy, one)).item()
    hard_weight = (focal(hard, one) / plain(hard, one)).item()
    assert easy_weight < 0.001 and hard_weight > 0.5  # (1 - p_t)^2: 0.018^2 vs 0.73^2
    # every term shrinks, with or without smoothing
    for a in (0.0, 0.1):
        per_plain = SmoothedBCELoss(a, reduction="none")(logits, target)
        per_focal = SmoothedBCELoss(a, focal_gamma=2.0, reduction="none")(logits, target)
        assert per_focal.shape == (16,) and bool((per_focal < per_plain).all())


def test_gradient_flows_towards_the_smoothed_target():
    logits = torch.tensor([[5.0], [0.0], [-5.0]], requires_grad=True)
    loss = SmoothedBCELoss(smoothing=0.2, focal_gamma=1.0)(logits, torch.tensor([[1.0], [1.0], [0.0]]))
    loss.backward()
    grad = logits.grad[:, 0]
    assert torch.isfinite(grad).all()
    # the smoothed targets (0.8, 0.8, 0.1) pull a too-confident positive and negative back, and 0 up
    assert grad[0] > 0 and grad[1] < 0 and grad[2] < 0


def test_reductions_and_bad_input():
    logits, target = torch.tensor([1.0, -2.0]), torch.tensor([1, 0])
    per = SmoothedBCELoss(0.1, reduction="none")(logits, target)
    torch.testing.assert_close(SmoothedBCELoss(0.1, reduction="sum")(logits, target), per.sum())
    torch.testing.assert_close(SmoothedBCELoss(0.1)(logits, target), per.mean())
    with pytest.raises(ValueError, match="one per image"):
        SmoothedBCELoss()(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="3 logits but 4 targets"):
        SmoothedBCELoss()(torch.zeros(3, 1), torch.zeros(4))
    for kwargs in ({"smoothing": -0.1}, {"smoothing": 0.7}, {"focal_gamma": -1.0}, {"reduction": "max"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SmoothedBCELoss(**kwargs)


def test_declared_in_a_bundle():
    config = {"label_smoothing": 0.1, "focal_gamma": 0.0,
              "loss": {"_target_": "stas_pipeline.core.losses.SmoothedBCELoss", "smoothing": "@label_smoothing",
                       "focal_gamma": "@focal_gamma"}}
    loss = ConfigParser(config).get_parsed_content("loss")
    assert isinstance(loss, SmoothedBCELoss) and (loss.smoothing, loss.focal_gamma) == (0.1, 0.0)


def test_dice_plus_bce_adds_the_weighted_pixelwise_bce():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.7).float()
    dice = DiceLoss(sigmoid=True)(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(SegmentationLoss(bce_weight=0.0)(logits, target), dice)
    assert torch.allclose(SegmentationLoss(bce_weight=0.5)(logits, target), dice + 0.5 * bce)
    aux = torch.randn(2, 1)
    has_fg = target.flatten(1).amax(1, keepdim=True)
    expected = dice + 0.5 * bce + 0.1 * F.binary_cross_entropy_with_logits(aux, has_fg)
    assert torch.allclose(SegmentationLoss(aux_weight=0.1, bce_weight=0.5)((logits, aux), target), expected)


def test_dice_per_image_weighs_a_small_foreground_as_much_as_a_large_one():
    """``dice_batch=False``: the mean of each image's Dice, so a miss of a small object costs as much as a miss of a
    large one; over the whole batch (the crop recipes' default) the small miss is nearly free."""
    target = torch.zeros(2, 1, 16, 16)
    target[0, :, :8] = 1  # a large object, found
    target[1, :, 7:9, 7:9] = 1  # a small one, missed
    logits = torch.full_like(target, -20.0)
    logits[0][target[0].bool()] = 20.0
    whole = SegmentationLoss(aux_weight=0.0, batch=True)(logits, target).item()
    per_image = SegmentationLoss(aux_weight=0.0, batch=True, dice_batch=False)(logits, target).item()
    assert whole == pytest.approx(1 - 2 * 128 / (128 + 132), abs=1e-4)
    assert per_image == pytest.approx((0.0 + 1.0) / 2, abs=1e-4)
    assert SegmentationLoss(batch=True, dice_batch=False).lovasz.per_image is False  # the Lovasz keeps ``batch``
