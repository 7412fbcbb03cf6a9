"""HQ-SAM plugin: sizes, gradients, equality with the reference decoder written out, batching, composition."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from samflow.batch import SamBatch
from samflow.module import SamflowModule, SamSpec
from samflow.plugins.stack import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow_plugins.decoder_tuning import DecoderTuning
from samflow_plugins.hq_sam import HQSam
from samflow_plugins.hq_sam.fusion import first_global_block
from samflow_plugins.sam_adapter import SamAdapter
from samflow_plugins.tokens import ExtraTokens

ATOL = 1e-5  # float32 on CPU: SDPA vs SAM's explicit softmax differ by rounding only

# (variant, first global-attention block, trainable parameters) -- the counts are the issue's.
VARIANTS = [("vit_b", 2, 1_071_104), ("vit_l", 5, 1_333_248), ("vit_h", 7, 1_595_392)]


def hooked(sam, multimask_output: bool = False, **plugins) -> HookedSam:
    return HookedSam(sam, PluginStack(plugins or {"hq": HQSam()}), multimask_output=multimask_output)


def reference_hq(
    sam, plugin: HQSam, image, box, extra_tokens, hq_position: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """HQ-SAM's decoder for ONE image and ONE box with segment-anything's modules -> sam (4, h, w), hq (h, w).

    Written out after the reference's ``MaskDecoderHQ.predict_masks``: the encoder runs block by block
    (SAM's ``Block.forward``) to take the first global block's output; the decoder is SAM's
    ``TwoWayTransformer.forward`` on [iou, mask_0..3, extra tokens..., prompts].
    """
    enc, dec, prompt_encoder = sam.image_encoder, sam.mask_decoder, sam.prompt_encoder
    x = sam.preprocess(image[None] * 255)
    early = enc.patch_embed(x) + enc.pos_embed
    for block in enc.blocks[: plugin.early_block + 1]:
        early = block(early)
    embedding = enc(x)  # (1, C, h, w)
    sparse, dense = prompt_encoder(points=None, boxes=box[None], masks=None)
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight, *extra_tokens])
    tokens = torch.cat([output_tokens[None], sparse], dim=1)
    hs, src = dec.transformer(embedding + dense, prompt_encoder.get_dense_pe(), tokens)
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(embedding.shape))  # (1, C/8, 4h, 4w)
    heads = dec.output_hypernetworks_mlps
    sam_masks = torch.stack(
        [torch.einsum("c,chw->hw", mlp(hs[0, 1 + j]), upscaled[0]) for j, mlp in enumerate(heads)]
    )
    hq_features = plugin.embedding_encoder(embedding) + plugin.compress_vit_feat(early.permute(0, 3, 1, 2))
    upscaled_hq = plugin.embedding_maskfeature(upscaled) + hq_features
    hq = torch.einsum("c,chw->hw", plugin.hf_mlp(hs[0, hq_position]), upscaled_hq[0])
    return sam_masks, hq


# ---- structure ----
@pytest.mark.parametrize(("variant", "block", "count"), VARIANTS)
def test_parameter_count_and_early_block_on_real_variants(variant, block, count):
    with torch.device("meta"):
        sam = build_sam(variant, seed=None)
    plugin = HQSam()
    stack = PluginStack({"hq": plugin})
    stack.attach(sam)
    assert first_global_block(sam.image_encoder) == block == plugin.early_block
    assert sum(p.numel() for p in plugin.parameters() if p.requires_grad) == count
    assert sum(p.numel() for p in plugin.parameters()) == count
    assert stack.trainable_counts() == {"hq": count}  # the stack's record: the plugin's own parameters only
    assert set(stack.owned["hq"]) == {f"plugins.hq.{name}" for name, _ in plugin.named_parameters()}
    assert not any(p.requires_grad for p in sam.parameters())
    # only compress_vit_feat depends on the encoder width: 1 token + head + two fusions are shared
    shared = 256 + 139_808 + 73_952 + 37_088
    assert sum(p.numel() for p in plugin.compress_vit_feat.parameters()) == count - shared


def test_early_block_of_tiny_sam_and_names_follow_the_reference(tiny_sam):
    plugin = HQSam()
    hooked(tiny_sam, hq=plugin)
    assert plugin.early_block == 1  # tiny: global attention in blocks 1 and 3
    assert {k.split(".")[0] for k in plugin.state_dict()} == {
        "hf_token",
        "hf_mlp",
        "compress_vit_feat",
        "embedding_encoder",
        "embedding_maskfeature",
    }
    # Sequential indices as in the reference: ConvT, LayerNorm2d, GELU, ConvT
    assert {k for k in plugin.state_dict() if k.startswith("compress_vit_feat")} == {
        f"compress_vit_feat.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")
    }


def test_encoder_without_global_attention_is_refused():
    class Block:
        window_size = 14

    class Encoder:
        blocks = (Block(), Block())

    with pytest.raises(ValueError, match="no global-attention block"):
        first_global_block(Encoder())


def test_bad_output_is_refused():
    with pytest.raises(ValueError, match="output must be one of"):
        HQSam(output="sam")


# ---- forward ----
@pytest.mark.parametrize("prompt", ["box", "none"])
def test_outputs_and_sams_own_masks_keep_their_shape(tiny_sam, prompt):
    with torch.no_grad():
        out = hooked(tiny_sam)(random_batch(3, prompt=prompt))
    assert out.masks["sam"].shape == (3, 4, 32, 32)
    assert out.masks["hq/hq"].shape == out.masks["hq/sam_hq"].shape == (3, 1, 32, 32)
    assert out.iou_pred.shape == (3, 4)
    assert out.pred is out.masks["hq/hq"]


def test_hq_mask_equals_the_reference_decoder_per_image(tiny_sam):
    """Rows on 2 images with image_index [0, 1, 0] equal the reference decoder run per image and box."""
    batch = random_batch(3, prompt="box")
    rows = SamBatch(image=batch.image[:2], box=batch.box, image_index=torch.tensor([0, 1, 0]))
    model = hooked(tiny_sam)
    plugin = model.plugins["hq"]
    with torch.no_grad():
        out = model(rows)
        for row, i in enumerate(rows.image_index.tolist()):
            image, box, extra = rows.image[i], rows.box[row], [plugin.hf_token.weight]
            sam_ref, hq_ref = reference_hq(tiny_sam, plugin, image, box, extra, hq_position=5)
            torch.testing.assert_close(out.masks["hq/hq"][row, 0], hq_ref, atol=ATOL, rtol=0)
            # SAM's masks change with the HQ token in the transformer (it attends to it), as in the reference
            torch.testing.assert_close(out.masks["sam"][row], sam_ref, atol=ATOL, rtol=0)
            torch.testing.assert_close(out.masks["hq/sam_hq"][row, 0], sam_ref[0] + hq_ref, atol=ATOL, rtol=0)


def test_several_prompt_rows_per_image_equal_single_runs(tiny_sam):
    batch = random_batch(3, prompt="box")
    rows = SamBatch(image=batch.image[:2], box=batch.box, image_index=torch.tensor([0, 1, 0]))
    model = hooked(tiny_sam)
    with torch.no_grad():
        out = model(rows)
        assert out.masks["hq/hq"].shape == (3, 1, 32, 32)
        for row, image in enumerate(rows.image_index.tolist()):
            single = model(SamBatch(image=rows.image[image : image + 1], box=rows.box[row : row + 1]))
            for name in ("hq/hq", "hq/sam_hq", "sam"):
                torch.testing.assert_close(out.masks[name][row], single.masks[name][0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("multimask_output", [False, True])
def test_sam_hq_adds_the_sam_mask_the_reference_selects(tiny_sam, multimask_output):
    model = hooked(tiny_sam, multimask_output=multimask_output, hq=HQSam(output="sam_hq"))
    with torch.no_grad():
        out = model(random_batch(4, prompt="box"))
    assert out.pred is out.masks["hq/sam_hq"]
    for row in range(4):
        if multimask_output:  # best of tokens 1..3 by predicted IoU
            scores = out.iou_pred[row, 1:].tolist()
            token = 1 + scores.index(max(scores))
        else:
            token = 0
        expected = out.masks["sam"][row, token] + out.masks["hq/hq"][row, 0]
        assert torch.equal(out.masks["hq/sam_hq"][row, 0], expected)
    token_0 = out.masks["sam"][:, :1] + out.masks["hq/hq"]
    assert torch.equal(out.masks["hq/sam_hq"], token_0) != multimask_output  # the rule really changes the sum


# ---- training ----
@pytest.mark.parametrize("output", ["hq", "sam_hq"])
def test_gradients_only_in_the_new_modules(output):
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"hq": HQSam(output=output)}).train()
    batch = random_batch(2)
    out, ctx = module(batch)
    terms = module.compute_losses(out, batch, ctx)
    assert {"hq/point_bce", "hq/point_dice"} <= set(terms)
    terms["total"].backward()
    for name, param in module.model.sam.named_parameters():
        assert not param.requires_grad and param.grad is None, name
    plugin = module.plugins["hq"]
    for name, param in plugin.named_parameters():
        assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
    assert module.trainable_parameters() == {"hq": sum(p.numel() for p in plugin.parameters())}


def test_without_point_loss_only_the_base_losses_remain():
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"hq": HQSam(point_loss=False)})
    batch = random_batch(2)
    out, ctx = module(batch)
    assert set(module.compute_losses(out, batch, ctx)) == {"bce", "dice", "total"}


def test_plugin_loss_is_the_weighted_point_loss_of_the_hq_mask(tiny_sam):
    from samflow_plugins.hq_sam.loss import point_bce_dice, sample_points

    plugin = HQSam(num_points=500, bce_weight=2.0, dice_weight=0.5)
    model = hooked(tiny_sam, hq=plugin)
    batch = random_batch(2)
    batch = batch.replace(image_index=torch.tensor([1, 0, 1]), box=torch.cat([batch.box, batch.box[:1]]))
    batch = batch.replace(id=[])  # without sample seeds or ids, ``ctx.rand`` draws from the global generator
    out, ctx = model.run(batch, model.context(batch))
    torch.manual_seed(7)
    terms = plugin.losses(out, batch, ctx)
    torch.manual_seed(7)
    coords = sample_points(out.masks["hq/hq"], 500)
    bce, dice = point_bce_dice(out.masks["hq/hq"], batch.mask[[1, 0, 1]], coords)
    assert torch.equal(terms["point_bce"], 2.0 * bce) and torch.equal(terms["point_dice"], 0.5 * dice)


# ---- composition ----
@pytest.mark.parametrize("order", [("hq", "tok"), ("tok", "hq")])
def test_composes_with_extra_tokens(tiny_sam, order):
    plugins = {"hq": HQSam(), "tok": ExtraTokens(init_from_sam=False, predict=False)}
    model = hooked(tiny_sam, **{k: plugins[k] for k in order})
    hq, tok = plugins["hq"], plugins["tok"]
    extra = [hq.hf_token.weight if k == "hq" else tok.tokens.weight for k in order]
    batch = random_batch(2)
    with torch.no_grad():
        out = model(batch)
        for row in range(2):
            image, box = batch.image[row], batch.box[row]
            _, hq_ref = reference_hq(tiny_sam, hq, image, box, extra, hq_position=5 + order.index("hq"))
            torch.testing.assert_close(out.masks["hq/hq"][row, 0], hq_ref, atol=ATOL, rtol=0)
    assert out.pred is out.masks["hq/hq"]  # the one plugin that selects, in either order


def test_composes_with_decoder_tuning():
    plugins = {"dec": DecoderTuning(), "hq": HQSam()}
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins=plugins).train()
    batch = random_batch(2)
    out, ctx = module(batch)
    module.compute_losses(out, batch, ctx)["total"].backward()
    sam = module.model.sam
    assert sam.mask_decoder.transformer.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in sam.image_encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.plugins["hq"].parameters())
    counts = module.trainable_parameters()
    assert counts["hq"] == sum(p.numel() for p in module.plugins["hq"].parameters())
    assert counts["dec"] == sum(p.numel() for p in sam.mask_decoder.parameters())


def test_composes_with_sam_adapter():
    plugins = {"adapter": SamAdapter(), "hq": HQSam()}
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins=plugins).train()
    batch = random_batch(2)
    out, ctx = module(batch)
    loss = module.compute_losses(out, batch, ctx)["total"]
    loss.backward()
    assert torch.isfinite(loss)
    assert out.pred is out.masks["hq/hq"]
    for key in plugins:
        trainable = [p for p in module.plugins[key].parameters() if p.requires_grad]
        assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), key
    assert all(p.grad is None for p in module.model.sam.image_encoder.parameters())


def test_a_few_steps_of_the_recipe_lower_the_loss(tiny_sam):
    """Adam 1e-3 on the point-sampled loss alone lowers BCE + Dice of the HQ mask at fixed points."""
    from samflow_plugins.hq_sam.loss import point_bce_dice

    plugin = HQSam(num_points=1024)
    model = hooked(tiny_sam, hq=plugin).train()
    batch = random_batch(4)
    fixed = torch.rand(4, 4096, 2, generator=torch.Generator().manual_seed(0))

    def fixed_loss() -> float:
        with torch.no_grad():
            return sum(point_bce_dice(model(batch).masks["hq/hq"], batch.mask, fixed)).item()

    before = fixed_loss()
    optimizer = torch.optim.Adam(plugin.parameters(), lr=1e-3)
    for _ in range(15):
        out, ctx = model.run(batch)
        loss = sum(plugin.losses(out, batch, ctx).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_loss() < 0.85 * before  # 1.60 -> 1.17 with seed 0
