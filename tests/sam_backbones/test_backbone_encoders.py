"""MobileSAM's TinyViT and EfficientSAM's ViTs as SAM image encoders: counts, hook sites, BatchNorm,
checkpoints. Random weights at 128 px (the architectures at full width; the grid is 8 x 8)."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import random_batch
from torch import Tensor

from samflow.module import SamflowModule, SamSpec
from samflow.plugins import SamPlugin
from samflow.sam import (
    BACKBONES,
    CheckpointError,
    HookedSam,
    build_sam,
    count_parameters,
    early_feature,
    resize_sam,
)
from samflow.sam.types import HookSites

SIZE = 128
VARIANTS = sorted(BACKBONES)


@pytest.fixture(scope="module")
def sams():
    return {v: build_sam(v, img_size=SIZE) for v in VARIANTS}


def test_parameter_counts_are_the_official_ones(sams):
    # counted from the official code (ChaoningZhang/MobileSAM build_sam_vit_t without TinyViT's unused
    # ImageNet classifier, 321,640 more; yformer/EfficientSAM build_efficient_sam); the decoder side is SAM's
    expected = {"mobile_sam": 5_743_892, "efficient_sam_vitt": 6_163_840, "efficient_sam_vits": 22_353_664}
    for variant, sam in sams.items():
        assert count_parameters(sam.image_encoder) == expected[variant], variant
        assert count_parameters(sam.prompt_encoder) == 6_220
        assert count_parameters(sam.mask_decoder) == 4_058_340


def test_tiny_vit_bias_offsets_follow_the_published_numbering(sams):
    """Offsets (|dy|, |dx|) are numbered in order of first appearance over (p1, p2) pairs (TinyViT)."""
    for block in sams["mobile_sam"].image_encoder.blocks[2:]:
        ws = block.window_size
        points = list(itertools.product(range(ws), range(ws)))
        seen: dict[tuple[int, int], int] = {}
        idxs = [
            seen.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(seen)) for a in points for b in points
        ]
        assert block.attn.attention_bias_idxs.tolist() == torch.tensor(idxs).view(ws * ws, -1).tolist()
        assert block.attn.attention_biases.shape[1] == len(seen)


class Recorder(HookSites):
    """Records the encoder sites; ``logit_scale`` multiplies every attention's scale."""

    def __init__(self, logit_scale: float = 1.0, features: tuple[int, ...] = ()) -> None:
        self.calls: list[tuple[str, int, tuple[int, ...]]] = []
        self.logit_scale = logit_scale
        self.features = features

    def uses(self, hook: str) -> bool:
        return True

    def encoder_features(self) -> tuple[int, ...]:
        return self.features

    def block_input(self, i, x, ctx):
        self.calls.append(("in", i, tuple(x.shape)))
        return x

    def block_output(self, i, x, ctx):
        self.calls.append(("out", i, tuple(x.shape)))
        return x

    def attn_logits(self, i, scale, bias, q, ctx):
        self.calls.append(("attn", i, tuple(bias.shape) if bias is not None else ()))
        return scale * self.logit_scale, bias


@pytest.mark.parametrize("variant", VARIANTS)
def test_hook_sites_per_block(sams, variant):
    sam = sams[variant]
    enc = sam.image_encoder
    early, channels = early_feature(enc)
    rec = Recorder(features=(early,))
    model = HookedSam(sam, rec)
    batch = random_batch(2, size=SIZE)
    with torch.no_grad():
        encoded = model.encode(model.context(batch))
        plain = enc(encoded.normalized)
    torch.testing.assert_close(encoded.embeddings, plain, rtol=0, atol=0)  # identity hooks change nothing
    depth = len(enc.blocks)
    blocks = [c for c in rec.calls if c[0] != "attn"]
    assert [(k, i) for k, i, _ in blocks] == [(k, i) for i in range(depth) for k in ("in", "out")]
    for i in range(depth - 1):  # a block's output is the next block's input, channels-last
        assert blocks[2 * i + 1][2] == blocks[2 * i + 2][2]
    for i in range(depth):
        assert blocks[2 * i + 1][2][-1] == enc.block_channels(i)
    grid = SIZE // 16
    assert encoded.features[early].shape == (2, grid, grid, channels)
    attn = [i for k, i, _ in rec.calls if k == "attn"]
    if (
        variant == "mobile_sam"
    ):  # stage 0 is convolutional; windows of 7/14/7 tokens with a (1, heads, L, L) bias
        assert (early, channels) == (3, 160)
        assert sorted(set(attn)) == list(range(2, 12))
        heads = {2: 4, 4: 5, 10: 10}
        for k, i, shape in rec.calls:
            if k == "attn" and i in heads:
                assert shape[:2] == (1, heads[i]) and shape[2] == shape[3] == enc.blocks[i].window_size ** 2
    else:  # global attention in every block, no bias
        assert (early, channels) == (2, enc.embed_dim)
        assert attn == list(range(12)) and all(s == () for k, _, s in rec.calls if k == "attn")
    with torch.no_grad():  # the site is live: flattening the logits changes the embedding
        changed = HookedSam(sam, Recorder(logit_scale=0.0)).encode(model.context(batch)).embeddings
    assert not torch.allclose(changed, plain, atol=1e-4)


def test_sam_vit_early_feature_is_the_first_global_block(tiny_sam):
    assert early_feature(tiny_sam.image_encoder) == (1, 64)


class TrainsPatchEmbed(SamPlugin):
    """Unfreezes a SAM part with BatchNorm (TinyViT's patch embedding)."""

    def sam_modules_to_train(self) -> list[str]:
        return ["image_encoder.patch_embed"]


def test_batchnorm_keeps_frozen_statistics_in_training():
    module = SamflowModule(
        sam=SamSpec(variant="mobile_sam", img_size=SIZE), plugins={"p": TrainsPatchEmbed()}
    )
    sam = module.model.sam
    norms = [m for m in sam.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 2 + 2 * 3 + 10 + 3 * 3  # patch embed, MBConv, local convs, merges
    before = {k: v.clone() for k, v in sam.state_dict().items() if "running" in k or "num_batches" in k}
    batch = random_batch(2, size=SIZE)
    module.eval()
    with torch.no_grad():
        expected = module(batch)[0].pred
    module.train()
    assert not any(m.training for m in norms)
    out, ctx = module(batch)
    torch.testing.assert_close(out.pred, expected, rtol=0, atol=0)  # running statistics, not the batch's
    module.compute_losses(out, batch, ctx)["total"].backward()
    after = sam.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    bn = sam.image_encoder.patch_embed.seq[0].bn
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0  # the affine part trains


def _state_file(tmp_path, state, name="ckpt.pt"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_mobile_sam_checkpoint_strict_keys(tmp_path):
    source = build_sam("mobile_sam", img_size=SIZE, seed=3)
    state = dict(source.state_dict())
    # the official file also holds TinyViT's ImageNet classifier, which MobileSAM never runs
    state |= {
        "image_encoder.norm_head.weight": torch.ones(320),
        "image_encoder.head.weight": torch.zeros(1000, 320),
    }
    loaded = build_sam("mobile_sam", checkpoint=_state_file(tmp_path, state), img_size=SIZE, seed=0)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    broken = {k: v for k, v in state.items() if k != "image_encoder.layers.2.blocks.0.attn.attention_biases"}
    broken["image_encoder.layers.9.extra"] = torch.zeros(1)
    path = _state_file(tmp_path, broken, "broken.pt")
    with pytest.raises(CheckpointError) as err:
        build_sam("mobile_sam", checkpoint=path, img_size=SIZE)
    text = str(err.value)
    assert (
        str(path) in text and "layers.2.blocks.0.attn.attention_biases" in text and "layers.9.extra" in text
    )

    with pytest.raises(CheckpointError, match="looks like mobile_sam"):
        build_sam("efficient_sam_vitt", checkpoint=path, img_size=SIZE)


def test_efficient_sam_checkpoint_loads_the_encoder_and_names_the_decoder(tmp_path):
    source = build_sam("efficient_sam_vitt", img_size=SIZE, seed=3)
    fresh = build_sam("efficient_sam_vitt", img_size=SIZE, seed=0)
    encoder = {f"image_encoder.{k}": v for k, v in source.image_encoder.state_dict().items()}
    # EfficientSAM's own decoder (names and tensors SAM's modules do not take)
    decoder = {
        "prompt_encoder.invalid_points.weight": torch.zeros(1, 256),
        "mask_decoder.iou_token.weight": torch.zeros(1, 256),
    }
    path = _state_file(tmp_path, {"model": encoder | decoder})
    with pytest.warns(
        UserWarning, match=r"its 2 prompt_encoder/mask_decoder tensors .* only the image encoder is loaded"
    ):
        loaded = build_sam("efficient_sam_vitt", checkpoint=path, img_size=SIZE, seed=0)
    for k, v in loaded.state_dict().items():
        reference = source if k.startswith("image_encoder.") else fresh
        assert torch.equal(v, reference.state_dict()[k]), k

    del encoder["image_encoder.blocks.11.mlp.fc2.bias"]
    path = _state_file(tmp_path, {"model": encoder}, "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): image_encoder.blocks.11.mlp.fc2.bias"):
        build_sam("efficient_sam_vitt", checkpoint=path, img_size=SIZE)
    with pytest.raises(CheckpointError, match="looks like efficient_sam_vitt"):
        build_sam("efficient_sam_vits", checkpoint=path, img_size=SIZE)


def test_unknown_variant_lists_the_backbones_and_resize_is_refused(sams):
    with pytest.raises(ValueError, match="efficient_sam_vitt.*mobile_sam"):
        build_sam("mobile_sam_v2")
    with pytest.raises(TypeError, match="build_sam\\(variant, img_size=256\\)"):
        resize_sam(sams["mobile_sam"], 256)


def test_embedding_grid_follows_img_size():
    for variant, size in (("mobile_sam", 64), ("efficient_sam_vitt", 96)):
        sam = build_sam(variant, img_size=size)
        with torch.no_grad():
            out: Tensor = sam.image_encoder(torch.zeros(1, 3, size, size))
        assert out.shape == (1, 256, size // 16, size // 16)
        assert sam.prompt_encoder.image_embedding_size == (size // 16, size // 16)
