"""SamAdapter against the official SAM-Adapter code (tianrun-chen/SAM-Adapter-PyTorch) on shared weights.

The official code is not vendored: point ``SAMFLOW_SAM_ADAPTER_SRC`` at a checkout of the repository
(the folder holding ``models/mmseg/models/sam/image_encoder.py``; checked at commit 665145d1) and the
tests run it; without it they compare with its outputs recorded in ``reference_outputs/sam_adapter.pt``
(``SAMFLOW_RECORD_REFERENCE=1`` with the checkout records them again; a tensor of over 4096 elements
as a ``Sketch``, compared by ``official_code.assert_close``). Only ``image_encoder.py`` and
its ``common.py`` are imported, as modules of a stand-in package: the package's ``__init__`` pulls in
mmseg/mmcv, which the encoder does not need.

The official encoder (``ImageEncoderViT`` with its hard-coded ``PromptGenerator``: scale 32, FFT
high-pass at rate 0.25) is built with the tiny SAM's shape and given the tiny SAM's weights and the
adapter's, in float64. ``reference_token_order: true`` must then give the official F_hfc, F_pe,
prompts P^i and image embedding; the default (the correct token order) must differ from the official
output by exactly the token order of F_pe.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import random_batch
from official_code import (
    ReferenceOutputs,
    assert_close,
    fingerprint,
    image_encoder,
    import_modules,
    largest_difference,
)
from torch import nn

from samflow.plugins import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow.sam.build import VARIANTS
from samflow_plugins.sam_adapter import SamAdapter

REF = ReferenceOutputs("sam_adapter", "SAMFLOW_SAM_ADAPTER_SRC")
PACKAGE = "_official_sam_adapter"
ATOL = 1e-10
# the official PromptGenerator's arguments after scale_factor: (prompt_type, embed_dim, tuning_stage,
# depth, input_type, freq_nums, handcrafted_tune, embedding_tune, adaptor, img_size, patch_size)
TINY = ("highpass", 64, 1234, 4, "fft", 0.25, True, True, "adaptor", 128, 16)
VIT_B = ("highpass", 768, 1234, 12, "fft", 0.25, True, True, "adaptor", 1024, 16)


@pytest.fixture
def official(monkeypatch):
    """The official ``image_encoder`` module, imported without the mmseg package around it, when the
    checkout is given (else None: the recorded outputs answer)."""
    if not REF.src:
        yield None
        return
    yield from import_modules(
        monkeypatch,
        PACKAGE,
        Path(REF.src) / "models" / "mmseg" / "models" / "sam",
        ("common", "image_encoder"),
    )


def adapted(sam, scale_factor: int, **options) -> tuple[SamAdapter, HookedSam]:
    """samflow's adapter on the tiny SAM, with random weights (seed 7), float64."""
    sam = sam.double()
    adapter = SamAdapter(scale_factor=scale_factor, **options)
    model = HookedSam(sam, PluginStack({"adapter": adapter}))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in adapter.parameters():  # larger than the init, so every path moves the output
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    adapter.double()
    return adapter, model


def official_state(sam, adapter: SamAdapter) -> dict[str, torch.Tensor]:
    """The official encoder's state dict holding the tiny SAM's weights and the adapter's."""
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
    return {k: v.detach() for k, v in state.items()}


def official_encoder(official, state: dict[str, torch.Tensor], scale_factor: int) -> nn.Module:
    """The official encoder with the tiny SAM's shape (its prompt generator rebuilt for ``scale_factor``),
    holding ``state`` in float64."""
    ref = image_encoder(official.ImageEncoderViT, VARIANTS["tiny"], img_size=VARIANTS["tiny"].img_size)
    if scale_factor != ref.scale_factor:  # the official class, with another of its own arguments
        ref.prompt_generator = official.PromptGenerator(scale_factor, *TINY)
    ref = ref.double()
    ref.load_state_dict(state, strict=True)  # every official tensor mapped, none left over
    return ref.eval()


def official_fft(official, x: torch.Tensor, rate: float) -> torch.Tensor:
    """The official ``PromptGenerator.fft`` (no weights: the high-pass of ``x`` at ``rate``)."""
    return official.PromptGenerator(32, *TINY).fft(x, rate)


def recorded_fft(official, key: str, x: torch.Tensor, rate: float) -> torch.Tensor:
    """The official high-pass of ``x`` at ``rate``: computed with the checkout, else recorded."""
    return REF.get(key, fingerprint(x, rate), lambda: {"fft": official_fft(official, x, rate)})["fft"]


def normalized_input(model: HookedSam, batch_size: int = 2):
    """A random batch's context and its normalised images (float64), as the encoder receives them."""
    batch = random_batch(batch_size, prompt="none", seed=3, dtype=torch.float64)
    ctx = model.context(batch)
    return ctx, model.preprocess(batch.image, batch.input_size)


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
@pytest.mark.parametrize("scale_factor", [32, 4])  # the official hard-coded 32 (2 channels), and 16 channels
def test_reference_token_order_equals_the_official_encoder(official, tiny_sam, scale_factor):
    adapter, model = adapted(tiny_sam, scale_factor, reference_token_order=True)
    ctx, x = normalized_input(model)
    state = official_state(tiny_sam, adapter)

    def official_outputs() -> dict[str, torch.Tensor]:
        ref = official_encoder(official, state, scale_factor)
        gen = ref.prompt_generator
        with torch.no_grad():
            tokens = ref.patch_embed(x)  # (B, 8, 8, 64), SAM's patch embedding before pos_embed
            hf = gen.init_handcrafted(x)
            ef = gen.init_embeddings(tokens)
            hf_tokens = hf.flatten(2).transpose(1, 2)  # the official (B, C/s, h, w) -> (B, hw, C/s)
            return {
                "tokens": tokens,
                "features": hf_tokens + ef,
                "prompts": list(gen.get_prompt(hf, ef)),  # one tensor (sketch) per block
                "embeddings": ref(x),
            }

    expected = REF.get(
        f"reference_token_order/scale_{scale_factor}", fingerprint(state, x, scale_factor), official_outputs
    )
    # F_hfc: the FFT high-pass of the normalised image (the same for every scale factor)
    fft = recorded_fft(official, "fft/normalized_input", x, 0.25)
    with torch.no_grad():
        tokens = tiny_sam.image_encoder.patch_embed(x)
        # the same patch embedding: equal bit for bit with the live official code; a recording made on
        # another CPU differs in the last bits (4e-15)
        assert_close(tokens, expected["tokens"], rtol=0, atol=ATOL)
        b, h, w, _ = tokens.shape
        assert_close(adapter.high_frequency(x), fft, rtol=0, atol=ATOL)
        # F_hfc + F_pe and every block's prompt P^i
        features = adapter.features(x, tokens)
        assert_close(features.reshape(b, h * w, -1), expected["features"], rtol=0, atol=ATOL)
        assert len(expected["prompts"]) == 4
        for i in range(4):
            ours = adapter.prompt(i, features).reshape(b, h * w, -1)
            assert_close(ours, expected["prompts"][i], rtol=0, atol=ATOL)
        # the image embedding
        embeddings, _ = model.run_encoder(x, ctx)
        assert_close(embeddings, expected["embeddings"], rtol=0, atol=ATOL)
        assert_close(model.encode(ctx).embeddings, expected["embeddings"], rtol=0, atol=ATOL)
        # the adapter matters: without it the embedding is far from the official one
        sam_alone = HookedSam(tiny_sam)
        plain, _ = sam_alone.run_encoder(x, sam_alone.context(ctx.batch))
        assert largest_difference(plain, expected["embeddings"]) > 0.1


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_high_frequency_equals_the_official_fft_at_every_rate(official, tiny_sam, rate):
    adapter, _ = adapted(tiny_sam, 32, freq_rate=rate)
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = recorded_fft(official, f"fft/rate_{rate}", x, rate)
    assert_close(adapter.high_frequency(x), expected, rtol=0, atol=ATOL)
    if rate == 0.0:
        assert_close(x.abs(), expected, rtol=0, atol=ATOL)  # nothing removed
    else:
        assert largest_difference(x.abs(), expected) > 0.1


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
def test_default_token_order_differs_from_the_official_only_in_f_pe(official, tiny_sam):
    """The default (correct order) equals the official encoder with its F_pe reshape fixed, no more."""
    adapter, model = adapted(tiny_sam, 4)
    ctx, x = normalized_input(model)
    state = official_state(tiny_sam, adapter)

    def official_outputs() -> dict[str, torch.Tensor]:
        ref = official_encoder(official, state, 4)
        gen = ref.prompt_generator
        with torch.no_grad():
            bugged = ref(x)
            tokens = ref.patch_embed(x)
            b, h, w, c = tokens.shape
            correct = gen.embedding_generator(tokens.reshape(b, h * w, c))  # patch (r, c) is token r*w + c
            scrambled = gen.init_embeddings(tokens)
            # the official forward with only init_embeddings replaced by the correct flatten
            gen.init_embeddings = lambda t: gen.embedding_generator(t.reshape(t.shape[0], -1, t.shape[-1]))
            return {"bugged": bugged, "correct": correct, "scrambled": scrambled, "fixed": ref(x)}

    expected = REF.get("default_token_order", fingerprint(state, x, 4), official_outputs)
    with torch.no_grad():
        ours, _ = model.run_encoder(x, ctx)
        assert largest_difference(ours, expected["bugged"]) > 0.1  # the official scramble changes the output
        tokens = tiny_sam.image_encoder.patch_embed(x)  # the official patch embedding's (first test)
        b, h, w, _ = tokens.shape
        f_pe = adapter.features(x, tokens) - adapter.hfc_embed(adapter.high_frequency(x)).permute(0, 2, 3, 1)
        assert_close(f_pe.reshape(b, h * w, -1), expected["correct"], rtol=0, atol=ATOL)
        assert (expected["correct"] - expected["scrambled"]).abs().max() > 0.1  # (B, hw, C/4): never sketched
        assert_close(ours, expected["fixed"], rtol=0, atol=ATOL)


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
def test_parameter_count_equals_the_official_prompt_generator_on_vit_b(official):
    """ViT-B (768 channels, 12 blocks, 1024 px, scale 32): 63,312 adapter parameters in both."""
    names = {
        "hfc_embed": "prompt_generator.proj",
        "pe_embed": "embedding_generator",
        "up": "shared_mlp",
        **{f"tune.{i}": f"lightweight_mlp_{i}.0" for i in range(12)},
    }

    def official_shapes() -> dict:
        ref = official.PromptGenerator(32, *VIT_B)
        return {
            "shapes": {
                name: {k: list(v.shape) for k, v in ref.get_submodule(path).state_dict().items()}
                for name, path in names.items()
            },
            "count": sum(p.numel() for p in ref.parameters()),
        }

    expected = REF.get("parameter_count/vit_b", fingerprint(32, VIT_B, names), official_shapes)
    with torch.device("meta"):
        sam = build_sam("vit_b", seed=None)
    adapter = SamAdapter()
    PluginStack({"adapter": adapter}).attach(sam)
    for name in names:
        ours = adapter.get_submodule(name)
        assert {k: list(v.shape) for k, v in ours.state_dict().items()} == expected["shapes"][name]
    assert expected["count"] == sum(p.numel() for p in adapter.parameters()) == 63_312
