"""The decoder's launch-saving paths: frozen weights cast once under autocast (``samflow.sam.casts``),
the hypernetworks as one batched product per layer, the token mask made once per decode. Each gives
the values of the plain path; only the number of operators changes."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import new_storage_at_the_same_address, random_batch
from segment_anything.modeling.mask_decoder import MLP
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from samflow.plugins import DecoderContext, DecoderState, PluginStack, SamPlugin
from samflow.sam import HookedSam, attend
from samflow.sam.casts import CastOnceConvTranspose2d, CastOnceLinear, cache_frozen_casts, kept_copies
from samflow.sam.ops import key_bias, mask_hypernetworks

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


class Casts(TorchDispatchMode):
    """Records where the tensor every ``_to_copy`` (a cast; a kernel launch on a GPU) reads lies."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._to_copy:
            self.sources.append(args[0].data_ptr())
        return func(*args, **(kwargs or {}))

    def count(self, tensors) -> int:
        """How many of the casts read one of ``tensors``."""
        where = {t.data_ptr() for t in tensors}
        return sum(s in where for s in self.sources)


def _plain(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose cast-once layers are plain ``nn.Linear`` / ``nn.ConvTranspose2d`` again."""
    module = copy.deepcopy(module)
    for sub in module.modules():
        if type(sub) is CastOnceLinear:
            sub.__class__ = nn.Linear
        elif type(sub) is CastOnceConvTranspose2d:
            sub.__class__ = nn.ConvTranspose2d
    return module


def _frozen_layers(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    layers = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Unflatten(1, (8, 2, 2)), nn.ConvTranspose2d(8, 4, 2, 2)
    )
    layers.requires_grad_(False)
    return layers, cache_frozen_casts(copy.deepcopy(layers))


def test_build_sam_gives_the_mask_decoder_the_cast_once_layers(tiny_sam):
    decoder_layers = [
        m for m in tiny_sam.mask_decoder.modules() if isinstance(m, nn.Linear | nn.ConvTranspose2d)
    ]
    assert decoder_layers and all(
        type(m) in (CastOnceLinear, CastOnceConvTranspose2d) for m in decoder_layers
    )
    assert not any(
        type(m) is CastOnceLinear for m in tiny_sam.image_encoder.modules()
    )  # the encoder keeps SAM's
    assert set(tiny_sam.state_dict()) == set(
        _plain(tiny_sam).state_dict()
    )  # same keys: checkpoints load either way


def test_under_autocast_the_layers_equal_autocasts_own_casts_bit_for_bit_and_cast_once():
    plain, cached = _frozen_layers()
    x = torch.randn(3, 16)
    with torch.autocast(**BF16):
        expected = plain(x)
        with Casts() as first:
            out = cached(x)
        with Casts() as second:
            again = cached(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(out, expected) and torch.equal(again, expected)
    params = list(cached.parameters())
    assert first.count(params) == 4  # the first call casts all 4
    assert second.count(params) == 0  # the second casts none


def test_outside_autocast_the_layers_are_the_plain_ones_and_keep_nothing():
    plain, cached = _frozen_layers()
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.equal(cached.double()(x), plain.double()(x))
    assert not any(kept_copies(m) for m in cached.modules())


def test_a_changed_weight_is_cast_again():
    """load_state_dict (copy_ under no_grad), a replaced parameter and a module moved to another dtype
    are each seen: the output is the one of the plain layers with the new weights."""
    plain, cached = _frozen_layers()
    x = torch.randn(3, 16)

    def check() -> None:
        with torch.autocast(**BF16):
            assert torch.equal(cached(x), plain(x))

    check()
    other, _ = _frozen_layers(seed=1)
    plain.load_state_dict(other.state_dict())
    cached.load_state_dict(other.state_dict())
    check()
    new_weight = torch.randn(32, 16)
    plain[0].weight = nn.Parameter(new_weight.clone(), requires_grad=False)
    cached[0].weight = nn.Parameter(new_weight.clone(), requires_grad=False)
    check()
    with torch.no_grad():  # in place, as an optimizer would
        plain[3].bias.mul_(3)
        cached[3].bias.mul_(3)
    check()
    plain.half().float()
    cached.half().float()  # new storage, rounded values
    check()


def test_new_storage_at_the_old_address_is_cast_again():
    """The same parameter object on new storage at the freed storage's address with its version
    counter unmoved (``module.half().float()`` when the allocator hands the block back): the address
    and the counter alone would serve the old copies."""
    plain, cached = _frozen_layers()
    x = torch.randn(3, 16)
    with torch.autocast(**BF16):
        cached(x)  # copies kept
        for layers in (plain, cached):
            new_storage_at_the_same_address(
                layers[0].weight, torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
            )
            new_storage_at_the_same_address(layers[3].bias, torch.full((4,), 0.5))
        assert torch.equal(cached(x), plain(x))


def test_trainable_weights_are_not_cached_and_get_autocasts_gradients():
    plain, cached = _frozen_layers()
    plain.requires_grad_(True)
    cached.requires_grad_(True)
    x = torch.randn(3, 16)
    for _ in range(2):
        for model in (plain, cached):
            model.zero_grad()
            with torch.autocast(**BF16):
                out = model(x)
            out.float().square().sum().backward()
    for p, q in zip(plain.parameters(), cached.parameters(), strict=True):
        assert q.grad is not None and torch.equal(p.grad, q.grad)
    assert not any(kept_copies(m) for m in cached.modules())


def test_copies_made_under_inference_mode_serve_a_later_training_step():
    """Lightning validates under inference mode; a training step afterwards saves the frozen weight's
    copy for the backward of a trainable input, which an inference tensor could not be."""
    _, cached = _frozen_layers()
    x = torch.randn(3, 16)
    with torch.inference_mode(), torch.autocast(**BF16):
        cached(x)
    trainable = torch.randn(3, 16, requires_grad=True)
    with torch.autocast(**BF16):
        cached(trainable).float().sum().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0


def test_the_decode_under_autocast_casts_no_sam_parameter_after_the_first(tiny_sam):
    hooked = HookedSam(tiny_sam).eval()
    plain = HookedSam(_plain(tiny_sam)).eval()
    batch = random_batch(2, prompt="box")
    frozen = list(tiny_sam.parameters()) + list(tiny_sam.buffers())
    with torch.no_grad(), torch.autocast(**BF16):
        ctx = hooked.context(batch)
        dctx = DecoderContext.after_encoder(ctx, hooked.encode(ctx))
        with Casts() as first:
            hooked.decode(dctx)
        with Casts() as second:
            out = hooked.decode(dctx)
        expected = plain.decode(dctx)
    assert first.count(frozen) > 20
    assert second.count(frozen) == 0
    # the plain decoder (autocast's own casts, SAM's hypernetworks one by one) to bf16 rounding
    torch.testing.assert_close(out.masks["sam"].float(), expected.masks["sam"].float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(out.iou_pred.float(), expected.iou_pred.float(), atol=0.02, rtol=0.02)


# ---- the hypernetworks ----
def _hypernetworks(num: int = 4, dim: int = 24, dtype: torch.dtype = torch.float64) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(num)).to(dtype)


def _one_by_one(mlps: nn.ModuleList, tokens: Tensor) -> Tensor:
    return torch.stack([mlp(tokens[:, j]) for j, mlp in enumerate(mlps)], 1)


@pytest.mark.parametrize("frozen", [True, False])
def test_hypernetworks_batched_equal_sams_one_by_one_values_and_gradients(frozen):
    mlps = _hypernetworks()
    mlps.requires_grad_(not frozen)
    tokens = torch.randn(5, 4, 24, dtype=torch.float64, requires_grad=True)
    batched = mask_hypernetworks(mlps, tokens)
    reference = _one_by_one(mlps, tokens)
    assert batched.shape == (5, 4, 3)
    torch.testing.assert_close(batched, reference, atol=1e-12, rtol=0)
    weights = torch.randn_like(batched)
    params = [tokens] + ([] if frozen else list(mlps.parameters()))
    got = torch.autograd.grad((batched * weights).sum(), params)
    want = torch.autograd.grad((reference * weights).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
    assert bool(kept_copies(mlps)) is frozen  # trainable weights are stacked per call


def test_hypernetworks_see_a_changed_frozen_weight():
    mlps = _hypernetworks()
    mlps.requires_grad_(False)
    tokens = torch.randn(2, 4, 24, dtype=torch.float64)
    mask_hypernetworks(mlps, tokens)
    with torch.no_grad():
        mlps[2].layers[1].weight.mul_(-2)
    torch.testing.assert_close(
        mask_hypernetworks(mlps, tokens), _one_by_one(mlps, tokens), atol=1e-12, rtol=0
    )


def test_hypernetworks_with_a_hook_or_another_mlp_run_one_by_one():
    mlps = _hypernetworks()
    tokens = torch.randn(2, 4, 24, dtype=torch.float64)
    seen = []
    handle = mlps[1].layers[0].register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        torch.testing.assert_close(mask_hypernetworks(mlps, tokens), _one_by_one(mlps, tokens))
    finally:
        handle.remove()
    assert len(seen) == 2  # the hook saw both calls: both ran one by one
    mlps[3].sigmoid_output = True
    out = mask_hypernetworks(mlps, tokens)
    assert torch.equal(out, _one_by_one(mlps, tokens)) and (out[:, 3] > 0).all()


# ---- the token mask ----
def test_attend_with_the_shared_additive_mask_equals_the_bool_mask_bit_for_bit(tiny_sam):
    attn = tiny_sam.mask_decoder.transformer.layers[0].self_attn
    q = torch.randn(3, 7, attn.embedding_dim)
    visible = torch.rand(3, 7) > 0.4
    visible[:, 0] = True
    assert torch.equal(attend(attn, q, q, q, key_bias(visible, q.dtype)), attend(attn, q, q, q, visible))


class HideLastToken(SamPlugin):
    """After layer ``layer``'s token-to-image attention: hides the last token and overwrites it with noise."""

    def __init__(self, layer: int, seed: int) -> None:
        super().__init__()
        self.layer, self.seed = layer, seed

    def decoder_layer(self, i: int, state: DecoderState, ctx: DecoderContext) -> DecoderState:
        if i != self.layer:
            return state
        noise = torch.randn(state.queries[:, -1].shape, generator=torch.Generator().manual_seed(self.seed))
        queries = torch.cat([state.queries[:, :-1], noise[:, None]], 1)
        visible = torch.cat([state.visible[:, :-1], torch.zeros_like(state.visible[:, -1:])], 1)
        return dataclasses.replace(state, queries=queries, visible=visible)


@pytest.mark.parametrize("layer", [0, 1])
def test_tokens_a_plugin_hides_are_hidden_from_its_layers_image_to_token_attention_on(tiny_sam, layer):
    """Once hidden, a token's value reaches nothing else: not the image tokens (the same layer's
    image-to-token attention already uses the new mask), not the masks nor the IoU."""
    outputs = []
    for seed in (0, 1):
        model = HookedSam(tiny_sam, PluginStack({"hide": HideLastToken(layer, seed)})).eval()
        with torch.no_grad():
            out, dctx = model.run(random_batch(2, prompt="box"))
        outputs.append(out)
    assert torch.equal(outputs[0].masks["sam"], outputs[1].masks["sam"])
    assert torch.equal(outputs[0].iou_pred, outputs[1].iou_pred)


def test_the_decode_compiles_whole_under_autocast_and_keeps_its_values(tiny_sam):
    """Under torch.compile nothing is kept on the modules (the graph owns its casts), so the decoder
    side traces as one graph, with the values of the eager decode."""
    import torch._dynamo

    hooked = HookedSam(tiny_sam).eval()
    with torch.no_grad(), torch.autocast(**BF16):
        ctx = hooked.context(random_batch(2, prompt="box"))
        dctx = DecoderContext.after_encoder(ctx, hooked.encode(ctx))
        eager = hooked.decode(dctx)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(hooked.decode)(dctx)
        compiled = torch.compile(hooked.decode, backend="eager")(dctx)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert torch.equal(compiled.masks["sam"], eager.masks["sam"]) and torch.equal(
        compiled.iou_pred, eager.iou_pred
    )
