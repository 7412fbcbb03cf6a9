"""SAM's positional encodings under bf16 autocast (what ``--trainer.precision bf16-mixed`` runs).

The Fourier features ``sin/cos(2 pi (2 c - 1) @ G)`` reach tens of radians; in bf16 (8 significant
bits) an angle of 32 rad is known to 0.125 rad, and a bf16 pixel coordinate of a 1024 px frame is a
multiple of 4 px past 512. samflow computes them in float32 and rounds once, at the end, so under
autocast they are segment-anything's float32 encodings rounded to bf16: 1 px still moves a point.
"""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import PromptEncoder

from samflow.plugins import PluginStack
from samflow.sam import HookedSam, build_sam, dense_pe, embed_box, embed_points
from samflow.testing import random_batch

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}
FRAME = (1024, 1024)
ULP = 2.0**-8  # bf16's relative spacing: one rounding may differ from another by this much


@pytest.fixture
def encoder() -> PromptEncoder:
    """segment-anything's prompt encoder of SAM's 1024 px frame (random Gaussian matrix, scale 1)."""
    torch.manual_seed(0)
    return PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=FRAME, mask_in_chans=16
    ).requires_grad_(False)


def _sams_points(pe: PromptEncoder, corner: torch.Tensor) -> torch.Tensor:
    """segment-anything's float32 embedding of positive points at SAM pixel coordinates (N, K, 2)."""
    return pe._embed_points(corner, torch.ones(corner.shape[:2], dtype=torch.long), pad=False)


@pytest.mark.parametrize("x", [700.0, 1000.0])
def test_a_point_under_autocast_is_sams_float32_embedding_rounded_once(encoder, x):
    """At x = 700 px a bf16 embedding of bf16 angles was 0.15 (norm) away from float32; rounded once it
    is within one bf16 step of it, and moving the point 1 px moves the embedding as in float32."""
    points = torch.tensor([[[x, 300.25]], [[x + 1, 300.25]]])  # SAM's coordinates
    labels = torch.ones(2, 1, dtype=torch.long)
    reference = _sams_points(encoder, points)  # float32, outside autocast
    with torch.autocast(**BF16):
        ours = embed_points(encoder, points + 0.5, labels, FRAME, torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), reference.bfloat16().float(), rtol=ULP, atol=1e-6)
    moved, moved_fp32 = ours[1].float() - ours[0].float(), reference[1] - reference[0]
    # 1 px moves the embedding by ~0.14 (norm); bf16's rounding of two embeddings of norm ~20 adds < 0.06
    assert (moved - moved_fp32).norm() < 0.5 * moved_fp32.norm()


def test_a_box_under_autocast_is_sams_float32_embedding_rounded_once(encoder):
    boxes = torch.tensor([[600.25, 700.75, 900.5, 1001.0], [601.25, 700.75, 901.5, 1001.0]])
    reference, _ = encoder(points=None, boxes=boxes, masks=None)  # (2, 2, C) float32
    with torch.autocast(**BF16):
        ours = embed_box(encoder, boxes + 0.5, FRAME, torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), reference.bfloat16().float(), rtol=ULP, atol=1e-6)


def test_the_dense_encoding_under_autocast_is_sams_float32_grid_rounded_once(encoder):
    reference = encoder.get_dense_pe()  # float32, outside autocast
    with torch.autocast(**BF16):
        ours = dense_pe(encoder.pe_layer, (64, 64), torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), reference.bfloat16().float(), rtol=ULP, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outside_autocast_the_encodings_keep_the_callers_dtype(encoder, dtype):
    points = torch.tensor([[[700.0, 300.25]]], dtype=dtype)
    labels = torch.ones(1, 1, dtype=torch.long)
    assert embed_points(encoder, points + 0.5, labels, FRAME).dtype == dtype
    assert embed_box(encoder, torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=dtype), FRAME).dtype == dtype
    assert dense_pe(encoder.pe_layer, (8, 8), dtype).dtype == dtype


@pytest.mark.parametrize("prompt", ["points", "box"])
def test_hooked_prompts_under_autocast_keep_sub_pixel_coordinates(prompt):
    """HookedSam's sparse prompt embedding under autocast is its float32 embedding rounded once: 1 px
    apart at x = 700 of a 1024 px frame (one bf16 value, 700) the two rows stay apart."""
    hooked = HookedSam(build_sam("tiny", seed=0, img_size=1024), PluginStack({}))
    batch = random_batch(2, 1024, prompt=prompt)
    if prompt == "points":
        batch.points = torch.tensor([[[700.0, 300.25]], [[701.0, 300.25]]])
    else:
        batch.box = torch.tensor([[600.25, 700.75, 900.5, 1001.0], [601.25, 700.75, 901.5, 1001.0]])
    reference = hooked.encode_prompts(batch, torch.float32).sparse
    with torch.autocast(**BF16):
        ours = hooked.encode_prompts(batch, torch.bfloat16).sparse
    torch.testing.assert_close(ours.float(), reference.bfloat16().float(), rtol=ULP, atol=1e-6)
