"""SamflowModule: trainable sets, optimizer groups, losses, original-size outputs, slim checkpoints."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from samflow.module import ModelConfigError, SamflowModule, SamSpec
from samflow.sam import CheckpointError
from samflow_plugins.decoder_tuning import DecoderTuning
from samflow_plugins.tokens import ExtraTokens


def make(**plugins) -> SamflowModule:
    return SamflowModule(sam=SamSpec(variant="tiny"), plugins=plugins)


def test_trainable_counts_per_plugin():
    module = make(decoder=DecoderTuning(), tokens=ExtraTokens(num_tokens=2))
    decoder = sum(p.numel() for p in module.model.sam.mask_decoder.parameters())
    dim = 64  # tiny decoder width
    head = (dim * dim + dim) * 2 + dim * (dim // 8) + dim // 8  # MLP dim -> dim -> dim -> dim/8
    assert module.trainable_parameters() == {"decoder": decoder, "tokens": 2 * dim + 2 * head}
    encoder = module.model.sam.image_encoder
    assert not any(p.requires_grad for p in encoder.parameters())


def test_plugin_learning_rates_become_optimizer_groups():
    module = make(decoder=DecoderTuning(lr=1e-4, weight_decay=0.0), tokens=ExtraTokens())
    optimizer = module.configure_optimizers()
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["decoder"]["lr"] == 1e-4 and groups["decoder"]["weight_decay"] == 0.0
    assert groups["tokens"]["lr"] == optimizer.defaults["lr"]
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # no parameter in two groups


def test_nothing_to_train_is_a_clear_error():
    with pytest.raises(ValueError, match="nothing to train.*DecoderTuning"):
        make().configure_optimizers()


def test_losses_add_plugin_terms_and_need_some_term():
    module = make(tokens=ExtraTokens())
    batch = random_batch(2)
    out, ctx = module(batch)
    terms = module.compute_losses(out, batch, ctx)
    assert set(terms) == {"bce", "dice", "total"}
    torch.testing.assert_close(terms["total"], terms["bce"] + terms["dice"])
    empty = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"t": ExtraTokens()}, losses={})
    with pytest.raises(ModelConfigError, match="model.losses: no loss terms .*plugins: t"):
        empty.compute_losses(out, batch, ctx)


def test_probabilities_are_at_the_original_size():
    module = make(tokens=ExtraTokens()).eval()
    batch = random_batch(2)
    batch.input_size = torch.tensor([[128, 96], [64, 128]])
    batch.original_size = torch.tensor([[300, 225], [50, 100]])
    with torch.no_grad():
        out, _ = module(batch)
        maps = module.probabilities(out, batch)
    assert [tuple(m.shape) for m in maps] == [(300, 225), (50, 100)]
    assert all(0 <= m.min() and m.max() <= 1 for m in maps)


def test_checkpoint_keeps_plugins_and_trained_parts_only():
    module = make(decoder=DecoderTuning(parts=["mask_decoder.output_upscaling"]), tokens=ExtraTokens())
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = set(checkpoint["state_dict"])
    assert keys == {k for k in module.state_dict() if not k.startswith("model.sam.")} | {
        k for k in module.state_dict() if k.startswith("model.sam.mask_decoder.output_upscaling.")
    }
    clone = make(decoder=DecoderTuning(parts=["mask_decoder.output_upscaling"]), tokens=ExtraTokens())
    clone.load_state_dict(checkpoint["state_dict"])
    broken = dict(checkpoint["state_dict"])
    broken.pop(next(k for k in broken if k.startswith("model.plugins.tokens.")))
    with pytest.raises(CheckpointError, match="lacks weights of this experiment: 1 \\(model.plugins.tokens."):
        clone.load_state_dict(broken)


def test_validation_metrics_on_a_known_case():
    """The prediction is the ground truth as +-50 logits at 1/4 resolution.

    Bilinear upsampling keeps every pixel of the 32 x 64 rectangle except its 4 corners, whose
    interpolated logit is 50 * (0.390625 - 0.609375) < 0, so IoU = 2044 / 2048 and
    Dice = 2 * 2044 / (2044 + 2048), worked out by hand.
    """

    class Oracle(ExtraTokens):
        def select(self, out, ctx):
            target = ctx.batch.row_mask
            small = torch.nn.functional.interpolate(target, size=out.masks["sam"].shape[-2:], mode="nearest")
            return (small * 2 - 1) * 50

    module = SamflowModule(
        sam=SamSpec(variant="tiny"), plugins={"o": Oracle()}, metrics=["iou", "dice", "mae"]
    )
    batch = random_batch(2)
    # masks aligned to the 4x4 cells of the low-resolution output so upsampling reproduces them
    batch.mask = torch.zeros(2, 1, 128, 128)
    batch.mask[:, :, 32:64, 16:80] = 1
    batch.gt_original = [m[0].bool() for m in batch.mask]
    module._evaluate("val", batch, 0)
    values = {k: float(v) for k, v in module._metric_set("val", 0).compute().items()}
    assert values["iou"] == pytest.approx(2044 / 2048, abs=1e-9)
    assert values["dice"] == pytest.approx(2 * 2044 / (2044 + 2048), abs=1e-9)
    assert values["mae"] < 0.01
