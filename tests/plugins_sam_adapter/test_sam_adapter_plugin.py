"""SamAdapter: parameter counts, init, exact identity when MLP_up is zero, gradients, blocks, composition."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import random_batch

from samflow.batch import SamBatch
from samflow.plugins import ForwardContext, PluginStack, SamPlugin, create_plugin
from samflow.sam import HookedSam, build_sam
from samflow_plugins.decoder_tuning import DecoderTuning
from samflow_plugins.sam_adapter import SamAdapter
from samflow_plugins.tokens import ExtraTokens


def hooked(sam, **plugins) -> HookedSam:
    return HookedSam(sam, PluginStack(plugins))


def adapter_on_meta(variant: str, **kwargs) -> SamAdapter:
    with torch.device("meta"):
        sam = build_sam(variant, seed=None)
    adapter = SamAdapter(**kwargs)
    PluginStack({"adapter": adapter}).attach(sam)
    return adapter


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- parameters and init ----
@pytest.mark.parametrize(
    ("variant", "expected"),
    # vit_b: conv 3*16*16*24+24 = 18,456; linear 768*24+24 = 18,456; 12 x (24*24+24) = 7,200;
    #        up 24*768+768 = 19,200.
    # vit_l: 24,608 + 32,800 + 24 x 1,056 + 33,792.  vit_h: 30,760 + 51,240 + 32 x 1,640 + 52,480.
    [("vit_b", 63_312), ("vit_l", 116_544), ("vit_h", 186_960)],
)
def test_parameter_count_on_real_variants(variant, expected):
    assert count(adapter_on_meta(variant)) == expected


def test_parameter_breakdown_vit_b():
    adapter = adapter_on_meta("vit_b")
    parts = {name: count(getattr(adapter, name)) for name in ("hfc_embed", "pe_embed", "tune", "up")}
    assert parts == {"hfc_embed": 18_456, "pe_embed": 18_456, "tune": 7_200, "up": 19_200}
    assert adapter.hfc_embed.kernel_size == (16, 16) and adapter.hfc_embed.stride == (16, 16)
    assert count(adapter_on_meta("vit_b", blocks=[2, 5])) == 63_312 - 10 * 600


def test_init_follows_the_reference(tiny_sam):
    adapter = SamAdapter(scale_factor=1)  # 64 channels on the tiny SAM: enough samples to measure the init
    PluginStack({"adapter": adapter}).attach(tiny_sam)
    conv = adapter.hfc_embed.weight
    fan_out = 16 * 16 * 64
    assert abs(conv.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.03 and conv.mean().abs() < 1e-3
    for linear in (adapter.pe_embed, adapter.up, *adapter.tune.values()):
        assert abs(linear.weight.std().item() - 0.02) < 0.002
        assert not linear.bias.any()
    assert not adapter.hfc_embed.bias.any()
    zero = SamAdapter(zero_init_up=True)
    PluginStack({"adapter": zero}).attach(tiny_sam)
    assert not zero.up.weight.any() and not zero.up.bias.any() and zero.pe_embed.weight.any()


def test_registered_and_declares_the_mask_decoder():
    assert isinstance(create_plugin("sam_adapter"), SamAdapter)
    assert SamAdapter().sam_modules_to_train() == ["mask_decoder"]
    assert SamAdapter(train_decoder=False).sam_modules_to_train() == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blocks": [0, 4]}, r"'adapter'.*blocks \[4\].*0\.\.3"),
        ({"scale_factor": 128}, r"'adapter'.*scale_factor 128"),
    ],
)
def test_setup_errors_name_the_plugin(tiny_sam, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hooked(tiny_sam, adapter=SamAdapter(**kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [{"scale_factor": 0}, {"hfc": "wavelet"}, {"freq_rate": 1.5}, {"blocks": []}, {"laplacian_kernel": 4}],
)
def test_bad_arguments_fail_early(kwargs):
    with pytest.raises(ValueError, match="sam_adapter"):
        SamAdapter(**kwargs)


# ---- behaviour in the hooked forward ----
@pytest.mark.parametrize("hfc", ["fft", "laplacian", "gaussian"])
def test_zero_up_projection_is_exactly_frozen_sam(tiny_sam, hfc):
    batch = random_batch(2, prompt="none")
    plain = hooked(tiny_sam)
    zero = hooked(tiny_sam, adapter=SamAdapter(hfc=hfc, zero_init_up=True))
    active = hooked(tiny_sam, adapter=SamAdapter(hfc=hfc))
    with torch.no_grad():
        ref = plain(batch)
        out = zero(batch)
        moved = active(batch)
    assert torch.equal(out.masks["sam"], ref.masks["sam"])
    assert torch.equal(out.iou_pred, ref.iou_pred)
    # The default (reference) init changes the output from the first step.
    assert not torch.allclose(moved.masks["sam"], ref.masks["sam"], atol=1e-4)


def test_features_are_computed_once_per_forward(tiny_sam):
    adapter = SamAdapter()
    model = hooked(tiny_sam, adapter=adapter)
    calls = []
    original = adapter.high_frequency
    adapter.high_frequency = lambda image: calls.append(image.shape) or original(image)
    model(random_batch(3, prompt="none"))
    assert calls == [(3, 3, 128, 128)]


def test_gradients_reach_only_the_adapter_and_the_mask_decoder(tiny_sam):
    adapter = SamAdapter()
    model = hooked(tiny_sam, adapter=adapter)  # attach unfreezes the mask decoder the adapter declares
    assert all(p.requires_grad for p in tiny_sam.mask_decoder.parameters())
    batch = random_batch(2, prompt="none")
    out = model.train()(batch)
    target = F.interpolate(batch.row_mask, size=out.pred.shape[-2:], mode="nearest")
    F.binary_cross_entropy_with_logits(out.pred, target).backward()

    for name, param in adapter.named_parameters():  # MLP_tune^0 is reached through every frozen block
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    decoder = {id(p) for p in tiny_sam.mask_decoder.parameters()}
    with_grad = [n for n, p in tiny_sam.named_parameters() if p.grad is not None]
    assert with_grad and all(n.startswith("mask_decoder.") for n in with_grad)
    assert all(p.grad is None for p in tiny_sam.image_encoder.parameters())
    assert all(p.grad is None for p in tiny_sam.prompt_encoder.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == decoder | {id(p) for p in adapter.parameters()}
    assert {id(p) for p in model.plugins.owned["adapter"].values()} == trainable  # one owner: the adapter


class Spy(SamPlugin):
    """Records each block input it sees under ``ctx.state[key][i]``."""

    def block_input(self, i, x, ctx):
        ctx.state.setdefault(self.key, {})[i] = x
        return x


def test_only_selected_blocks_receive_a_prompt(tiny_sam):
    adapter = SamAdapter(blocks=[3, 1, 3])
    model = hooked(tiny_sam, before=Spy(), adapter=adapter, after=Spy())
    assert sorted(adapter.tune) == ["1", "3"]
    ctx = model.context(random_batch(2, prompt="none"))
    with torch.no_grad():
        model.encode(ctx)
    before, after = ctx.state["before"], ctx.state["after"]
    features = ctx.state["adapter"]["features"]
    assert features.shape == (2, 8, 8, 2)  # (B, h, w, C/32) on the tiny SAM
    for i in range(4):
        if i in (1, 3):
            assert torch.equal(after[i], before[i] + adapter.prompt(i, features))
            assert not torch.equal(after[i], before[i])
        else:
            assert after[i] is before[i]


def test_block_input_without_on_image_fails_clearly(tiny_sam):
    adapter = SamAdapter()
    hooked(tiny_sam, adapter=adapter)
    ctx = ForwardContext(sam=tiny_sam, batch=SamBatch(image=torch.zeros(1, 3, 128, 128)))
    with pytest.raises(RuntimeError, match="'adapter'.*on_image"):
        adapter.block_input(0, torch.zeros(1, 8, 8, 64), ctx)


def test_composes_with_tokens_and_decoder_tuning(tiny_sam):
    def stack(zero: bool) -> HookedSam:
        torch.manual_seed(1)
        return hooked(
            tiny_sam,
            adapter=SamAdapter(zero_init_up=zero),
            tokens=ExtraTokens(),
            decoder=DecoderTuning(),
        )

    tokens_only = hooked(tiny_sam, tokens=ExtraTokens())
    plugins = stack(False).plugins
    declared = {key: p.sam_modules_to_train() for key, p in plugins.items() if p.sam_modules_to_train()}
    assert declared == {"adapter": ["mask_decoder"], "decoder": ["mask_decoder"]}
    # both declare the mask decoder; the first to name it owns it, so it is counted (and optimised) once
    decoder = {f"sam.mask_decoder.{n}" for n, _ in tiny_sam.mask_decoder.named_parameters()}
    assert decoder <= set(plugins.owned["adapter"]) and not decoder & set(plugins.owned["decoder"])
    assert not decoder & set(plugins.owned["tokens"])
    for prompt in ("none", "box"):
        batch = random_batch(2, prompt=prompt)
        with torch.no_grad():
            ref = tokens_only(batch)
            zero = stack(True)(batch)
            active = stack(False)(batch)
        assert set(zero.masks) == {"sam", "tokens/mask0"}
        assert torch.equal(zero.pred, ref.pred) and torch.equal(zero.pred, zero.masks["tokens/mask0"])
        assert active.pred.shape == (2, 1, 32, 32)
        assert not torch.allclose(active.pred, ref.pred, atol=1e-4)

    model = stack(False)
    out = model(random_batch(2, prompt="box"))
    out.pred.sum().backward()
    assert all(p.grad is not None for p in model.plugins["adapter"].parameters())
    assert model.plugins["tokens"].tokens.weight.grad is not None


def test_state_dict_round_trip_and_pickle(tiny_sam):
    batch = random_batch(2, prompt="none")
    first = hooked(tiny_sam, adapter=SamAdapter(blocks=[0, 2], hfc="gaussian"))
    torch.manual_seed(7)
    second = hooked(tiny_sam, adapter=SamAdapter(blocks=[0, 2], hfc="gaussian"))
    modules = ("hfc_embed", "pe_embed", "tune.0", "tune.2", "up")
    assert sorted(first.plugins.state_dict()) == sorted(
        f"adapter.{m}.{p}" for m in modules for p in ("weight", "bias")
    )
    second.plugins.load_state_dict(first.plugins.state_dict())
    clone = pickle.loads(pickle.dumps(first.plugins["adapter"]))
    third = hooked(tiny_sam, adapter=SamAdapter(blocks=[0, 2], hfc="gaussian"))
    third.plugins["adapter"].load_state_dict(clone.state_dict())
    with torch.no_grad():
        ref = first(batch).pred
        assert torch.equal(second(batch).pred, ref) and torch.equal(third(batch).pred, ref)


def test_bf16_autocast_keeps_the_high_pass_in_float32(tiny_sam):
    adapter = SamAdapter()
    model = hooked(tiny_sam, adapter=adapter)
    batch = random_batch(1, prompt="none")
    seen = []
    original = adapter.high_frequency
    adapter.high_frequency = lambda image: seen.append(out := original(image)) or out
    with torch.no_grad():
        full = model(batch).pred
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(batch).pred
    assert seen[1].dtype == torch.float32
    torch.testing.assert_close(seen[1], seen[0], atol=0, rtol=0)
    torch.testing.assert_close(half.float(), full, atol=0.15, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_model_device_under_bf16(tiny_sam):
    model = hooked(tiny_sam.cuda(), adapter=SamAdapter()).cuda()
    batch = random_batch(2, prompt="none")
    batch = batch.to("cuda")
    ctx = model.context(batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch, ctx)
    features = ctx.state["adapter"]["features"]
    assert features.is_cuda and out.pred.is_cuda and torch.isfinite(out.pred).all()
