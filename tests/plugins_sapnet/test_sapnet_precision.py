"""SAPNet under bf16 autocast: box geometry, selection scores and MIL losses stay in float32."""

from __future__ import annotations

import torch
from helpers import random_batch, randomize

from samflow.plugins import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow_plugins.sapnet import SAPNet
from samflow_plugins.sapnet.net import SelectionNet


def _bag(seed: int = 0) -> torch.Tensor:
    """Two points with 6 proposals each in a 1024 px frame, at sub-pixel positions bf16 cannot hold
    (bf16 keeps 8 significant bits: between 512 and 1024 it rounds to multiples of 4 px)."""
    gen = torch.Generator().manual_seed(seed)
    x1y1 = 300 + 400 * torch.rand(2, 6, 2, generator=gen)
    wh = 40 + 60 * torch.rand(2, 6, 2, generator=gen)
    return torch.cat([x1y1, x1y1 + wh], -1)


def test_bf16_autocast_keeps_boxes_scores_and_losses_in_float32():
    torch.manual_seed(0)
    net = SelectionNet(in_channels=8, num_classes=3, hidden=16, num_negatives=16)
    features = torch.randn(1, 8, 64, 64).bfloat16()  # SAM's embedding under bf16 autocast
    proposals = _bag()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = net(features, 1024, proposals, torch.tensor([0, 2]), proposals[:, 0, :2], torch.tensor([0, 0]))
    # the stage-1 bag starts with the proposals themselves, unrounded
    assert res.bag1.dtype == torch.float32
    torch.testing.assert_close(res.bag1[:, :6], proposals, rtol=0, atol=0)
    # PNPG's 15 boxes grow the parent by 1 % steps (0.2-0.5 px a side here): all distinct
    for row in res.bag1:
        assert torch.unique(row[6:21], dim=0).shape[0] == 15
    assert res.pseudo_box.dtype == torch.float32
    assert res.score0.dtype == res.score1.dtype == torch.float32
    assert all(loss.dtype == torch.float32 for loss in res.losses.values()), res.losses


def test_bf16_autocast_online_bag_keeps_the_annotated_points(monkeypatch):
    """Without stored proposals the bag is SAM's own multimask boxes, from bf16 logits under autocast;
    the points given to PDG must still be the annotated ones, not rounded to bf16 with those boxes."""
    seen = {}
    forward = SelectionNet.forward

    def spy(self, features, image_size, proposals, labels, points, *args, **kwargs):
        seen.update(proposals=proposals, points=points)
        return forward(self, features, image_size, proposals, labels, points, *args, **kwargs)

    monkeypatch.setattr(SelectionNet, "forward", spy)
    torch.manual_seed(0)
    model = HookedSam(
        randomize(build_sam("tiny", seed=0)), PluginStack({"sap": SAPNet(num_classes=3, hidden=16)})
    )
    batch = random_batch(2, prompt="points")
    batch.points = torch.tensor([[[100.3, 70.7]], [[90.9, 101.1]]])  # not representable in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ctx = model.run(batch)
        model.plugins.losses(out, batch, ctx)
    assert seen["proposals"].dtype == seen["points"].dtype == torch.float32
    torch.testing.assert_close(seen["points"], batch.points[:, 0], rtol=0, atol=0)
