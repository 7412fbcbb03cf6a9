"""SAPNet's random negatives and its stage boxes lie on each image, not on the padding around it.

The reference draws an image's 500 random negatives over its ``img_shape`` (mmdetection: the image
after resizing, before padding): x1 ~ U(-0.2w, w), x2 = x1 + U(0, 1) · (1.2w - x1), likewise y with h.
samflow's images are padded to the square input (``SamBatch.input_size`` holds each one's (h, w)); the
plugin drew every image's negatives over the whole S x S input, so a 96 x 128 image got negatives
down to y2 = 153.6 px, a third of them mostly on the padding (trivial negatives). Checked against
the rule worked out from the plugin's own U(0, 1) draws, on the mixed batch of two differently padded
images (``row_cases``).
"""

from __future__ import annotations

import torch
from row_cases import build, make_module

import samflow_plugins.sapnet.net as sapnet_net


def test_each_images_negatives_are_drawn_over_its_own_size(monkeypatch):
    module = make_module("sapnet").train()
    batch = build(range(7), seeds=True)
    assert batch.input_size.tolist() == [[96, 128], [128, 112]]
    seen = {}
    original = sapnet_net.random_negatives

    def spy(proposals, image_index, sizes, num, **kwargs):
        seen["out"] = original(proposals, image_index, sizes, num, **kwargs)
        return seen["out"]

    monkeypatch.setattr(sapnet_net, "random_negatives", spy)
    out, ctx = module.model.run(batch, module.model.context(batch, epoch=1))
    module.compute_losses(out, batch, ctx)
    boxes, image, _ = seen["out"]
    plugin = module.model.plugins["sapnet"]
    u = plugin.negative_draws(ctx, torch.device("cpu")).double()  # (4, B, num)
    num = plugin.net.num_negatives
    for j, (h, w) in enumerate(batch.input_size.tolist()):
        x1 = -0.2 * w + u[0, j] * 1.2 * w
        y1 = -0.2 * h + u[1, j] * 1.2 * h
        expected = torch.stack([x1, y1, x1 + u[2, j] * (1.2 * w - x1), y1 + u[3, j] * (1.2 * h - y1)], -1)
        assert torch.equal(image[j * num : (j + 1) * num], torch.full((num,), j))
        torch.testing.assert_close(boxes[j * num : (j + 1) * num], expected, rtol=0, atol=1e-9)
        assert float(boxes[j * num : (j + 1) * num, 3].max()) <= 1.2 * h


def test_the_stage_boxes_bms_starts_from_lie_on_their_image(monkeypatch):
    """Stage 0's and stage 1's top box is clamped to its image (the reference: to ``img_shape``), not
    to the padded S x S input. Proposals reaching into the padding make the difference visible."""
    module = make_module("sapnet").train()
    batch = build(range(7), seeds=True)
    starts = []
    original = sapnet_net.bms

    def spy(pseudo, proposals, num):
        starts.append(pseudo.clone())
        return original(pseudo, proposals, num)

    monkeypatch.setattr(sapnet_net, "bms", spy)
    frame = batch.image.shape[-1]
    grown = batch.proposals.clone()
    grown[..., 2:] = frame  # every proposal reaches the frame's far corner, deep into the padding
    batch = batch.replace(proposals=grown)
    out, ctx = module.model.run(batch, module.model.context(batch, epoch=1))
    module.compute_losses(out, batch, ctx)
    assert len(starts) == 2
    sizes = batch.input_size[batch.image_index].double()  # (N, 2): each row's image (h, w)
    for boxes in starts:
        assert (boxes[:, 2] <= sizes[:, 1]).all() and (boxes[:, 3] <= sizes[:, 0]).all()
        assert (boxes[:, 3] == sizes[:, 0]).any()  # clamped at an image's own height, short of the frame
