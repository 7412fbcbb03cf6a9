"""Zero-shot BA-SAM at other resolutions: ``resize_sam`` (the core helper it relies on) and the tiny SAM,
fully frozen, at 64, 128 (its training size) and 256 px."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch, randomize

from samflow.module import SamflowModule, SamSpec
from samflow.plugins import PluginStack
from samflow.sam import HookedSam, build_sam, resize_sam
from samflow_plugins.ba_sam import BASam

SIZES = [64, 128, 256]


# ---- resize_sam (samflow.sam.build) ----
def test_resize_sam_interpolates_as_a_checkpoint_load_does(tiny_sam, tmp_path):
    torch.save(tiny_sam.state_dict(), tmp_path / "tiny.pth")
    loaded = build_sam("tiny", checkpoint=tmp_path / "tiny.pth", img_size=256)
    resized = resize_sam(tiny_sam, 256)
    a, b = resized.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    enc = resized.image_encoder
    assert enc.img_size == 256 and enc.pos_embed.shape == (1, 16, 16, 64)
    assert enc.blocks[1].attn.rel_pos_h.shape == (31, 32)  # global: 2 * 16 - 1
    assert enc.blocks[0].attn.rel_pos_h.shape == (7, 32)  # windowed: 2 * 4 - 1, unchanged
    pe = resized.prompt_encoder
    assert pe.image_embedding_size == (16, 16) and pe.input_image_size == (256, 256)
    assert pe.mask_input_size == (64, 64)
    assert not any(p.requires_grad for p in resized.parameters()) and not resized.training
    assert tiny_sam.image_encoder.img_size == 128  # the source is left alone
    assert tiny_sam.image_encoder.pos_embed.shape == (1, 8, 8, 64)


def test_resize_sam_of_a_random_sam_is_the_random_sam_built_at_that_size():
    # segment-anything initialises the position tables to zero; the other weights use the same seed
    a = resize_sam(build_sam("tiny", seed=5), 256).state_dict()
    b = build_sam("tiny", img_size=256, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resize_sam_to_its_own_size_is_the_same_model(tiny_sam):
    batch = random_batch(2)
    with torch.no_grad():
        assert torch.equal(HookedSam(resize_sam(tiny_sam, 128))(batch).pred, HookedSam(tiny_sam)(batch).pred)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        resize_sam(tiny_sam, 100)


# ---- zero-shot at three sizes ----
@pytest.fixture(scope="module")
def frozen_sams():
    sam = randomize(build_sam("tiny", seed=0))
    return {size: resize_sam(sam, size) for size in SIZES}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bias", ["distance", "reference_code", "none"])
def test_zero_shot_shapes_and_finite_outputs(frozen_sams, size, bias):
    model = HookedSam(frozen_sams[size], PluginStack({"ba": BASam(bias=bias, learnable=False)})).eval()
    assert not any(p.requires_grad for p in model.parameters())
    for prompt in ("box", "points", "none"):
        with torch.no_grad():
            out = model(random_batch(3, size=size, prompt=prompt))
        assert out.pred.shape == (3, 1, size // 4, size // 4)
        assert out.masks["sam"].shape == (3, 4, size // 4, size // 4)
        assert torch.isfinite(out.pred).all() and torch.isfinite(out.iou_pred).all()


@pytest.mark.parametrize("size", SIZES)
def test_zero_shot_equals_sam_exactly_at_the_training_size_only(frozen_sams, size):
    sam = frozen_sams[size]
    batch = random_batch(2, size=size)
    with torch.no_grad():
        plain = HookedSam(sam)(batch).pred
        scaled = HookedSam(sam, PluginStack({"ba": BASam(bias="none", learnable=False)}))(batch).pred
        zero = HookedSam(sam, PluginStack({"ba": BASam(slopes="zero", learnable=False)}))(batch).pred
        alibi = HookedSam(sam, PluginStack({"ba": BASam(learnable=False)}))(batch).pred
    if size == 128:
        assert torch.equal(scaled, plain) and torch.equal(zero, plain)
    else:  # the scale ln(N)/ln(64) changes the global blocks
        assert not torch.equal(scaled, plain)
        assert torch.equal(zero, scaled)
    assert not torch.equal(alibi, plain)  # the penalty acts at every size


def test_zero_shot_through_the_module_at_another_size():
    m = SamflowModule(
        sam=SamSpec(variant="tiny", img_size=256),
        plugins={"ba": BASam(learnable=False)},
        losses={"bce": 1.0},
    ).eval()
    assert sum(m.trainable_parameters().values()) == 0
    with torch.no_grad():
        out, _ = m(random_batch(2, size=256))
    assert out.pred.shape == (2, 1, 64, 64) and torch.isfinite(out.pred).all()
