"""Every pair of built-in plugins in one model on the tiny SAM: it trains, or it is refused in one line.

A pair composes when a training step (forward, ``compute_losses``, backward, an optimizer step) gives
a finite loss, a gradient to every parameter of each plugin that its hooks use, none to frozen SAM
(which stays bit for bit as it was), and one optimizer group per plugin holding exactly what it owns.
It is refused when both plugins give the model's prediction (``select``: HQ-SAM, WSI-SAM, the extra
tokens with ``predict``): one's mask would reach no loss or metric, which of them by the key order.

Beyond running: a loss that only one plugin's output reaches gives no gradient to the other's
parameters that act after SAM's decoder. The key order and identity plugins (LoRA's B = 0,
SAM-Adapter with ``zero_init_up``, BA-SAM with zero slopes, decoder tuning, SAPNet, which only adds a
loss) are ``test_combination_order.py``'s, with this file's plugins, batches and helpers.

Batches: every pair gets the same two random images with boxes; a pair with ``sapnet`` gets the
COCO fields it reads (``classes``, six ``proposals`` per row), one with ``wsi_sam`` the low-resolution
context views it reads (``context_image``, ``context_mask``). No pair is skipped: SAPNet's fields and
WSI-SAM's views are extra inputs the other plugins ignore, so every pair has a meaningful batch.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import pytest
import torch
from helpers import random_batch

from samflow.data.coco_batch import CocoBatch
from samflow.module import SamflowModule, SamSpec
from samflow.plugins import PluginConflictError, SamPlugin
from samflow.plugins.registry import discover
from samflow_plugins.ba_sam import BASam
from samflow_plugins.decoder_tuning import DecoderTuning
from samflow_plugins.hq_sam import HQSam
from samflow_plugins.lora import LoRA
from samflow_plugins.pa_sam import PASam
from samflow_plugins.sam_adapter import SamAdapter
from samflow_plugins.sapnet import SAPNet
from samflow_plugins.tokens import ExtraTokens
from samflow_plugins.wsi_sam import WSISam

#: Each built-in with options that keep a step small and reach every code path: PA-SAM mines its
#: hard points from the first step (its appended tokens join the pass), HQ-SAM samples 256 points.
MAKE: dict[str, Callable[..., SamPlugin]] = {
    "ba_sam": BASam,
    "decoder_tuning": DecoderTuning,
    "hq_sam": lambda **kw: HQSam(num_points=256, **kw),
    "lora": LoRA,
    "pa_sam": lambda **kw: PASam(mining_start_epoch=-1, **kw),
    "sam_adapter": SamAdapter,
    "sapnet": lambda **kw: SAPNet(num_classes=3, hidden=32, num_negatives=8, **kw),
    "tokens": ExtraTokens,
    "wsi_sam": WSISam,
}
PAIRS = list(itertools.combinations(sorted(MAKE), 2))
#: The plugins that always give the prediction (``select``); any two of them are refused.
PREDICTING = {"hq_sam", "tokens", "wsi_sam"}
REFUSED = [p for p in PAIRS if set(p) <= PREDICTING]
COMPOSING = [p for p in PAIRS if p not in REFUSED]
#: Pairs that both train SAM's mask decoder (SAM-Adapter trains it with its adapter, as the paper).
SHARED_PART = {("decoder_tuning", "sam_adapter")}

#: Parameters of each plugin that act only after SAM's two-way transformer (heads, fusions, SAPNet's
#: selection net): no output of another plugin can depend on them. Token embeddings are not among them:
#: every token joins the same attention (architecture.md, "Decoder"), so they are shared by design.
AFTER_DECODER: dict[str, Callable[[str], bool]] = {
    "tokens": lambda name: name.startswith("heads."),
    "hq_sam": lambda name: not name.startswith("hf_token."),
    "wsi_sam": lambda name: ".hf_token." not in name,
    "sapnet": lambda name: True,
}
#: Plugins with outputs of their own (masks ``<key>/...`` or loss terms) to put a loss on.
OWN_OUTPUT = ("hq_sam", "pa_sam", "sapnet", "tokens", "wsi_sam")

#: Built-ins whose initial state is the identity on SAM's forward pass, as configured here.
IDENTITY: dict[str, Callable[[], SamPlugin]] = {
    "lora": LoRA,  # B = 0
    "sam_adapter": lambda: SamAdapter(zero_init_up=True),  # MLP_up = 0
    "ba_sam": lambda: BASam(slopes="zero"),  # scale factor 1 at the tiny SAM's 128 px, zero penalty
    "decoder_tuning": DecoderTuning,  # only unfreezes the decoder
    "sapnet": MAKE["sapnet"],  # adds a loss, changes nothing in the pass
}


def test_every_builtin_is_covered():
    builtins = {i.name for i in discover().all if i.distribution == "samflow"}
    assert builtins == set(MAKE), "classify a new built-in plugin here (MAKE, AFTER_DECODER, IDENTITY)"


def batch_for(names, dtype: torch.dtype = torch.float32) -> CocoBatch:
    """Two random images with boxes, plus SAPNet's COCO fields and WSI-SAM's context views when named."""
    base = random_batch(2, prompt="box", dtype=dtype)
    batch = CocoBatch(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    if "sapnet" in names:
        batch.classes = torch.tensor([0, 2])
        batch.proposals = batch.box[:, None].repeat(1, 6, 1) + torch.arange(6, dtype=dtype)[None, :, None]
    if "wsi_sam" in names:
        context = random_batch(2, prompt="box", seed=1, dtype=dtype)
        batch = batch.replace(context_image=context.image, context_mask=context.mask)
    return batch


def build(plugins: dict[str, SamPlugin], seed: int = 0) -> SamflowModule:
    torch.manual_seed(seed)
    return SamflowModule(sam=SamSpec(variant="tiny"), plugins=plugins)


def pair_module(pair, **kwargs) -> SamflowModule:
    return build({key: MAKE[key](**kwargs.get(key, {})) for key in pair})


def nonzero(param: torch.Tensor) -> bool:
    return param.grad is not None and bool(param.grad.abs().sum() > 0)


def double(batch):
    floats = {
        f.name: value.double()
        for f in dataclasses.fields(batch)
        if isinstance(value := getattr(batch, f.name), torch.Tensor) and value.is_floating_point()
    }
    return batch.replace(**floats)


def nudged(module: SamflowModule, seed: int = 5) -> SamflowModule:
    """Move every trainable parameter off its initial value, by name, so the comparisons bite (LoRA's B,
    a zero-initialised adapter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return module


def assert_same_outputs(first, second, keys=None, tol: float = 1e-9) -> None:
    keys = sorted(first.masks) if keys is None else keys
    assert set(keys) <= set(second.masks)
    for key in keys:
        torch.testing.assert_close(second.masks[key], first.masks[key], rtol=0, atol=tol, msg=key)
    torch.testing.assert_close(second.iou_pred, first.iou_pred, rtol=0, atol=tol)
    torch.testing.assert_close(second.pred, first.pred, rtol=0, atol=tol)


# ---- 1. every pair trains or is refused ----
@pytest.mark.parametrize("pair", COMPOSING, ids="+".join)
def test_pair_trains_one_step(pair):
    # each plugin its own rate, except two that train one SAM part (refused with two rates, below)
    lrs = {key: 1e-3 if pair in SHARED_PART else 1e-3 * (i + 2) for i, key in enumerate(pair)}
    module = pair_module(pair, **{key: {"lr": lr} for key, lr in lrs.items()})
    check_one_step(module, batch_for(pair), lrs)


def check_one_step(module: SamflowModule, batch, lrs: dict[str, float | None]) -> None:
    """A training step of ``module`` (plugins ``lrs``' keys, with those rates) on ``batch``: a finite loss,
    a gradient to what each plugin's hooks use and none to frozen SAM, one optimizer group per plugin
    with its rate and exactly what it owns, and an optimizer step that moves each plugin and no frozen
    parameter."""
    pair = tuple(lrs)
    module.train()
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    optimizer = module.configure_optimizers()
    out, ctx = module(batch)
    loss = module.compute_losses(out, batch, ctx)["total"]
    assert torch.isfinite(loss)
    loss.backward()
    owned = module.plugins.owned
    for key in pair:
        own = {n: p for n, p in owned[key].items() if n.startswith("plugins.")}
        in_sam = {n: p for n, p in owned[key].items() if n.startswith("sam.")}
        # every parameter of the plugin's own takes part; of the SAM parts it trains, some do (the
        # hypernetworks of tokens 1..3 and the IoU head reach no single-mask prediction), and LoRA's A
        # has a zero gradient while B is zero, but every B has one
        dead = [n for n, p in own.items() if not nonzero(p)]
        dead += [n for n, p in in_sam.items() if ".lora_B." in n and not nonzero(p)]
        assert not dead, f"{key}: no gradient reaches {dead[:3]}"
        assert not in_sam or any(nonzero(p) for p in in_sam.values()), key
    assert not [n for n in frozen if module.get_parameter(n).grad is not None]

    # the optimizer: one group per plugin, with its rate and exactly what it owns, each parameter once
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert set(groups) == {key for key in pair if owned[key]}
    listed = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in module.parameters() if p.requires_grad}
    for key, group in groups.items():
        assert {id(p) for p in group["params"]} == {id(p) for p in owned[key].values()}, key
        assert group["lr"] == (lrs[key] or optimizer.defaults["lr"]), key

    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, value in frozen.items():
        assert torch.equal(module.get_parameter(name), value), name
    for key in pair:
        if owned[key]:
            names = [n for n, p in module.named_parameters() if any(p is q for q in owned[key].values())]
            assert any(not torch.equal(module.get_parameter(n), before[n]) for n in names), key


@pytest.mark.parametrize("pair", REFUSED, ids="+".join)
def test_two_plugins_giving_the_prediction_are_refused_naming_both_when_built(pair):
    for order in (pair, pair[::-1]):  # they declare it (``predicts``): refused with the model, no forward
        plugins = {key: MAKE[key]() for key in order}
        with pytest.raises(PluginConflictError) as err:
            build(plugins)
        message = str(err.value)
        assert "\n" not in message and "prediction" in message and "predict: false" in message
        assert all(f"'{key}' ({type(plugins[key]).__name__})" in message for key in pair)


def test_extra_tokens_that_do_not_predict_compose_with_hq_sam_in_either_order():
    """The refusal is about two predictions, not two output tokens: ``predict: false`` composes, and the
    token order (HQ's token before or after the extra one) changes no output (float64)."""
    plugins = {"hq_sam": lambda: MAKE["hq_sam"](), "tokens": lambda: ExtraTokens(predict=False)}
    batch = double(batch_for(plugins))
    outputs = []
    for order in (("hq_sam", "tokens"), ("tokens", "hq_sam")):
        module = nudged(build({k: plugins[k]() for k in order})).eval().double()
        with torch.no_grad():
            outputs.append(module(batch)[0])
    assert_same_outputs(*outputs)
    assert torch.equal(outputs[0].pred, outputs[0].masks["hq_sam/hq"])


# ---- one SAM part trained by two plugins ----
def test_two_plugins_training_one_sam_part_with_other_rates_are_refused_naming_both():
    with pytest.raises(PluginConflictError) as err:
        pair_module(("decoder_tuning", "sam_adapter"), decoder_tuning={"lr": 1e-4}, sam_adapter={"lr": 1e-3})
    message = str(err.value)
    assert "\n" not in message
    assert "'decoder_tuning' (DecoderTuning)" in message and "'sam_adapter' (SamAdapter)" in message
    assert "'mask_decoder'" in message and "0.0001" in message and "0.001" in message


def test_two_plugins_training_one_sam_part_at_one_rate_compose():
    for order in (("decoder_tuning", "sam_adapter"), ("sam_adapter", "decoder_tuning")):
        module = build({k: MAKE[k](lr=1e-3) for k in order})
        optimizer = module.configure_optimizers()
        decoder = {id(p) for p in module.model.sam.mask_decoder.parameters()}
        rates = {g["lr"] for g in optimizer.param_groups if decoder & {id(p) for p in g["params"]}}
        assert rates == {1e-3}
        owner = min(order)  # the key that sorts first owns it, whatever the order written
        assert decoder <= {id(p) for p in module.plugins.owned[owner].values()}


def test_a_module_injected_into_a_trained_sam_part_stays_its_plugins_at_its_rate():
    """LoRA's layers inside an encoder that another plugin trains at another rate: no conflict (only SAM's
    own weights are a shared part), LoRA owns its A and B, the other plugin SAM's weights."""
    plugins = {"lora": LoRA(lr=1e-3), "encoder": DecoderTuning(parts=["image_encoder"], lr=1e-4)}
    owned = build(plugins).plugins.owned
    assert owned["lora"] and all(".lora_" in name for name in owned["lora"])
    assert owned["encoder"] and not any(".lora_" in name for name in owned["encoder"])


# ---- 2. gradient isolation ----
ISOLATION = [
    (own, other)
    for pair in COMPOSING
    for own, other in (pair, pair[::-1])
    if own in OWN_OUTPUT and other in AFTER_DECODER
]


@pytest.mark.parametrize(("own", "other"), ISOLATION, ids="+".join)
def test_a_loss_on_one_plugins_output_gives_no_gradient_to_the_others_heads(own, other):
    module = nudged(pair_module((own, other))).train()
    batch = batch_for((own, other))
    out, ctx = module(batch)
    terms = module.plugins.losses(out, batch, ctx)
    loss = sum(v for k, v in terms.items() if k.startswith(f"{own}/"))
    loss = loss + sum(m.square().mean() for k, m in out.masks.items() if k.startswith(f"{own}/"))
    loss.backward()
    assert any(nonzero(p) for p in module.plugins[own].parameters()), (
        f"the loss reaches no parameter of {own}"
    )
    after = AFTER_DECODER[other]
    reached = [n for n, p in module.plugins[other].named_parameters() if after(n) and nonzero(p)]
    assert not reached, f"{own}'s loss reaches {other}'s {reached[:3]}"


@pytest.mark.parametrize("own", ["hq_sam", "tokens"])
def test_two_token_plugins_keep_their_heads_to_themselves(own):
    """HQ-SAM's token and an extra token (``predict: false``) in one decoder: a loss on one's mask gives
    no gradient to the other's head (each plugin gets its own slice of the decoder's tokens)."""
    module = nudged(build({"hq_sam": MAKE["hq_sam"](), "tokens": ExtraTokens(predict=False)})).train()
    out, _ = module(batch_for(()))
    sum(m.square().mean() for k, m in out.masks.items() if k.startswith(f"{own}/")).backward()
    other = "tokens" if own == "hq_sam" else "hq_sam"
    assert any(nonzero(p) for p in module.plugins[own].parameters())
    after = AFTER_DECODER[other]
    assert not [n for n, p in module.plugins[other].named_parameters() if after(n) and nonzero(p)]


# ---- initial values: each plugin's own random stream ----
def test_two_plugins_of_one_class_start_apart_whatever_the_key_order():
    values = []
    for order in (("a", "b"), ("b", "a")):
        module = build({key: ExtraTokens(init_from_sam=False, predict=key == "a") for key in order})
        values.append({k: module.plugins[k].tokens.weight.detach().clone() for k in ("a", "b")})
        values[-1]["next"] = torch.rand(3)  # the generator after the build
    assert not torch.equal(values[0]["a"], values[0]["b"])
    for name in ("a", "b", "next"):
        assert torch.equal(values[0][name], values[1][name]), name
    torch.manual_seed(0)
    alone = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"a": ExtraTokens(init_from_sam=False)})
    assert torch.equal(alone.plugins["a"].tokens.weight, values[0]["a"])  # the first by key: as alone
