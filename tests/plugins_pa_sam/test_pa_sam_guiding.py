"""Guiding branch input: edges with kornia on the device, the reference's uint8 wrap-around, shapes."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_batch
from pa_sam_helpers import hooked

from samflow.sam import DecoderContext, normalize
from samflow_plugins.pa_sam import PASam
from samflow_plugins.pa_sam.guiding import canny_edges, guiding_input, sobel_edges, wrap_to_uint8

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)


def test_uint8_cast_wraps_like_c():
    values = torch.tensor([-2.2, -1.5, -1.0, -0.99, -0.3, 0.0, 0.7, 1.9, 2.6, 255.5, 300.0])
    assert wrap_to_uint8(values).tolist() == [254, 255, 255, 0, 0, 0, 0, 1, 2, 255, 44]
    grid = torch.linspace(-3, 3, 601)
    assert wrap_to_uint8(grid).tolist() == [math.trunc(v) % 256 for v in grid.tolist()]


def _step_image(left: float, right: float, channel: int | None = None) -> torch.Tensor:
    """(1, 3, 16, 16) in [0, 1]: a vertical step between columns 7 and 8 (in one channel, or all)."""
    image = torch.full((1, 3, 16, 16), left)
    if channel is None:
        image[..., 8:] = right
    else:
        image[:, channel, :, 8:] = right
    return image


def test_canny_finds_a_step_in_any_single_channel():
    for channel in range(3):
        edges = canny_edges(_step_image(0.2, 0.8, channel) * 255)
        assert edges.shape == (1, 1, 16, 16)
        columns = edges[0, 0].sum(0)
        assert columns[7] == 16 and columns.sum() == 16  # one full column (the left side of the step)
    assert canny_edges(torch.full((1, 3, 16, 16), 128.0)).sum() == 0


def test_sobel_magnitude_of_a_step():
    image = _step_image(0.0, 1.0)
    edges = sobel_edges(image)
    assert edges.shape == (1, 1, 16, 16)
    assert edges[0, 0, 4, 0] < 1e-2 and edges[0, 0, 4, 7] > 0.4 and edges[0, 0, 4, 8] > 0.4
    assert sobel_edges(torch.full((1, 3, 16, 16), 0.5)).max() < 1e-2


def test_reference_edges_follow_the_wrap_not_the_image():
    """A strong step from 100 to 250 stays in [0, 2] after the cast: the reference sees no edge there,
    but it sees one where a channel crosses mean - std (a step from 40 to 80 in every channel)."""
    for (left, right), seen_by_reference in [((100, 250), False), ((40, 80), True)]:
        image = _step_image(left / 255, right / 255)
        normalized = (image * 255 - MEAN) / STD
        ref = guiding_input(image, normalized, (16, 16), reference_edges=True)
        clean = guiding_input(image, normalized, (16, 16), edge_filter="canny")
        assert torch.equal(ref[:, :3], normalized) and torch.equal(clean[:, :3], normalized)
        assert clean[:, 3].sum() == 16
        assert (ref[:, 3].sum() > 0) == seen_by_reference


def test_guiding_input_is_resized_to_four_times_the_grid(tiny_sam):
    batch = random_batch(2, prompt="box")
    model = hooked(tiny_sam, {"pa": PASam()})
    ctx = model.context(batch)
    ctx = DecoderContext.after_encoder(ctx, model.encode(ctx))
    x = guiding_input(ctx.image, ctx.encoded.normalized, (32, 32))
    assert x.shape == (2, 4, 32, 32)
    assert model.plugins["pa"].guide(ctx).shape == (2, 64, 64)  # (N, h*w, C)


def test_guide_reads_the_encoders_normalisation(tiny_sam):
    """The guiding branch's image channels are SAM's normalised input, zero outside each input_size:
    the encoder's (``ctx.encoded.normalized``), equal to ``samflow.sam.normalize`` and to the formula;
    the edge channel is of the image zeroed there too."""
    batch = random_batch(2, prompt="box").replace(input_size=torch.tensor([[128, 96], [100, 128]]))
    model = hooked(tiny_sam, {"pa": PASam()})
    ctx = model.context(batch)
    with torch.no_grad():
        ctx = DecoderContext.after_encoder(ctx, model.encode(ctx))
    by_hand = (batch.image * 255 - MEAN) / STD
    by_hand[0, :, :, 96:] = 0  # image 0 is 128 x 96, image 1 is 100 x 128
    by_hand[1, :, 100:, :] = 0
    torch.testing.assert_close(ctx.encoded.normalized, by_hand)
    torch.testing.assert_close(normalize(tiny_sam, batch.image, batch.input_size), by_hand)
    plugin = model.plugins["pa"]
    image = batch.image.clone()  # the edges' image is zero outside input_size too
    image[0, :, :, 96:] = 0
    image[1, :, 100:, :] = 0
    with torch.no_grad():
        x = guiding_input(image, by_hand, (32, 32), plugin.edge_filter, plugin.reference_edges)
        expected = plugin.guiding(x)[batch.image_index].flatten(2).transpose(1, 2)
        torch.testing.assert_close(plugin.guide(ctx), expected)


@pytest.mark.parametrize("kwargs", [{"edge_filter": "canny"}, {"reference_edges": True}])
def test_edge_options_run_end_to_end(tiny_sam, kwargs):
    batch = random_batch(2, prompt="box")
    model = hooked(tiny_sam, {"pa": PASam(**kwargs)}).eval()
    with torch.no_grad():
        out = model(batch)
    assert out.pred.shape == (2, 1, 32, 32) and torch.isfinite(out.pred).all()


@pytest.mark.parametrize("kwargs", [{}, {"edge_filter": "canny"}, {"reference_edges": True}])
def test_nothing_in_the_padding_reaches_the_prediction(tiny_sam, kwargs):
    """The edges, like SAM's input, see zeros outside each image's input_size: an image with noise in
    its padding predicts exactly what the zero-padded one does (sobel and canny read the raw image)."""
    batch = random_batch(2, prompt="box")
    batch.input_size = torch.tensor([[100, 90], [128, 70]])
    inside = torch.zeros(2, 1, 128, 128, dtype=torch.bool)
    inside[0, :, :100, :90] = inside[1, :, :, :70] = True
    clean = batch.image * inside
    dirty = torch.where(inside, clean, torch.rand(clean.shape, generator=torch.Generator().manual_seed(5)))
    model = hooked(tiny_sam, {"pa": PASam(**kwargs)}).eval()
    outputs = []
    for image in (clean, dirty):
        batch.image = image
        with torch.no_grad():
            outputs.append(model(batch).pred)
    assert torch.equal(outputs[0], outputs[1])
