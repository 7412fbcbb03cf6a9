"""BASam against the official BA-SAM code (zongzi13545329/BA-SAM) on shared weights.

The official code is not vendored: point ``SAMFLOW_BA_SAM_SRC`` at a checkout of the repository (the
folder holding ``models/sam/modeling/image_encoder.py``; checked at commit f52ca5ab) and the tests run
it; without it they compare with its outputs recorded in ``reference_outputs/ba_sam.pt``
(``SAMFLOW_RECORD_REFERENCE=1`` with the checkout records them again; a tensor of over 4096 elements
as a ``Sketch``, compared by ``official_code.assert_close``). Only ``image_encoder.py`` and
its ``common.py`` are imported, as modules of a stand-in package (the repository's
``models/sam/__init__`` pulls in its whole training code).

The official encoder fixes its scale at construction from ``length_scale = img_size // 1024``:
global blocks get ``d^-1/2 * log_4096(length_scale^2 * 4096)``, which crashes below 1024 px. So the
official encoder is built at 1024 px (factor 1) or 4096 px (factor log_4096(16 * 4096) = 4/3) and its
tables are swapped for the tiny SAM's at 128 px (8 x 8 tokens) or 256 px (16 x 16): the tiny SAM
trains at 128 px, so samflow's ln(N)/ln(N_train) is ln(64)/ln(64) = 1 and ln(256)/ln(64) = 4/3, the
same two factors. ``bias: reference_code`` must then give the official scale, bias and image
embedding (the official build has ``use_abs_pos=False`` and a learnable ``coefficient`` per block);
``bias: none`` must equal the official encoder with the coefficients at 1 and SAM's absolute position
embedding kept; the default ``bias: distance`` must add exactly -beta_h * dist(i, j) to that.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from helpers import random_batch
from official_code import ReferenceOutputs, Sketch, assert_close, fingerprint, image_encoder, import_modules
from torch import nn

from samflow.plugins import PluginStack
from samflow.sam import HookedSam, decomposed_rel_pos_bias, resize_sam
from samflow.sam.build import VARIANTS
from samflow_plugins.ba_sam import BASam, alibi_slopes, scale_at

REF = ReferenceOutputs("ba_sam", "SAMFLOW_BA_SAM_SRC")
PACKAGE = "_official_ba_sam"
ATOL = 1e-10
COEFFICIENTS = (0.3, -0.7, 1.4, 0.55)  # one per block of the tiny SAM, far from the init 0.1
# official build size -> the tiny SAM's size with the same scale factor on the global blocks
SIZES = {1024: 128, 4096: 256}


@pytest.fixture
def official(monkeypatch):
    """The official ``image_encoder`` module, imported without the package around it, when the checkout
    is given (else None: the recorded outputs answer)."""
    if not REF.src:
        yield None
        return
    yield from import_modules(
        monkeypatch, PACKAGE, Path(REF.src) / "models" / "sam" / "modeling", ("common", "image_encoder")
    )


def adapted(tiny_sam, official_size: int, plugin: BASam, coefficients=COEFFICIENTS) -> HookedSam:
    """The tiny SAM with ``plugin`` at the size matching the official build size, in float64 (a
    ``reference_code`` plugin's coefficients set to ``coefficients``)."""
    size = SIZES[official_size]
    sam = (tiny_sam if size == 128 else resize_sam(tiny_sam, size)).double()
    model = HookedSam(sam, PluginStack({"ba": plugin}))
    plugin.double()
    if plugin.bias == "reference_code":
        with torch.no_grad():
            plugin.values("coefficients").copy_(torch.tensor(coefficients))
    return model


def official_state(model: HookedSam, coefficients, abs_pos: bool = False) -> dict[str, torch.Tensor]:
    """The official encoder's state dict: the model's SAM encoder weights and the coefficients."""
    state = dict(model.sam.image_encoder.state_dict())
    if not abs_pos:
        del state["pos_embed"]  # the official build: use_abs_pos=False
    for i, c in enumerate(coefficients):
        state[f"blocks.{i}.attn.coefficient"] = torch.tensor([c], dtype=torch.float64)
    return state


def official_encoder(official, state: dict[str, torch.Tensor], official_size: int, abs_pos: bool = False):
    """The official encoder built at ``official_size`` holding ``state`` in float64 (its tables swapped
    for those of ``state``, at the tiny SAM's grid, not the build size's)."""
    ref = image_encoder(
        official.ImageEncoderViT, VARIANTS["tiny"], args=None, img_size=official_size, use_abs_pos=abs_pos
    )
    for name, value in state.items():
        module_name, _, leaf = name.rpartition(".")
        owner = ref.get_submodule(module_name) if module_name else ref
        if getattr(owner, leaf).shape != value.shape:
            setattr(owner, leaf, nn.Parameter(torch.empty_like(value)))
    ref.load_state_dict(state, strict=True)  # every official tensor mapped, none left over
    return ref.double().eval()


def encoder_input(model: HookedSam):
    """A random batch's context and its normalised images (float64), as the encoder receives them."""
    batch = random_batch(2, size=model.img_size, prompt="none", seed=3, dtype=torch.float64)
    return model.context(batch), model.preprocess(batch.image, batch.input_size)


def largest_difference(ours: torch.Tensor, official: torch.Tensor | Sketch) -> float:
    """``max |ours - official|`` (with the checkout), or a lower bound of it: over a recorded ``Sketch``'s
    positions."""
    if isinstance(official, Sketch):
        return float((official.same_places(ours) - official.values).abs().max())
    return float((ours - official).abs().max())


def block_q(model: HookedSam, i: int, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Queries (B', heads, L, d) of block ``i`` on the token map x (B, h, w, C), in windows if windowed."""
    block = model.sam.image_encoder.blocks[i]
    x = block.norm1(x)
    if block.window_size > 0:
        w = block.window_size
        b, h, _, c = x.shape
        x = x.view(b, h // w, w, h // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, c)
    b, h, w, _ = x.shape
    qkv = block.attn.qkv(x).reshape(b, h * w, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return qkv[0], (h, w)


def rel_pos(model: HookedSam, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``i``'s relative-position tables (R_h, R_w) in samflow's SAM."""
    attn = model.sam.image_encoder.blocks[i].attn
    return attn.rel_pos_h, attn.rel_pos_w


def official_logit_terms(official, ref, i: int, q: torch.Tensor, hw: tuple[int, int], coefficient):
    """The official block ``i``'s scale and the bias it adds to q k^T (B', heads, L, L)."""
    attn = ref.blocks[i].attn
    b, heads, length, d = q.shape
    zeros = torch.zeros(b * heads, length, length, dtype=q.dtype)
    flat = q.reshape(b * heads, length, d)
    bias = official.add_decomposed_rel_pos(zeros, flat, attn.rel_pos_h, attn.rel_pos_w, hw, hw, coefficient)
    return attn.scale, bias.view(b, heads, length, length)


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
@pytest.mark.parametrize("official_size", [1024, 4096])
def test_reference_code_equals_the_official_encoder(official, tiny_sam, official_size):
    plugin = BASam(bias="reference_code")
    model = adapted(tiny_sam, official_size, plugin)
    ctx, x = encoder_input(model)
    state = official_state(model, COEFFICIENTS)
    factor = {1024: 1.0, 4096: 4 / 3}[official_size]
    with torch.no_grad():
        tokens = model.sam.image_encoder.patch_embed(x)  # (B, h, w, C), no position embedding (official)
        queries = [block_q(model, i, tokens) for i in range(4)]

    def official_outputs() -> dict:
        ref = official_encoder(official, state, official_size)
        with torch.no_grad():
            terms = [
                official_logit_terms(official, ref, i, q, hw, ref.blocks[i].attn.coefficient)
                for i, (q, hw) in enumerate(queries)
            ]
            return {"scales": [s for s, _ in terms], "biases": [b for _, b in terms], "embeddings": ref(x)}

    expected = REF.get(
        f"reference_code/{official_size}", fingerprint(state, official_size, x, queries), official_outputs
    )
    with torch.no_grad():
        for i, (q, hw) in enumerate(queries):
            ref_scale, ref_bias = expected["scales"][i], expected["biases"][i]
            sam_bias = decomposed_rel_pos_bias(q, *rel_pos(model, i), hw)
            scale, bias = plugin.attn_logits(i, 32**-0.5, sam_bias, q, ctx)
            assert scale == pytest.approx(ref_scale, rel=1e-15, abs=0)
            assert ref_scale == pytest.approx(32**-0.5 * (factor if i in (1, 3) else 1.0), rel=1e-15)
            assert_close(bias, ref_bias, rtol=0, atol=ATOL)
            assert bias.abs().max() > 0.1
        embeddings, _ = model.run_encoder(x, ctx)
        assert_close(embeddings, expected["embeddings"], rtol=0, atol=ATOL)
        # the scale, the coefficients and the dropped position embedding each matter (the scale only
        # where its factor is not 1)
        variants = [
            (BASam(bias="reference_code", scale=False), COEFFICIENTS, official_size == 4096),
            (BASam(bias="reference_code"), (0.1,) * 4, True),
            (BASam(bias="reference_code", drop_pos_embed=False), COEFFICIENTS, True),
        ]
        for other_plugin, coefficients, differs in variants:
            other = adapted(tiny_sam, official_size, other_plugin, coefficients)
            changed, _ = other.run_encoder(x, other.context(ctx.batch))
            if differs:
                assert largest_difference(changed, expected["embeddings"]) > 1e-3
            else:
                assert_close(changed, expected["embeddings"], rtol=0, atol=ATOL)


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
def test_bias_none_equals_the_official_encoder_with_sams_bias_and_position_embedding(official, tiny_sam):
    """The scale alone: the official encoder with every coefficient at 1 and use_abs_pos=True."""
    model = adapted(tiny_sam, 4096, BASam(bias="none"))
    ctx, x = encoder_input(model)
    state = official_state(model, (1.0,) * 4, abs_pos=True)

    def official_outputs() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"embeddings": official_encoder(official, state, 4096, abs_pos=True)(x)}

    expected = REF.get("bias_none", fingerprint(state, 4096, True, x), official_outputs)["embeddings"]
    with torch.no_grad():
        embeddings, _ = model.run_encoder(x, ctx)
        assert_close(embeddings, expected, rtol=0, atol=ATOL)
        plain = HookedSam(model.sam)
        sam_alone, _ = plain.run_encoder(x, plain.context(ctx.batch))
        assert largest_difference(sam_alone, expected) > 1e-3  # the 4/3 on the global blocks matters


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
@pytest.mark.parametrize("distance", ["euclidean", "manhattan"])
def test_default_distance_bias_is_the_official_rel_pos_term_minus_beta_dist(official, tiny_sam, distance):
    """bias: distance = SAM's rel-pos term (official coefficient 1) - beta_h * dist(i, j), the official scale."""
    plugin = BASam(distance=distance)
    model = adapted(tiny_sam, 4096, plugin)
    ctx, x = encoder_input(model)
    state = official_state(model, (1.0,) * 4, abs_pos=True)
    enc = model.sam.image_encoder
    with torch.no_grad():
        tokens = enc.patch_embed(x) + enc.pos_embed
        queries = [block_q(model, i, tokens) for i in range(4)]

    def official_outputs() -> dict:  # the same for both distances: one case
        ref = official_encoder(official, state, 4096, abs_pos=True)
        with torch.no_grad():
            terms = [
                official_logit_terms(official, ref, i, q, hw, torch.ones(1))
                for i, (q, hw) in enumerate(queries)
            ]
            return {"scales": [s for s, _ in terms], "biases": [b for _, b in terms]}

    expected = REF.get("rel_pos_terms/4096", fingerprint(state, 4096, True, queries, 1.0), official_outputs)
    with torch.no_grad():
        for i, (q, (h, w)) in enumerate(queries):
            ref_scale, ref_bias = expected["scales"][i], expected["biases"][i]
            sam_bias = decomposed_rel_pos_bias(q, *rel_pos(model, i), (h, w))
            scale, bias = plugin.attn_logits(i, 32**-0.5, sam_bias, q, ctx)
            assert scale == pytest.approx(ref_scale, rel=1e-15, abs=0)
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            d_row = rows.flatten()[:, None] - rows.flatten()[None, :]
            d_col = cols.flatten()[:, None] - cols.flatten()[None, :]
            if distance == "euclidean":
                dist = (d_row**2 + d_col**2).double().sqrt()
            else:
                dist = (d_row.abs() + d_col.abs()).double()
            slopes = torch.tensor([1 / 16, 1 / 256], dtype=torch.float64)  # ALiBi, 2 heads
            assert alibi_slopes(2) == slopes.tolist()
            # bias = ref_bias - slopes * dist, compared as bias + slopes * dist = ref_bias (a recorded
            # ref_bias is a Sketch); the distances are computed in the run's dtype (float64 here, not
            # float32 rounded)
            assert_close(bias + slopes[:, None, None] * dist, ref_bias, rtol=0, atol=ATOL)


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
@pytest.mark.parametrize("length_scale", [1, 2, 3, 4])
def test_scale_equals_the_official_attention_at_multiples_of_1024(official, length_scale):
    """ViT-B's head size d = 64: the official global scale at 1024 * l px is scale_at(1024 * l)."""
    img = 1024 * length_scale

    def official_scales() -> dict[str, float]:
        glob = official.Attention(128, num_heads=2, length_scale=length_scale, if_global=True)
        window = official.Attention(128, num_heads=2, length_scale=length_scale, if_global=False)
        return {"global": glob.scale, "window": window.scale}

    expected = REF.get(f"scale/length_{length_scale}", fingerprint(128, 2, length_scale), official_scales)
    assert scale_at(img, 1024, 64) == pytest.approx(expected["global"], rel=1e-15, abs=0)
    assert expected["window"] == 0.125  # windows: SAM's scale at every size, in both
    assert expected["global"] == pytest.approx(0.125 * math.log((img // 16) ** 2) / math.log(4096), rel=1e-15)


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
def test_scale_differs_from_the_official_off_multiples_of_1024_as_documented(official):
    """The official N comes from img_size // 1024: no effect at 1536 px, a crash below 1024 px."""

    def official_outputs() -> dict[str, float | str]:
        at_1536 = official.Attention(128, num_heads=2, length_scale=1536 // 1024, if_global=True)
        try:
            official.Attention(128, num_heads=2, length_scale=512 // 1024, if_global=True)
        except ValueError as error:
            raised = str(error)
        else:
            raised = ""
        return {"scale_1536": at_1536.scale, "error_512": raised}

    expected = REF.get(
        "scale/off_multiples", fingerprint(128, 2, 1536 // 1024, 512 // 1024), official_outputs
    )
    assert expected["scale_1536"] == 0.125
    assert scale_at(1536, 1024, 64) == pytest.approx(0.125 * math.log(96**2) / math.log(64**2), rel=1e-15)
    assert re.search("math domain error", expected["error_512"])  # a ValueError at 512 px
    assert scale_at(512, 1024, 64) == pytest.approx(0.125 * 10 / 12, rel=1e-15)


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
def test_coefficient_init_equals_the_official(official, tiny_sam):
    def official_coefficient() -> dict:
        attn = official.Attention(64, num_heads=2, use_rel_pos=True, input_size=(4, 4))
        return {"coefficient": attn.coefficient, "requires_grad": attn.coefficient.requires_grad}

    expected = REF.get("coefficient_init", fingerprint(64, 2, True, (4, 4)), official_coefficient)
    plugin = BASam(bias="reference_code")
    HookedSam(tiny_sam, PluginStack({"ba": plugin}))
    assert expected["coefficient"].shape == (1,) and expected["requires_grad"]
    assert plugin.values("coefficients").tolist() == [expected["coefficient"].item()] * 4
    assert plugin.values("coefficients").requires_grad
