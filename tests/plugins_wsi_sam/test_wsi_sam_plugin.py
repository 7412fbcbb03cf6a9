"""WSI-SAM plugin: sizes, equality with the two reference decoders written out, gradients, options."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from samflow.batch import SamBatch
from samflow.module import SamflowModule, SamSpec
from samflow.plugins.stack import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow_plugins.hq_sam.head import HQHead
from samflow_plugins.sam_adapter import SamAdapter
from samflow_plugins.wsi_sam import WSISam
from samflow_plugins.wsi_sam.loss import squared_dice

ATOL = 1e-5

# (variant, trainable parameters of both heads): the counts, 2 x HQ-SAM's head.
COUNTS = [("vit_b", 2_142_208), ("vit_l", 2_666_496), ("vit_h", 3_190_784)]


def dual_batch(batch_size: int = 2, prompt: str = "box") -> SamBatch:
    """HR views with boxes and their LR context views (other random images, their own masks)."""
    hr = random_batch(batch_size, prompt=prompt, seed=0)
    lr = random_batch(batch_size, prompt=prompt, seed=1)
    return hr.replace(context_image=lr.image, context_mask=lr.mask)


def randomize_heads(plugin: WSISam, seed: int = 3) -> None:
    """Move the heads off their initialisation so the comparisons bite (LayerNorms start at 1/0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in plugin.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def reference_view(sam, head: HQHead, early_block: int, image, box) -> tuple[torch.Tensor, torch.Tensor]:
    """One view of WSI-SAM with segment-anything's modules, after the reference's ``MaskDecoderHigh``:
    -> (kernel k (32,), fused features U (32, h, w), SAM's token-0 mask (h, w))."""
    enc, dec, prompt_encoder = sam.image_encoder, sam.mask_decoder, sam.prompt_encoder
    x = sam.preprocess(image[None] * 255)
    early = enc.patch_embed(x) + enc.pos_embed
    for block in enc.blocks[: early_block + 1]:
        early = block(early)
    embedding = enc(x)
    sparse, dense = prompt_encoder(points=None, boxes=box[None], masks=None)
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight, head.hf_token.weight])[None]
    hs, src = dec.transformer(
        embedding + dense, prompt_encoder.get_dense_pe(), torch.cat([tokens, sparse], 1)
    )
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(embedding.shape))
    sam_mask = torch.einsum("c,chw->hw", dec.output_hypernetworks_mlps[0](hs[0, 1]), upscaled[0])
    fused = (
        head.embedding_maskfeature(upscaled)
        + head.embedding_encoder(embedding)
        + head.compress_vit_feat(early.permute(0, 3, 1, 2))
    )
    return head.hf_mlp(hs[0, 5]), fused[0], sam_mask


def model(sam, **kwargs) -> tuple[HookedSam, WSISam]:
    plugin = WSISam(**kwargs)
    hooked = HookedSam(sam, PluginStack({"wsi": plugin}))
    randomize_heads(plugin)
    return hooked, plugin


@pytest.mark.parametrize(("variant", "count"), COUNTS)
def test_trainable_count_is_two_hq_heads(variant, count):
    with torch.device("meta"):
        sam = build_sam(variant, seed=None)
    plugin = WSISam()
    stack = PluginStack({"wsi": plugin})
    stack.attach(sam)
    assert stack.trainable_counts() == {"wsi": count}
    assert sum(p.numel() for p in plugin.high.parameters()) == count // 2
    assert {n.split(".")[0] for n, _ in plugin.named_parameters()} == {"high", "low"}
    assert not any(p.requires_grad for p in sam.parameters())


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_equals_two_reference_decoders_with_aggregated_kernel(tiny_sam, aggregation):
    hooked, plugin = model(tiny_sam, aggregation=aggregation)
    hooked.eval()
    batch = dual_batch(2)
    with torch.no_grad():
        out = hooked(batch)
        mapped = batch.with_context()
        for row in range(2):
            k_hr, u_hr, sam_hr = reference_view(
                tiny_sam, plugin.high, plugin.early_block, batch.image[row], batch.box[row]
            )
            lr_box = mapped.box[2 + row]
            k_lr, u_lr, sam_lr = reference_view(
                tiny_sam, plugin.low, plugin.early_block, batch.context_image[row], lr_box
            )
            k = k_hr + k_lr if aggregation == "sum" else (k_hr + k_lr) / 2
            y_hr = torch.einsum("c,chw->hw", k, u_hr)
            y_lr = torch.einsum("c,chw->hw", k, u_lr)
            torch.testing.assert_close(out.masks["wsi/wsi"][row, 0], y_hr, atol=ATOL, rtol=0)
            torch.testing.assert_close(out.context.masks["wsi/wsi"][row, 0], y_lr, atol=ATOL, rtol=0)
            # error correction: SAM's token-0 mask of the same view (its decoder saw the view's token too)
            torch.testing.assert_close(out.pred[row, 0], y_hr + sam_hr, atol=ATOL, rtol=0)
            torch.testing.assert_close(
                out.context.masks["wsi/wsi_sam"][row, 0], y_lr + sam_lr, atol=ATOL, rtol=0
            )
    assert out.pred.shape == (2, 1, 32, 32)
    assert out.context.image_index.tolist() == [0, 1]


def test_mean_is_half_the_sum(tiny_sam):
    batch = dual_batch(2)
    outs = []
    for aggregation in ("sum", "mean"):
        torch.manual_seed(0)
        hooked, _ = model(tiny_sam, aggregation=aggregation)
        with torch.no_grad():
            outs.append(hooked.eval()(batch))
    torch.testing.assert_close(outs[1].masks["wsi/wsi"], outs[0].masks["wsi/wsi"] / 2, atol=1e-6, rtol=0)


def test_error_correction_at_inference_only_by_default(tiny_sam):
    batch = dual_batch(2)
    for training in (False, True):
        for corrected, in_training in ((True, False), (False, False), (True, True)):
            torch.manual_seed(0)
            hooked, _ = model(tiny_sam, error_correction=corrected, correct_in_training=in_training)
            hooked.train(training)
            with torch.no_grad():
                out = hooked(batch)
            wsi, sam = out.masks["wsi/wsi"], out.masks["sam"][:, :1]
            expected = wsi + sam if (in_training if training else corrected) else wsi
            torch.testing.assert_close(out.pred, expected, atol=0, rtol=0)
            assert (out.masks["wsi/wsi_sam"] - wsi).abs().max() > 1e-3  # SAM's logits do change it


def test_gradients_only_in_both_heads_and_losses_on_both_views(tiny_sam):
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"wsi": WSISam()}, losses={})
    module.train()
    batch = dual_batch(2)
    out, ctx = module(batch)
    terms = module.compute_losses(out, batch, ctx)
    assert set(terms) == {"wsi/dice_hr", "wsi/bce_hr", "wsi/dice_lr", "wsi/bce_lr", "total"}
    terms["total"].backward()
    for name, p in module.named_parameters():
        if name.startswith(("model.plugins.wsi.high.", "model.plugins.wsi.low.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_lr_loss_alone_reaches_both_heads_through_the_shared_kernel(tiny_sam):
    hooked, plugin = model(tiny_sam, hr_weight=0.0)
    hooked.train()
    batch = dual_batch(2)
    out, ctx = hooked.run(batch)
    terms = plugin.losses(out, batch, ctx)
    sum(terms.values()).backward()
    assert plugin.high.hf_mlp.layers[0].weight.grad.abs().sum() > 0  # k = k_HR + k_LR
    assert (
        plugin.high.compress_vit_feat[0].weight.grad is None
        or not plugin.high.compress_vit_feat[0].weight.grad.any()
    )
    assert plugin.low.compress_vit_feat[0].weight.grad.abs().sum() > 0


def test_squared_dice_hand_worked():
    logits = torch.tensor([[[[0.0, 100.0], [-100.0, 0.0]]]])  # p = 0.5, 1, 0, 0.5
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # 1 - (2 (0.5 + 1) + s) / (0.25 + 1 + 0 + 0.25 + 2 + s)
    expected = 1 - (3 + 1e-5) / (3.5 + 1e-5)
    torch.testing.assert_close(squared_dice(logits, target), torch.tensor(expected), atol=1e-6, rtol=0)


def test_squared_dice_equals_monais():
    from monai import losses as monai

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=gen) * 3
    target = (torch.rand(3, 1, 16, 16, generator=gen) > 0.5).float()
    ref = monai.DiceLoss(sigmoid=True, squared_pred=True)(logits, target)
    torch.testing.assert_close(squared_dice(logits, target), ref, atol=1e-6, rtol=0)


def test_without_context_the_hr_head_alone(tiny_sam):
    hooked, plugin = model(tiny_sam)
    batch = random_batch(2)
    with torch.no_grad():
        out = hooked.eval()(batch)
        for row in range(2):
            k, u, sam = reference_view(
                tiny_sam, plugin.high, plugin.early_block, batch.image[row], batch.box[row]
            )
            torch.testing.assert_close(
                out.pred[row, 0], torch.einsum("c,chw->hw", k, u) + sam, atol=ATOL, rtol=0
            )
    assert out.context is None


def test_composes_with_sam_adapter_on_the_encoder(tiny_sam):
    module = SamflowModule(
        sam=SamSpec(variant="tiny"), plugins={"adapter": SamAdapter(), "wsi": WSISam()}, losses={}
    ).train()
    batch = dual_batch(2)
    out, ctx = module(batch)
    assert ctx.encoded.embeddings.shape[0] == 4  # HR and LR through the encoder as one batch of 2B
    terms = module.compute_losses(out, batch, ctx)
    terms["total"].backward()
    owned = module.plugins.owned
    for key in ("adapter", "wsi"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in owned[key].values()), key
    # the LR rows see the adapted LR images: the context output changes with the LR image alone
    module.eval()
    with torch.no_grad():
        first = module(batch)[0]
        other = module(batch.replace(context_image=batch.context_image.flip(-1)))[0]
    assert (first.pred - other.pred).abs().max() > 1e-4  # HR prediction reads the LR kernel
    torch.testing.assert_close(first.masks["sam"], other.masks["sam"], atol=1e-6, rtol=0)
