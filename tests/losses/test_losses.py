"""Losses on cases worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from samflow.losses import LOSSES, BalancedBCELoss, BCELoss, DiceLoss, FocalLoss, SoftIoULoss


def _mask(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None, None]  # (1, 1, H, W)


def test_bce_of_zero_logits_is_ln2() -> None:
    target = _mask([[1, 0], [0, 1]])
    assert BCELoss()(torch.zeros_like(target), target).item() == pytest.approx(math.log(2))


def test_soft_iou_by_hand() -> None:
    # p = 0.5 everywhere, g all ones on 4 pixels: inter 2, union 2 + 4 - 2 = 4, IoU 1/2.
    target = torch.ones(1, 1, 2, 2)
    assert SoftIoULoss()(torch.zeros_like(target), target).item() == pytest.approx(0.5)
    # eps = 1: (2 + 1) / (4 + 1).
    assert SoftIoULoss(eps=1.0)(torch.zeros_like(target), target).item() == pytest.approx(1 - 3 / 5)


def test_soft_iou_is_mean_over_images() -> None:
    target = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)])
    logits = torch.stack([torch.full((1, 2, 2), 50.0), torch.zeros(1, 2, 2)])
    # Image 0 perfect (loss 0); image 1: inter 0, union 2 -> loss 1.
    assert SoftIoULoss()(logits, target).item() == pytest.approx(0.5)


def test_soft_iou_perfect_prediction_is_near_zero() -> None:
    target = _mask([[1, 1, 0], [0, 1, 0]])
    logits = (target * 2 - 1) * 20
    assert SoftIoULoss()(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_by_hand() -> None:
    # p = 0.5 on 4 pixels, g all ones, smooth 1: (2·2 + 1) / (2 + 4 + 1) = 5/7.
    target = torch.ones(1, 1, 2, 2)
    assert DiceLoss()(torch.zeros_like(target), target).item() == pytest.approx(2 / 7)
    # smooth 0: 4 / 6.
    assert DiceLoss(smooth=0.0)(torch.zeros_like(target), target).item() == pytest.approx(1 / 3)


def test_focal_by_hand() -> None:
    # One pixel, x = 0, g = 1: p_t = 1/2, loss = α (1 - p_t)^γ ln 2.
    target = torch.ones(1, 1, 1, 1)
    loss = FocalLoss(alpha=0.25, gamma=2.0)(torch.zeros_like(target), target)
    assert loss.item() == pytest.approx(0.25 * 0.25 * math.log(2))


def test_focal_without_focusing_or_alpha_is_bce() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 5, 5, generator=generator)
    target = (torch.rand(2, 1, 5, 5, generator=generator) > 0.5).float()
    focal = FocalLoss(alpha=-1, gamma=0.0)(logits, target)
    torch.testing.assert_close(focal, BCELoss()(logits, target))


def test_balanced_bce_by_hand_on_2x2() -> None:
    logits = _mask([[2.0, -1.0], [0.0, 1.0]])
    target = _mask([[1, 0], [0, 0]])
    # N_pos = 1, N_neg = 3: pos_weight 3, final factor N_pos/(N_pos+N_neg) = 1/4, mean over 4 pixels.
    pos = -math.log(1 / (1 + math.exp(-2.0)))  # -log σ(2)
    negs = [-math.log(1 - 1 / (1 + math.exp(-x))) for x in (-1.0, 0.0, 1.0)]  # -log(1 - σ(x))
    expected = 0.25 * (3 * pos + sum(negs)) / 4
    assert BalancedBCELoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # ... which is SAM-Adapter's formulation with BCEWithLogitsLoss(pos_weight).
    reference = 0.25 * nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))(logits, target)
    torch.testing.assert_close(BalancedBCELoss()(logits, target), reference)


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_balanced_bce_single_class_batch_is_zero_not_nan(fill: float) -> None:
    logits = torch.randn(2, 1, 3, 3, requires_grad=True)
    loss = BalancedBCELoss()(logits, torch.full((2, 1, 3, 3), fill))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all()


def test_per_image_balanced_bce_is_the_mean_of_each_image_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 6, 6, generator=generator)
    target = torch.zeros(3, 1, 6, 6)
    target[0, 0, :1, :2] = 1  # 2 of 36 pixels
    target[1, 0, :3, :] = 1  # 18 of 36
    target[2, 0, :, :5] = 1  # 30 of 36
    loss = BalancedBCELoss(per_image=True)
    alone = [loss(logits[i : i + 1], target[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(loss(logits, target), torch.stack(alone).mean())
    # One image alone: the same as the batch-level loss on it.
    torch.testing.assert_close(alone[0], BalancedBCELoss()(logits[:1], target[:1]))
    # Over the batch the weights are those of all 50 positives of 108 pixels: another number.
    assert abs(BalancedBCELoss()(logits, target).item() - loss(logits, target).item()) > 1e-3


def test_per_image_balanced_bce_of_an_image_without_foreground_is_zero() -> None:
    logits = torch.randn(2, 1, 3, 3, requires_grad=True)
    target = torch.zeros(2, 1, 3, 3)
    target[0, 0, 1, 1] = 1
    loss = BalancedBCELoss(per_image=True)(logits, target)
    loss.backward()
    torch.testing.assert_close(loss, BalancedBCELoss()(logits[:1], target[:1]) / 2)
    assert torch.isfinite(logits.grad).all() and (logits.grad[1] == 0).all()


@pytest.mark.parametrize("loss_cls", [SoftIoULoss, DiceLoss])
def test_overlap_losses_guard_empty_union(loss_cls: type[nn.Module]) -> None:
    # σ(-200) underflows to exactly 0 in float32, so with an empty target the union is 0.
    logits = torch.full((1, 1, 3, 3), -200.0, requires_grad=True)
    kwargs = {"eps": 0.0} if loss_cls is SoftIoULoss else {"smooth": 0.0}
    loss = loss_cls(**kwargs)(logits, torch.zeros(1, 1, 3, 3))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_small_when_perfect_and_larger_when_wrong(name: str) -> None:
    target = _mask([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]).repeat(2, 1, 1, 1)
    perfect = ((target * 2 - 1) * 30).requires_grad_()
    loss_fn = LOSSES[name]()
    loss = loss_fn(perfect, target)
    loss.backward()
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    assert torch.isfinite(perfect.grad).all()
    assert loss_fn(-perfect.detach(), target).item() > 0.1


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_rejects_mismatched_shapes(name: str) -> None:
    with pytest.raises(ValueError, match="same shape"):
        LOSSES[name]()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_half_precision_logits_do_not_overflow(name: str) -> None:
    # 300 x 300 = 90,000 pixels: a float16 sum of the probabilities would overflow (max 65,504).
    target = torch.zeros(1, 1, 300, 300)
    target[..., :150, :] = 1
    logits = torch.full((1, 1, 300, 300), 3.0, dtype=torch.float16)
    loss = LOSSES[name]()(logits, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, LOSSES[name]()(logits.float(), target))
