"""BASam at the attn_logits site: exact SAM at the training size, the scale and bias it hands back,
what trains (fine-tuning) and what does not (zero-shot), the reference code's form, the encoder cache."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from helpers import random_batch, randomize
from segment_anything.modeling.image_encoder import window_partition

from samflow.module import SamflowModule, SamSpec
from samflow.plugins import PluginStack, create_plugin
from samflow.sam import EncoderCacheError, HookedSam, build_sam, decomposed_rel_pos_bias, resize_sam
from samflow.sam.encoder_block import attention_heads
from samflow_plugins.ba_sam import BASam, native_img_size

R2 = math.sqrt(2.0)
TINY_SCALE = 32**-0.5  # the tiny SAM: 64 channels, 2 heads, d = 32


def hooked(sam, **plugins) -> HookedSam:
    return HookedSam(sam, PluginStack(plugins))


def block_attention(model: HookedSam, i: int, size: int, seed: int = 0) -> torch.Tensor:
    """Block ``i``'s attention output (SDPA + proj, in windows for a windowed block) on a random input."""
    block = model.sam.image_encoder.blocks[i]
    grid = size // 16
    gen = torch.Generator().manual_seed(seed)
    x = block.norm1(torch.randn(2, grid, grid, 64, generator=gen))
    if block.window_size > 0:
        x, _ = window_partition(x, block.window_size)
    ctx = model.context(random_batch(2, size=size))
    with torch.no_grad():
        return block.attn.proj(attention_heads(i, block.attn, x, model.plugins, ctx))


def hook(plugin: BASam, model: HookedSam, i: int, size: int, bias: torch.Tensor | None, keys: int):
    q = torch.randn(3, 2, keys, 32)
    ctx = model.context(random_batch(1, size=size))
    return plugin.attn_logits(i, TINY_SCALE, bias, q, ctx)


# ---- exactly SAM at the training size ----
@pytest.mark.parametrize("block", [0, 1, 2, 3])  # windowed 0, 2; global 1, 3
def test_attention_is_bitwise_sams_at_the_training_size(tiny_sam, block):
    plain = HookedSam(tiny_sam)
    scaled = hooked(tiny_sam, ba=BASam(bias="none"))
    assert torch.equal(block_attention(scaled, block, 128), block_attention(plain, block, 128))
    # the penalty with zero slopes adds nothing either, bit for bit
    zero = hooked(tiny_sam, ba=BASam(slopes="zero"))
    assert torch.equal(block_attention(zero, block, 128), block_attention(plain, block, 128))


def test_whole_model_is_bitwise_sam_at_the_training_size(tiny_sam):
    batch = random_batch(3, prompt="box")
    with torch.no_grad():
        expected = HookedSam(tiny_sam)(batch)
        for plugin in (BASam(bias="none"), BASam(slopes="zero"), BASam(slopes="zero", learnable=False)):
            out = hooked(tiny_sam, ba=plugin)(batch)
            assert torch.equal(out.pred, expected.pred) and torch.equal(out.iou_pred, expected.iou_pred)


def test_scale_is_sams_python_float_at_the_training_size(tiny_sam):
    plugin = BASam(bias="none")
    model = hooked(tiny_sam, ba=plugin)
    scale, bias = hook(plugin, model, 1, 128, None, keys=64)
    assert type(scale) is float and scale == TINY_SCALE
    assert bias is None


# ---- the scale factor at other lengths ----
@pytest.mark.parametrize(("size", "factor"), [(64, 2 / 3), (256, 4 / 3), (512, 10 / 6)])
def test_global_blocks_get_ln_n_over_ln_n_train(tiny_sam, size, factor):
    # tiny: N_train = (128 / 16)^2 = 64 keys; at 256 px N = 256 -> ln 256 / ln 64 = 8/6
    sam = resize_sam(tiny_sam, size)
    plugin = BASam(bias="none")
    model = hooked(sam, ba=plugin)
    keys = (size // 16) ** 2
    scale, _ = hook(plugin, model, 1, size, None, keys=keys)
    assert scale == pytest.approx(TINY_SCALE * factor, rel=1e-15)
    # windowed blocks attend over their fixed 4 x 4 window: SAM's scale, unchanged
    scale, _ = hook(plugin, model, 0, size, None, keys=16)
    assert scale == TINY_SCALE
    # unless asked: then N and N_train count the whole image
    wide = BASam(bias="none", scale_windows=True)
    model = hooked(sam, ba=wide)
    scale, _ = hook(wide, model, 0, size, None, keys=16)
    assert scale == pytest.approx(TINY_SCALE * factor, rel=1e-15)


def test_scale_false_keeps_sams_scale_and_train_size_sets_n_train(tiny_sam):
    sam = resize_sam(tiny_sam, 256)
    plugin = BASam(slopes="zero", scale=False)
    assert hook(plugin, hooked(sam, ba=plugin), 1, 256, None, keys=256)[0] == TINY_SCALE
    plugin = BASam(bias="none", train_size=256)  # N_train = 256 keys: no change at 256 px
    assert hook(plugin, hooked(sam, ba=plugin), 1, 256, None, keys=256)[0] == TINY_SCALE
    plugin = BASam(bias="none", train_size=64)  # N_train = 16: ln 256 / ln 16 = 2
    assert hook(plugin, hooked(sam, ba=plugin), 1, 256, None, keys=256)[0] == pytest.approx(2 * TINY_SCALE)


def test_a_tensor_scale_from_another_plugin_is_multiplied(tiny_sam):
    plugin = BASam(bias="none")
    model = hooked(resize_sam(tiny_sam, 256), ba=plugin)
    ctx = model.context(random_batch(1, size=256))
    scale, _ = plugin.attn_logits(1, torch.tensor(0.5), None, torch.randn(1, 2, 256, 32), ctx)
    assert isinstance(scale, torch.Tensor) and scale.item() == pytest.approx(0.5 * 4 / 3)


# ---- the bias ----
def test_bias_on_a_2x2_grid_for_given_slopes(tiny_sam):
    # tiny at 32 px: a 2 x 2 token grid in the global blocks
    sam = resize_sam(tiny_sam, 32)
    plugin = BASam(slopes=[0.5, 0.25], learnable=False)
    model = hooked(sam, ba=plugin)
    d = torch.tensor([[0, 1, 1, R2], [1, 0, R2, 1], [1, R2, 0, 1], [R2, 1, 1, 0]])
    expected = torch.stack([-0.5 * d, -0.25 * d])[None]  # (1, heads, 4, 4)
    scale, bias = hook(plugin, model, 1, 32, None, keys=4)
    assert scale == pytest.approx(TINY_SCALE * math.log(4) / math.log(64))
    assert bias is not None and bias.shape == (1, 2, 4, 4)
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-7)
    # added to SAM's rel-pos bias (B', heads, L, L)
    sam_bias = torch.randn(3, 2, 4, 4)
    _, bias = hook(plugin, model, 1, 32, sam_bias, keys=4)
    torch.testing.assert_close(bias, sam_bias + expected, rtol=0, atol=1e-6)
    manhattan = BASam(slopes=[0.5, 0.25], distance="manhattan")
    model = hooked(sam, ba=manhattan)
    _, bias = hook(manhattan, model, 3, 32, None, keys=4)
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([0.0, -0.5, -0.5, -1.0]), rtol=0, atol=0)


def test_penalty_is_the_bias_added(tiny_sam):
    plugin = BASam(slopes=[0.5, 0.25])
    model = hooked(resize_sam(tiny_sam, 32), ba=plugin)
    ctx = model.context(random_batch(1, size=32))
    penalty = plugin.penalty(1, 4, ctx)
    assert penalty.shape == (2, 4, 4) and penalty.requires_grad
    sam_bias = torch.randn(3, 2, 4, 4)
    _, bias = plugin.attn_logits(1, TINY_SCALE, sam_bias, torch.randn(3, 2, 4, 32), ctx)
    torch.testing.assert_close(bias, sam_bias + penalty, rtol=0, atol=1e-6)
    assert list(ctx.state["ba"]["distance"]) == [((2, 2), torch.device("cpu"), torch.float32)]  # one cache


def test_windowed_blocks_measure_distance_in_their_window(tiny_sam):
    plugin = BASam(slopes=[1.0, 0.5])
    model = hooked(tiny_sam, ba=plugin)
    _, bias = hook(plugin, model, 0, 128, None, keys=16)  # a 4 x 4 window
    assert bias is not None and bias.shape == (1, 2, 16, 16)
    assert bias[0, 0, 0, 15].item() == pytest.approx(-math.sqrt(18))  # (0, 0) to (3, 3)
    assert bias[0, 1, 0, 3].item() == pytest.approx(-1.5)  # (0, 0) to (0, 3), slope 0.5


def test_alibi_slopes_by_default_per_block_and_head(tiny_sam):
    plugin = BASam()
    hooked(tiny_sam, ba=plugin)
    assert isinstance(plugin.slopes, torch.nn.Parameter)
    assert plugin.slopes.shape == (4, 2)  # 4 blocks x 2 heads
    assert plugin.slopes.tolist() == [[1 / 16, 1 / 256]] * 4
    only = BASam(blocks=[1, 3])
    model = hooked(tiny_sam, ba=only)
    assert only.slopes.shape == (2, 2)
    _, bias = hook(only, model, 0, 128, None, keys=16)
    assert bias is None  # block 0 gets no penalty
    _, bias = hook(only, model, 1, 128, None, keys=64)
    assert bias is not None and bias.shape == (1, 2, 64, 64)


def test_parameter_counts_on_real_variants():
    with torch.device("meta"):
        sams = {v: build_sam(v, seed=None) for v in ("vit_b", "vit_l", "vit_h")}
    counts = {}
    for variant, sam in sams.items():
        plugin = BASam()
        PluginStack({"ba": plugin}).attach(sam)
        counts[variant] = sum(p.numel() for p in plugin.parameters())
        assert native_img_size(sam) == 1024 and plugin.train_grid == 64
    assert counts == {"vit_b": 12 * 12, "vit_l": 24 * 16, "vit_h": 32 * 16}
    assert native_img_size(build_sam("tiny")) == 128


# ---- what trains ----
def module(plugin: BASam, size: int | None = None, **spec) -> SamflowModule:
    return SamflowModule(
        sam=SamSpec(variant="tiny", img_size=size, **spec), plugins={"ba": plugin}, losses={"bce": 1.0}
    )


@pytest.mark.parametrize("bias", ["distance", "reference_code"])
def test_fine_tuning_gradients_reach_only_the_learnable_parameters(bias):
    m = module(BASam(bias=bias)).train()
    randomize(m.model.sam)  # non-zero rel-pos tables, so the reference code's term is not zero
    batch = random_batch(2)
    out, ctx = m(batch)
    m.compute_losses(out, batch, ctx)["total"].backward()
    name = "slopes" if bias == "distance" else "coefficients"
    values = getattr(m.plugins["ba"], name)
    assert values.grad is not None and (values.grad != 0).all(), values.grad
    assert m.trainable_parameters() == {"ba": values.numel()}
    for pname, param in m.model.sam.named_parameters():
        assert not param.requires_grad and param.grad is None, pname


def test_zero_slopes_start_as_sam_and_still_learn():
    m = module(BASam(slopes="zero")).train()
    batch = random_batch(2)
    out, ctx = m(batch)
    m.compute_losses(out, batch, ctx)["total"].backward()
    assert (m.plugins["ba"].slopes.grad != 0).any()


def test_train_decoder_trains_the_mask_decoder_and_nothing_of_the_encoder():
    m = module(BASam(train_decoder=True)).train()
    batch = random_batch(2)
    out, ctx = m(batch)
    m.compute_losses(out, batch, ctx)["total"].backward()
    decoder = sum(p.numel() for p in m.model.sam.mask_decoder.parameters())
    assert m.trainable_parameters() == {"ba": 8 + decoder}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.model.sam.mask_decoder.parameters())
    for pname, param in m.model.sam.named_parameters():
        if not pname.startswith("mask_decoder."):
            assert param.grad is None, pname


@pytest.mark.parametrize("bias", ["distance", "reference_code", "none"])
def test_zero_shot_trains_nothing(bias):
    plugin = BASam(bias=bias, learnable=False)
    m = module(plugin, size=256)
    assert not any(p.requires_grad for p in m.parameters())
    assert m.trainable_parameters() == {"ba": 0}
    assert list(plugin.parameters()) == []
    if bias == "distance":
        assert "plugins.ba.slopes" in {k.removeprefix("model.") for k in m.state_dict()}
    out, _ = m(random_batch(2, size=256))
    assert out.pred.shape == (2, 1, 64, 64) and torch.isfinite(out.pred).all()
    assert not out.pred.requires_grad


def test_fine_tuned_slopes_load_into_a_zero_shot_model_at_another_size():
    trained = module(BASam())
    with torch.no_grad():
        trained.plugins["ba"].slopes.mul_(3.0)
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)  # the slim checkpoint: the plugin, no frozen SAM
    assert set(checkpoint["state_dict"]) == {"model.plugins.ba.slopes"}
    frozen = module(BASam(learnable=False), size=256)
    frozen.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(frozen.plugins["ba"].slopes, trained.plugins["ba"].slopes)
    with torch.no_grad():
        assert torch.isfinite(frozen(random_batch(1, size=256))[0].pred).all()


# ---- the reference code's form ----
def test_reference_code_scales_sams_rel_pos_bias_and_drops_the_position_embedding(tiny_sam):
    plugin = BASam(bias="reference_code")
    model = hooked(tiny_sam, ba=plugin)
    assert plugin.coefficients.tolist() == pytest.approx([0.1] * 4) and plugin.drop_pos_embed
    attn = tiny_sam.image_encoder.blocks[1].attn
    q = torch.randn(2, 2, 64, 32)
    sam_bias = decomposed_rel_pos_bias(q, attn.rel_pos_h, attn.rel_pos_w, (8, 8))
    ctx = model.context(random_batch(1))
    scale, bias = plugin.attn_logits(1, TINY_SCALE, sam_bias, q, ctx)
    assert scale == TINY_SCALE
    torch.testing.assert_close(bias, 0.1 * sam_bias, rtol=0, atol=0)
    # the first block sees the patch tokens without SAM's absolute position embedding
    tokens = torch.randn(1, 8, 8, 64)
    x = tokens + tiny_sam.image_encoder.pos_embed
    torch.testing.assert_close(plugin.block_input(0, x, ctx), tokens, rtol=0, atol=1e-6)
    assert plugin.block_input(1, x, ctx) is x


def test_reference_code_with_unit_coefficient_and_position_embedding_is_sam(tiny_sam):
    plugin = BASam(bias="reference_code", coefficient=1.0, drop_pos_embed=False)
    batch = random_batch(2)
    with torch.no_grad():
        assert torch.equal(hooked(tiny_sam, ba=plugin)(batch).pred, HookedSam(tiny_sam)(batch).pred)
        dropped = hooked(tiny_sam, ba=BASam(bias="reference_code", coefficient=1.0))(batch).pred
        assert not torch.equal(dropped, HookedSam(tiny_sam)(batch).pred)


# ---- the encoder cache ----
@pytest.mark.parametrize("learnable", [True, False])
def test_the_encoder_cache_is_refused(learnable):
    with pytest.raises(EncoderCacheError, match=r"ba \(attn_logits\)"):
        module(BASam(learnable=learnable), encoder_cache=4)
    with pytest.raises(EncoderCacheError, match=r"ba \(attn_logits\)"):
        module(BASam(bias="none", learnable=False), encoder_cache=4, encoder_cache_stages=("eval",))


# ---- plumbing ----
def test_registered_pickles_and_round_trips(tiny_sam):
    plugin = create_plugin("ba_sam")
    assert isinstance(plugin, BASam)
    model = hooked(tiny_sam, ba=plugin)
    clone = pickle.loads(pickle.dumps(model))
    batch = random_batch(2)
    with torch.no_grad():
        assert torch.equal(clone(batch).pred, model(batch).pred)


def test_float64_runs_end_to_end():
    sam = randomize(build_sam("tiny")).double()
    model = hooked(sam, ba=BASam()).double()
    with torch.no_grad():
        out = model(random_batch(1, dtype=torch.float64))
    assert out.pred.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bias": "alibi"}, "bias must be one of"),
        ({"distance": "cosine"}, "distance must be one of"),
        ({"slopes": "geometric"}, "slopes must be"),
        ({"slopes": []}, "slopes` is empty"),
        ({"blocks": []}, "blocks` is empty"),
        ({"train_size": 0}, "train_size must be"),
        ({"bias": "none", "scale": False}, "would do nothing"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BASam(**kwargs)


def test_bad_arguments_found_at_setup(tiny_sam):
    with pytest.raises(ValueError, match=r"blocks \[7\] do not exist"):
        hooked(tiny_sam, ba=BASam(blocks=[1, 7]))
    with pytest.raises(ValueError, match="3 slopes given.*2 heads"):
        hooked(build_sam("tiny"), ba=BASam(slopes=[1.0, 0.5, 0.25]))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        hooked(build_sam("tiny"), ba=BASam(train_size=100))
