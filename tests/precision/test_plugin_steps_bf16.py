"""A training step of the tiny SAM with each built-in plugin under bf16 autocast, as Lightning's
``bf16-mixed`` runs it on the CPU: forward and losses inside ``torch.autocast``, backward outside.

The step must be finite, its loss terms float32 and close to the float32 step's, its gradient point
the same way, and every trainable weight (and its gradient) stay float32.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from samflow.module import SamflowModule, SamSpec
from samflow.plugins.registry import discover

BUILTIN = {i.name: i.cls for i in discover().all if i.distribution == "samflow"}
# PA-SAM mines hard points only from ``mining_start_epoch + 1`` in training: from the start here
ARGS: dict[str, dict] = {"pa_sam": {"mining_start_epoch": -1}}


def _step(name: str, bf16: bool) -> tuple[dict[str, torch.Tensor], SamflowModule]:
    torch.manual_seed(0)
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={name: BUILTIN[name](**ARGS.get(name, {}))})
    module.train()
    batch = random_batch(2, prompt="box", seed=1)
    torch.manual_seed(5)  # the same random draws (Gumbel noise, sampled points) in both steps
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out, ctx = module(batch)
        terms = module.compute_losses(out, batch, ctx)
    terms["total"].backward()
    return terms, module


def _gradient(module: SamflowModule) -> torch.Tensor:
    grads = [p.grad.flatten() for p in module.parameters() if p.requires_grad and p.grad is not None]
    return torch.cat(grads).double()


NAMES = ["ba_sam", "decoder_tuning", "hq_sam", "lora", "pa_sam", "sam_adapter", "sapnet", "tokens", "wsi_sam"]


def test_every_built_in_plugin_is_checked():
    assert set(NAMES) <= set(BUILTIN)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_a_bf16_training_step_is_finite_float32_and_close_to_the_float32_step(name):
    full, full_module = _step(name, bf16=False)
    mixed, mixed_module = _step(name, bf16=True)
    assert mixed.keys() == full.keys()
    for key, value in mixed.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
        # bf16 activations move the loss by ~1e-4 relative here; a term computed in bf16 by ~1e-2
        torch.testing.assert_close(value, full[key], rtol=5e-3, atol=1e-4, msg=key)
    trainable = [(n, p) for n, p in mixed_module.named_parameters() if p.requires_grad]
    for pname, param in trainable:
        assert param.dtype == torch.float32, pname
        assert param.grad is None or (
            param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all()
        ), pname
    g_mixed, g_full = _gradient(mixed_module), _gradient(full_module)
    assert g_mixed.shape == g_full.shape
    cosine = (g_mixed @ g_full) / (g_mixed.norm() * g_full.norm())
    assert cosine > 0.99, cosine
