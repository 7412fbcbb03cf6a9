"""SamAdapter against the official SAM-Adapter code (tianrun-chen/SAM-Adapter-PyTorch) on shared weights.

The official code is not vendored: point ``SAMFLOW_SAM_ADAPTER_SRC`` at a checkout of the repository
(the folder holding ``models/mmseg/models/sam/image_encoder.py``; checked at commit 665145d1). Without
it these tests skip. Only ``image_encoder.py`` and its ``common.py`` are imported, as modules of a
stand-in package: the package's ``__init__`` pulls in mmseg/mmcv, which the encoder does not need.

The official encoder (``ImageEncoderViT`` with its hard-coded ``PromptGenerator``: scale 32, FFT
high-pass at rate 0.25) is built with the tiny SAM's shape and given the tiny SAM's weights and the
adapter's, in float64. ``reference_token_order: true`` must then give the official F_hfc, F_pe,
prompts P^i and image embedding; the default (the correct token order) must differ from the official
output by exactly the token order of F_pe.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import random_batch
from official_code import image_encoder, import_modules
from torch import nn

from samflow.plugins import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow.sam.build import VARIANTS
from samflow_plugins.sam_adapter import SamAdapter

SRC = os.environ.get("SAMFLOW_SAM_ADAPTER_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="SAMFLOW_SAM_ADAPTER_SRC (a SAM-Adapter checkout) is not set")
PACKAGE = "_official_sam_adapter"
ATOL = 1e-10


@pytest.fixture
def official(monkeypatch):
    """The official ``image_encoder`` module, imported without the mmseg package around it."""
    yield from import_modules(
        monkeypatch,
        PACKAGE,
        Path(SRC or ".") / "models" / "mmseg" / "models" / "sam",
        ("common", "image_encoder"),
    )


def official_encoder(official, sam, scale_factor: int) -> nn.Module:
    """The official encoder with the tiny SAM's shape (its prompt generator rebuilt for ``scale_factor``)."""
    enc = sam.image_encoder
    ref = image_encoder(official.ImageEncoderViT, VARIANTS["tiny"], img_size=enc.img_size)
    if scale_factor != ref.scale_factor:  # the official class, with another of its own arguments
        ref.prompt_generator = official.PromptGenerator(
            scale_factor, "highpass", 64, 1234, 4, "fft", 0.25, True, True, "adaptor", enc.img_size, 16
        )
    return ref


def shared_weights(official, sam, scale_factor: int, **options) -> tuple[nn.Module, SamAdapter, HookedSam]:
    """Official encoder and samflow's adapter on the tiny SAM, with the same random weights, float64."""
    sam = sam.double()
    adapter = SamAdapter(scale_factor=scale_factor, **options)
    model = HookedSam(sam, PluginStack({"adapter": adapter}))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in adapter.parameters():  # larger than the init, so every path moves the output
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    adapter.double()
    ref = official_encoder(official, sam, scale_factor).double()
    state = {
        **sam.image_encoder.state_dict(),
        "prompt_generator.prompt_generator.proj.weight": adapter.hfc_embed.weight,
        "prompt_generator.prompt_generator.proj.bias": adapter.hfc_embed.bias,
        "prompt_generator.embedding_generator.weight": adapter.pe_embed.weight,
        "prompt_generator.embedding_generator.bias": adapter.pe_embed.bias,
        "prompt_generator.shared_mlp.weight": adapter.up.weight,
        "prompt_generator.shared_mlp.bias": adapter.up.bias,
    }
    for i in range(4):
        state[f"prompt_generator.lightweight_mlp_{i}.0.weight"] = adapter.tune[str(i)].weight
        state[f"prompt_generator.lightweight_mlp_{i}.0.bias"] = adapter.tune[str(i)].bias
    ref.load_state_dict(state, strict=True)  # every official tensor mapped, none left over
    return ref.eval(), adapter, model


def normalized_input(model: HookedSam, batch_size: int = 2):
    """A random batch's context and its normalised images (float64), as the encoder receives them."""
    batch = random_batch(batch_size, prompt="none", seed=3, dtype=torch.float64)
    ctx = model.context(batch)
    return ctx, model.preprocess(batch.image, batch.input_size)


@pytest.mark.parametrize("scale_factor", [32, 4])  # the official hard-coded 32 (2 channels), and 16 channels
def test_reference_token_order_equals_the_official_encoder(official, tiny_sam, scale_factor):
    ref, adapter, model = shared_weights(official, tiny_sam, scale_factor, reference_token_order=True)
    ctx, x = normalized_input(model)
    gen = ref.prompt_generator
    with torch.no_grad():
        tokens = ref.patch_embed(x)  # (B, 8, 8, 64), SAM's patch embedding before pos_embed
        torch.testing.assert_close(tokens, tiny_sam.image_encoder.patch_embed(x), rtol=0, atol=0)
        b, h, w, _ = tokens.shape
        # F_hfc: the FFT high-pass of the normalised image
        torch.testing.assert_close(adapter.high_frequency(x), gen.fft(x, 0.25), rtol=0, atol=ATOL)
        # F_hfc + F_pe and every block's prompt P^i
        hf = gen.init_handcrafted(x)
        ef = gen.init_embeddings(tokens)
        features = adapter.features(x, tokens)
        hf_tokens = hf.flatten(2).transpose(1, 2)  # the official (B, C/s, h, w) -> (B, hw, C/s)
        torch.testing.assert_close(features.reshape(b, h * w, -1), hf_tokens + ef, rtol=0, atol=ATOL)
        prompts = gen.get_prompt(hf, ef)
        for i in range(4):
            ours = adapter.prompt(i, features).reshape(b, h * w, -1)
            torch.testing.assert_close(ours, prompts[i], rtol=0, atol=ATOL)
        # the image embedding
        expected = ref(x)
        embeddings, _ = model.run_encoder(x, ctx)
        torch.testing.assert_close(embeddings, expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(model.encode(ctx).embeddings, expected, rtol=0, atol=ATOL)
        # the adapter matters: without it the embedding is far from the official one
        sam_alone = HookedSam(tiny_sam)
        plain, _ = sam_alone.run_encoder(x, sam_alone.context(ctx.batch))
        assert (plain - expected).abs().max() > 0.1


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_high_frequency_equals_the_official_fft_at_every_rate(official, tiny_sam, rate):
    ref, adapter, _ = shared_weights(official, tiny_sam, 32, freq_rate=rate)
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = ref.prompt_generator.fft(x, rate)
    torch.testing.assert_close(adapter.high_frequency(x), expected, rtol=0, atol=ATOL)
    if rate == 0.0:
        torch.testing.assert_close(expected, x.abs(), rtol=0, atol=ATOL)  # nothing removed
    else:
        assert (expected - x.abs()).abs().max() > 0.1


def test_default_token_order_differs_from_the_official_only_in_f_pe(official, tiny_sam):
    """The default (correct order) equals the official encoder with its F_pe reshape fixed, no more."""
    ref, adapter, model = shared_weights(official, tiny_sam, 4)
    ctx, x = normalized_input(model)
    gen = ref.prompt_generator
    with torch.no_grad():
        bugged = ref(x)
        ours, _ = model.run_encoder(x, ctx)
        assert (ours - bugged).abs().max() > 0.1  # the official scramble changes the output
        tokens = ref.patch_embed(x)
        b, h, w, c = tokens.shape
        f_pe = adapter.features(x, tokens) - adapter.hfc_embed(adapter.high_frequency(x)).permute(0, 2, 3, 1)
        correct = gen.embedding_generator(tokens.reshape(b, h * w, c))  # patch (r, c) is token r*w + c
        torch.testing.assert_close(f_pe.reshape(b, h * w, -1), correct, rtol=0, atol=ATOL)
        assert (correct - gen.init_embeddings(tokens)).abs().max() > 0.1
        # the official forward with only init_embeddings replaced by the correct flatten
        gen.init_embeddings = lambda t: gen.embedding_generator(t.reshape(t.shape[0], -1, t.shape[-1]))
        torch.testing.assert_close(ours, ref(x), rtol=0, atol=ATOL)


def test_parameter_count_equals_the_official_prompt_generator_on_vit_b(official):
    """ViT-B (768 channels, 12 blocks, 1024 px, scale 32): 63,312 adapter parameters in both."""
    ref = official.PromptGenerator(
        32, "highpass", 768, 1234, 12, "fft", 0.25, True, True, "adaptor", 1024, 16
    )
    with torch.device("meta"):
        sam = build_sam("vit_b", seed=None)
    adapter = SamAdapter()
    PluginStack({"adapter": adapter}).attach(sam)
    shapes = {
        "hfc_embed": ref.prompt_generator.proj,
        "pe_embed": ref.embedding_generator,
        "up": ref.shared_mlp,
        **{f"tune.{i}": getattr(ref, f"lightweight_mlp_{i}")[0] for i in range(12)},
    }
    for name, module in shapes.items():
        ours = adapter.get_submodule(name)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in module.state_dict().items()
        }
    count = sum(p.numel() for p in ref.parameters())
    assert count == sum(p.numel() for p in adapter.parameters()) == 63_312
