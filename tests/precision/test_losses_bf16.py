"""Losses of bf16 logits under autocast (``--trainer.precision bf16-mixed``): computed in float32.

Each loss of a bf16 model's logits under autocast must equal the float32 loss of the same (bf16-valued)
logits outside autocast, to float32 precision: a BCE or Dice summed over 512 x 512 pixels in bf16
(8 significant bits) would be off by ~1e-2, not 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from samflow.losses import LOSSES
from samflow_plugins.hq_sam.loss import point_bce_dice
from samflow_plugins.pa_sam.loss import pa_sam_losses
from samflow_plugins.wsi_sam.loss import dice_bce

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def _logits_and_target(size: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 logits (a bf16 model's output) and a {0, 1} target, (2, 1, size, size)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(2, 1, size, size, generator=gen)).bfloat16()
    target = (torch.rand(2, 1, size, size, generator=gen) < 0.3).float()
    return logits, target


def _same_in_float32(loss_fn, logits: torch.Tensor, *args) -> None:
    """``loss_fn(logits, *args)`` under autocast is the float32 value of the bf16-valued logits."""
    with torch.autocast(**BF16):
        ours = loss_fn(logits, *args)
    reference = loss_fn(logits.float(), *args)
    ours = ours if isinstance(ours, (tuple, dict)) else (ours,)
    reference = reference if isinstance(reference, (tuple, dict)) else (reference,)
    pairs = zip(ours.values(), reference.values()) if isinstance(ours, dict) else zip(ours, reference)
    for got, want in pairs:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_built_in_losses_of_bf16_logits_are_float32_losses(name):
    logits, target = _logits_and_target()
    _same_in_float32(LOSSES[name](), logits, target)


def test_hq_sams_point_sampled_loss_of_bf16_logits_is_its_float32_loss():
    logits, target = _logits_and_target(256)
    coords = torch.rand(2, 112 * 112, 2, generator=torch.Generator().manual_seed(1))
    _same_in_float32(point_bce_dice, logits, target, coords)


def test_wsi_sams_loss_of_bf16_logits_is_its_float32_loss():
    logits, target = _logits_and_target(128)
    full_target = torch.nn.functional.interpolate(target, size=(512, 512), mode="nearest")
    _same_in_float32(dice_bce, logits, full_target, 512)


def test_pa_sams_losses_of_bf16_logits_are_their_float32_losses():
    coarse, target = _logits_and_target(256)
    refined, _ = _logits_and_target(256, seed=1)
    uncertainty, _ = _logits_and_target(256, seed=2)
    full_target = torch.nn.functional.interpolate(target, size=(512, 512), mode="nearest")
    _same_in_float32(lambda c: pa_sam_losses(c, refined, uncertainty, full_target), coarse)
