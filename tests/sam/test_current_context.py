"""``current_context()``: the forward's context inside each encoder block HookedSam runs, None outside,
and the same context again when activation checkpointing recomputes the block."""

from __future__ import annotations

import torch
from helpers import random_batch

from samflow.plugins import current_context
from samflow.sam import HookedSam


def test_inside_every_block_and_its_recomputation_only(tiny_sam):
    model = HookedSam(tiny_sam)
    seen = []
    hooks = [
        block.norm1.register_forward_hook(lambda *_: seen.append(current_context()))
        for block in tiny_sam.image_encoder.blocks
    ]
    try:
        batch = random_batch(2)
        ctx = model.context(batch)
        model.encode(ctx)
        assert len(seen) == len(tiny_sam.image_encoder.blocks) and all(c is ctx for c in seen)
        assert current_context() is None

        seen.clear()
        model.checkpoint_blocks = True
        model.train()
        image = batch.image.clone().requires_grad_(True)  # a gradient through the blocks: recomputed
        ctx = model.context(batch.replace(image=image))
        out = model.encode(ctx).embeddings
        forward = len(seen)
        out.sum().backward()
        assert len(seen) == 2 * forward and all(c is ctx for c in seen)  # recomputation sees ctx again
        assert current_context() is None
    finally:
        for hook in hooks:
            hook.remove()
        model.eval()
    assert image.grad is not None and torch.isfinite(image.grad).all()
