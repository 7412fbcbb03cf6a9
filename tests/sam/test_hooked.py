"""HookedSam equals segment-anything on the same weights, batched, and its attention equals SAM's."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch, randomize, sam_reference

from samflow.sam import HookedSam, build_sam
from samflow.batch import SamBatch
from samflow.sam import attend
from samflow.sam.encoder_block import attention_heads

# float32 on CPU; SDPA and SAM's explicit softmax differ only by rounding.
ATOL = 1e-5


@pytest.mark.parametrize("prompt", ["box", "points", "none", "points+box", "mask"])
def test_tiny_matches_segment_anything(tiny_sam, prompt):
    batch = random_batch(3, prompt="box" if "box" in prompt else "points" if prompt == "points" else "none")
    if prompt == "points+box":
        points = random_batch(3, prompt="points")
        batch = batch.replace(points=points.points, point_labels=points.point_labels)
    if prompt == "mask":
        batch.mask_prompt = torch.randn(3, 1, 32, 32)
    ref_masks, ref_iou = sam_reference(tiny_sam, batch)
    with torch.no_grad():
        out = HookedSam(tiny_sam)(batch)
    assert out.masks["sam"].shape == (3, 4, 32, 32)
    torch.testing.assert_close(out.masks["sam"], ref_masks, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.iou_pred, ref_iou, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pred, ref_masks[:, :1], atol=ATOL, rtol=0)


def test_vit_b_shaped_weights_match_at_small_size():
    sam = randomize(build_sam("vit_b", img_size=256, seed=1))
    batch = random_batch(2, size=256, prompt="box")
    ref_masks, ref_iou = sam_reference(sam, batch)
    with torch.no_grad():
        out = HookedSam(sam)(batch)
    # 12 blocks of 768 channels accumulate more rounding than the tiny model.
    torch.testing.assert_close(out.masks["sam"], ref_masks, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out.iou_pred, ref_iou, atol=2e-5, rtol=1e-4)


def test_padding_is_zero_after_normalisation_as_in_sam(tiny_sam):
    """A 128x96 image padded to 128x128 gives SAM's result on SAM's own padded input."""
    image = torch.rand(1, 3, 128, 96)
    padded = torch.nn.functional.pad(image, (0, 32))
    batch = SamBatch(image=padded, input_size=torch.tensor([[128, 96]]))
    with torch.no_grad():
        ours = HookedSam(tiny_sam).encode(HookedSam(tiny_sam).context(batch)).embeddings
        theirs = tiny_sam.image_encoder(tiny_sam.preprocess(image * 255))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_several_prompt_rows_per_image_share_the_embedding(tiny_sam):
    """image_index maps 4 prompt rows onto 2 images; each row equals its own single-image run."""
    batch = random_batch(2, prompt="box")
    rows = SamBatch(
        image=batch.image,
        box=torch.cat([batch.box, batch.box.flip(0)]),
        image_index=torch.tensor([0, 1, 0, 1]),
    )
    hooked = HookedSam(tiny_sam)
    with torch.no_grad():
        out = hooked(rows)
        for row, image in enumerate(rows.image_index.tolist()):
            single = hooked(SamBatch(image=batch.image[image : image + 1], box=rows.box[row : row + 1]))
            torch.testing.assert_close(out.masks["sam"][row], single.masks["sam"][0], atol=ATOL, rtol=0)


def test_prompt_slots_are_visible_exactly_where_sam_has_tokens(tiny_sam):
    """Rows: 2 points, 1 point + box, nothing. SAM's tokens are a row's visible slots, in SAM's order."""
    batch = SamBatch(
        image=torch.zeros(3, 3, 128, 128),
        points=torch.tensor(
            [[[10.0, 20.0], [30.0, 40.0]], [[50.0, 60.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]
        ),
        point_labels=torch.tensor([[1, 0], [1, -1], [-1, -1]]),
        box=torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 6.0, 70.0, 80.0], [0.0, 0.0, 0.0, 0.0]]),
        has_box=torch.tensor([False, True, False]),
    )
    prompts = HookedSam(tiny_sam).encode_prompts(batch, torch.float32)
    # slots: 2 points, SAM's not-a-point pad, 2 box corners
    expected_visible = [[1, 1, 1, 0, 0], [1, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert prompts.visible.tolist() == [[bool(v) for v in row] for row in expected_visible]
    pe = tiny_sam.prompt_encoder
    with torch.no_grad():
        ref0, _ = pe(
            points=(batch.points[:1], batch.point_labels[:1]), boxes=None, masks=None
        )  # 2 points + pad
        ref1, _ = pe(
            points=(batch.points[1:2, :1], batch.point_labels[1:2, :1]), boxes=batch.box[1:2], masks=None
        )
        ref2, _ = pe(points=None, boxes=None, masks=None)
    torch.testing.assert_close(prompts.sparse[0][prompts.visible[0]], ref0[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(prompts.sparse[1][prompts.visible[1]], ref1[0], atol=ATOL, rtol=0)
    assert ref2.shape[1] == 0


def test_float64_runs_end_to_end_and_matches_float32(tiny_sam):
    """No float32 cast inside the forward: a float64 model and batch give float64 outputs."""
    batch = random_batch(2, prompt="points")
    with torch.no_grad():
        single = HookedSam(tiny_sam)(batch)
        double = HookedSam(tiny_sam.double())(batch.to(torch.float64))
    assert double.masks["sam"].dtype == torch.float64 and double.iou_pred.dtype == torch.float64
    torch.testing.assert_close(double.masks["sam"].float(), single.masks["sam"], atol=ATOL, rtol=0)


def test_encoder_attention_equals_sam_forward_and_backward(tiny_sam):
    """SDPA with the rel-pos bias as a mask equals SAM's Attention, values and input gradients."""
    hooked = HookedSam(tiny_sam)
    for i, block in enumerate(tiny_sam.image_encoder.blocks):
        size = block.window_size or 8
        x = torch.randn(2, size, size, block.attn.qkv.in_features, requires_grad=True)
        ctx = hooked.context(SamBatch(image=torch.zeros(2, 3, 8, 8)))
        ours = block.attn.proj(attention_heads(i, block.attn, x, hooked.plugins, ctx))
        (grad_ours,) = torch.autograd.grad(ours.square().sum(), x)
        theirs = block.attn(x)
        (grad_theirs,) = torch.autograd.grad(theirs.square().sum(), x)
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-4, rtol=1e-4)


def test_masked_keys_change_nothing(tiny_sam):
    """attend with a key mask equals attention over the visible keys alone, whatever the hidden keys hold."""
    attn = tiny_sam.mask_decoder.transformer.layers[0].self_attn
    q, k = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    visible = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    ours = attend(attn, q, k, k, visible)
    garbage = k.clone()
    garbage[1, 4:] = 1e3
    torch.testing.assert_close(attend(attn, q, garbage, garbage, visible), ours, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[1:], attn(q=q[1:], k=k[1:, :4], v=k[1:, :4]), atol=ATOL, rtol=0)


def test_decoder_attention_equals_sam_forward_and_backward(tiny_sam):
    attn = tiny_sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    q = torch.randn(2, 7, 64, requires_grad=True)
    k = torch.randn(2, 64, 64, requires_grad=True)
    ours = attend(attn, q, k, k)
    theirs = attn(q=q, k=k, v=k)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    g_ours = torch.autograd.grad(ours.sum(), (q, k))
    g_theirs = torch.autograd.grad(theirs.sum(), (q, k))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sam_stays_frozen_and_in_eval_mode(tiny_sam):
    hooked = HookedSam(tiny_sam).train()
    assert hooked.training and not tiny_sam.training
    assert not any(m.training for m in tiny_sam.modules())
    assert not any(p.requires_grad for p in tiny_sam.parameters())


@pytest.mark.parametrize(
    ("field", "value", "wanted"),
    [
        (
            "image",
            torch.rand(2, 3, 256, 256),
            "image has shape (2, 3, 256, 256); this SAM takes (2, 3, 128, 128)",
        ),
        (
            "image",
            torch.rand(2, 3, 128, 96),
            "image has shape (2, 3, 128, 96); this SAM takes (2, 3, 128, 128)",
        ),
        (
            "image",
            torch.rand(2, 1, 128, 128),
            "image has shape (2, 1, 128, 128); this SAM takes (2, 3, 128, 128)",
        ),
        (
            "mask_prompt",
            torch.rand(2, 1, 64, 64),
            "mask_prompt has shape (2, 1, 64, 64); this SAM takes (2, 1, 32, 32)",
        ),
        ("box", torch.rand(2, 1, 4), "box has shape (2, 1, 4); this SAM takes (2, 4)"),
        ("box", torch.rand(3, 4), "box has shape (3, 4); this SAM takes (2, 4)"),
        ("points", torch.rand(2, 1, 3), "points has shape (2, 1, 3); this SAM takes (2, K, 2)"),
    ],
)
def test_a_batch_that_does_not_fit_sams_frame_is_refused_naming_the_field(tiny_sam, field, value, wanted):
    """A wrong image side, or a prompt of another shape or row count, fails before the forward with
    the field and the shape it should have, not deep inside SAM (or, for some, not at all)."""
    fields = {"image": torch.rand(2, 3, 128, 128), field: value}
    if field == "points":
        fields["point_labels"] = torch.ones(2, 1, dtype=torch.long)
    with pytest.raises(ValueError) as err, torch.no_grad():
        HookedSam(tiny_sam)(SamBatch(**fields))
    assert f"SamBatch.{wanted}" in str(err.value) and "model.sam.img_size" in str(err.value)
