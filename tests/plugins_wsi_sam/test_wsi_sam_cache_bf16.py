"""WSI-SAM with the encoder cache and bf16, as the other plugins: HR and LR views are cached as
separate images (keyed by content), and bf16 autocast runs both views."""

from __future__ import annotations

import torch
from helpers import random_batch

from samflow.plugins.stack import PluginStack
from samflow.sam import HookedSam
from samflow.sam.cache import EncoderCache
from samflow_plugins.wsi_sam import WSISam


def dual_batch(batch_size: int = 2):
    hr = random_batch(batch_size, seed=0)
    lr = random_batch(batch_size, seed=1)
    return hr.replace(context_image=lr.image, context_mask=lr.mask)


def test_encoder_cache_holds_both_views_and_equals_no_cache(tiny_sam):
    torch.manual_seed(0)
    plain = HookedSam(tiny_sam, PluginStack({"wsi": WSISam()})).eval()
    cached = HookedSam(tiny_sam, PluginStack({"wsi": WSISam()}), encoder_cache=EncoderCache(8)).eval()
    cached.plugins.load_state_dict(plain.plugins.state_dict())
    batch = dual_batch(2)
    with torch.no_grad():
        expected = plain(batch)
        first = cached(batch)
        calls = []
        cached.run_encoder = lambda x, ctx: calls.append(x.shape[0]) or HookedSam.run_encoder(cached, x, ctx)
        again = cached(batch)
        # a new LR view with the same HR view: only the LR images are encoded
        other = cached(batch.replace(context_image=batch.context_image.flip(-1)))
    assert calls == [2]  # the second pass hit all 4 images; the third encoded its 2 new LR views
    assert cached.encoder_cache.counts["eval"] == [4 + 2, 4 + 2]
    torch.testing.assert_close(first.pred, expected.pred, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        first.context.masks["wsi/wsi"], expected.context.masks["wsi/wsi"], rtol=0, atol=1e-6
    )
    torch.testing.assert_close(again.pred, first.pred, rtol=0, atol=0)
    assert (other.pred - first.pred).abs().max() > 1e-4  # the HR prediction reads the LR kernel


def test_bf16_autocast_runs_both_views_close_to_fp32(tiny_sam):
    torch.manual_seed(0)
    model = HookedSam(tiny_sam, PluginStack({"wsi": WSISam()})).eval()
    batch = dual_batch(2)
    with torch.no_grad():
        full = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(batch)
    assert half.pred.shape == full.pred.shape == (2, 1, 32, 32)
    assert half.context.masks["wsi/wsi"].shape == (2, 1, 32, 32)
    assert torch.isfinite(half.pred).all() and torch.isfinite(half.context.masks["wsi/wsi"]).all()
    scale = full.pred.abs().max()
    assert (half.pred.float() - full.pred).abs().max() < 0.1 * scale  # bf16 keeps ~3 significant digits
    assert ((half.pred > 0) == (full.pred > 0)).float().mean() > 0.95
