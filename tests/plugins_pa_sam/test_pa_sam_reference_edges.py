"""PA-SAM's ``reference_edges``: exactly the reference's OpenCV Canny, fed to the guiding branch.

The reference (``xzz2/pa-sam``, ``generalized_image_grad``) computes, per image, on SAM's normalised
image resized to 256 x 256:

    cv2.Canny(image.cpu().numpy().transpose((1, 2, 0)).astype(np.uint8), 10, 100) / 255

These tests build that expression with numpy and OpenCV and require samflow's edge map to be equal to
it, pixel for pixel, on varied images, sizes and value ranges.
"""

from __future__ import annotations

import platform
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_batch
from pa_sam_helpers import hooked

from samflow.plugins.registry import PluginError
from samflow.sam import DecoderContext, normalize
from samflow_plugins.pa_sam import PASam
from samflow_plugins.pa_sam import guiding as guiding_module
from samflow_plugins.pa_sam.guiding import canny_edges, guiding_input, reference_canny, wrap_to_uint8

cv2 = pytest.importorskip("cv2", reason="reference_edges needs OpenCV (the opencv extra)")

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def reference_cast(x: torch.Tensor) -> np.ndarray:
    """The reference's uint8 image of one (3, H, W) float32 tensor: H x W x 3, channels as given.

    numpy's ``astype(np.uint8)`` as the reference calls it on x86, where it wraps around; elsewhere the
    same wrap written out (numpy's cast of out-of-range values saturates on ARM).
    """
    arr = x.float().numpy().transpose((1, 2, 0))
    if X86:
        return arr.astype(np.uint8)
    return np.mod(np.trunc(arr), 256).astype(np.uint8)


def opencv_edges(normalized: torch.Tensor) -> torch.Tensor:
    """The reference's edge map of a batch (B, 3, H, W) -> (B, 1, H, W) in {0, 1}, one image at a time."""
    maps = [torch.from_numpy(cv2.Canny(reference_cast(x), 10, 100)).float() / 255 for x in normalized]
    return torch.stack(maps).unsqueeze(1)


def _normalise(image: torch.Tensor) -> torch.Tensor:
    return (image * 255 - MEAN) / STD


def _scene(h: int, w: int, seed: int) -> torch.Tensor:
    """(1, 3, h, w) in [0, 1]: a real-looking synthetic scene (a lit background, coloured discs and
    boxes with soft borders, a thin line, texture and sensor noise)."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    colour = torch.rand(3, 1, 1, generator=gen)
    image = colour * (0.4 + 0.5 * xx) + 0.1 * torch.sin(6 * yy + 3 * xx)  # lit background
    for _ in range(4):
        cy, cx, r = torch.rand(3, generator=gen).tolist()
        disc = torch.sigmoid((0.1 + 0.25 * r - ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()) * 60)
        image = image * (1 - disc) + torch.rand(3, 1, 1, generator=gen) * disc
    y0 = int(torch.randint(0, h // 2, (1,), generator=gen))
    x0 = int(torch.randint(0, w // 2, (1,), generator=gen))
    image[:, y0 : y0 + h // 3, x0 : x0 + w // 4] = torch.rand(3, 1, 1, generator=gen)
    image[:, :, w // 3] = 0.9  # a one-pixel line
    image = image + 0.03 * torch.randn(3, h, w, generator=gen)
    return image.clamp(0, 1).unsqueeze(0)


def _images() -> dict[str, torch.Tensor]:
    """Named (B, 3, H, W) float32 inputs to the edge map, on the scale of SAM's normalised image
    (the cast then wraps) or on the 0..255 scale (the cast keeps them: OpenCV's Canny on a plain image)."""
    gen = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 160), indexing="ij")
    smooth = torch.stack([xx, yy, (xx + yy) / 2]).unsqueeze(0)  # smooth gradients
    ramp = torch.stack([xx * 0.6, 1 - yy, 0.5 + 0.5 * torch.sin(8 * xx * yy)]).unsqueeze(0)
    return {
        "normalised noise 256": _normalise(torch.rand(2, 3, 256, 256, generator=gen)),
        "normalised noise 17x33": _normalise(torch.rand(1, 3, 17, 33, generator=gen)),
        "normalised smooth 96x160": _normalise(smooth),
        "normalised ramp 96x160": _normalise(ramp),
        "normalised scene 256": _normalise(_scene(256, 256, 0)),
        "normalised scene 64x200": _normalise(_scene(64, 200, 1)),
        "normalised scene 255x127": _normalise(_scene(255, 127, 2)),
        # wide normalised values: -5.96 .. 5.96 wraps to {251..255, 0..5}
        "wide normalised noise 128": 4 * torch.randn(1, 3, 128, 128, generator=gen).clamp(-1.49, 1.49),
        "scene 0..255 256": _scene(256, 256, 3) * 255,
        "scene 0..255 100x300": _scene(100, 300, 4) * 255,
        "noise 0..255 64": torch.rand(2, 3, 64, 64, generator=gen) * 255,
        "smooth 0..255 96x160": smooth * 255,
        "flat": torch.full((1, 3, 32, 32), -0.5),
    }


IMAGES = _images()


def test_the_normalised_images_wrap_around_in_the_uint8_cast():
    """The test inputs do exercise the wrap: negative normalised values become 255, 254, ..."""
    for name in ("normalised noise 256", "normalised scene 256", "wide normalised noise 128"):
        cast = reference_cast(IMAGES[name][0])
        assert (cast >= 250).any() and (cast <= 2).any(), name
    assert set(np.unique(reference_cast(IMAGES["wide normalised noise 128"][0]))) >= {251, 255, 0, 5}


@pytest.mark.skipif(not X86, reason="numpy's float -> uint8 cast wraps around on x86 only")
def test_wrap_to_uint8_is_numpys_cast_on_x86():
    x = torch.cat([v.flatten() for v in IMAGES.values()] + [torch.linspace(-300, 300, 6001)])
    assert np.array_equal(wrap_to_uint8(x).to(torch.uint8).numpy(), x.numpy().astype(np.uint8))


@pytest.mark.parametrize("name", list(IMAGES))
def test_reference_canny_equals_opencv(name):
    x = IMAGES[name]
    ours = reference_canny(x)
    expected = opencv_edges(x)
    assert ours.shape == (x.shape[0], 1, *x.shape[-2:]) and ours.dtype == torch.float32
    assert set(ours.unique().tolist()) <= {0.0, 1.0}  # 0/255 scaled to 0/1, as the reference
    assert torch.equal(ours, expected)
    if name not in ("flat", "smooth 0..255 96x160"):  # these have no edges (also a case to get right)
        assert expected.sum() > 0


def test_channels_are_passed_in_rgb_order():
    """OpenCV keeps, per pixel, the channel with the largest gradient, and channel order decides ties:
    BGR gives other edges on these images, so RGB (the reference's order) is what is checked."""
    differ = 0
    for name in ("normalised noise 256", "normalised scene 256", "scene 0..255 256"):
        x = IMAGES[name]
        bgr = opencv_edges(x.flip(1))
        assert torch.equal(reference_canny(x), opencv_edges(x))
        differ += int((bgr != opencv_edges(x)).sum())
    assert differ > 0


def test_kornias_canny_is_not_opencvs():
    """The GPU choice (kornia, per channel, L2, OR) differs from OpenCV on the wrapped image: the gap
    that ``reference_edges`` closes."""
    x = IMAGES["normalised scene 256"]
    assert not torch.equal(canny_edges(wrap_to_uint8(x)), opencv_edges(x))


@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_guiding_input_feeds_opencvs_edges_at_the_guiding_size(size):
    """Edges of the normalised image *after* the bilinear resize to the guiding size (the reference
    resizes 1024 -> 256 first), 0/1, appended after the resized RGB channels; any edge_filter is ignored."""
    image = torch.cat([_scene(128, 128, 5), _scene(128, 128, 6)])
    normalized = _normalise(image)
    normalized[1, :, 100:] = 0  # padding, zero after normalising as in SAM
    resized = F.interpolate(normalized, size=size, mode="bilinear", align_corners=False)
    for edge_filter in ("sobel", "canny"):
        x = guiding_input(image, normalized, size, edge_filter, reference_edges=True)
        assert x.shape == (2, 4, *size)
        assert torch.equal(x[:, :3], resized)
        assert torch.equal(x[:, 3:], opencv_edges(resized))


def test_half_precision_input_is_resized_in_float32_as_the_reference():
    normalized = _normalise(_scene(128, 128, 7)).bfloat16()
    x = guiding_input(normalized.float() * 0, normalized, (64, 64), reference_edges=True)
    resized = F.interpolate(normalized.float(), size=(64, 64), mode="bilinear", align_corners=False)
    assert x.dtype == torch.bfloat16
    assert torch.equal(x[:, 3:].float(), opencv_edges(resized))


def test_the_plugins_guide_and_coarse_map_use_opencvs_edges(tiny_sam, monkeypatch):
    """In a full forward, the guiding branch's input edge channel is OpenCV's map of the resized
    normalised image (SAM's own, padded), and the coarse map follows from it."""
    batch = random_batch(2, prompt="box")
    batch = batch.replace(
        image=torch.cat([_scene(128, 128, 8), _scene(128, 128, 9)]),
        input_size=torch.tensor([[128, 96], [100, 128]]),
    )
    model = hooked(tiny_sam, {"pa": PASam(reference_edges=True)}).eval()
    plugin = model.plugins["pa"]
    seen: list[torch.Tensor] = []
    plugin.guiding.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(batch)
    (x,) = seen
    normalized = normalize(tiny_sam, batch.image, batch.input_size)
    resized = F.interpolate(normalized, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(x[:, 3:], opencv_edges(resized))
    assert x[:, 3].sum() > 0
    ctx = model.context(batch)
    with torch.no_grad():
        ctx = DecoderContext.after_encoder(ctx, model.encode(ctx))
        expected = plugin.guiding(torch.cat([resized, opencv_edges(resized)], dim=1))
        torch.testing.assert_close(plugin.guide(ctx), expected[batch.image_index].flatten(2).transpose(1, 2))

    # the coarse map depends on those edges: kornia's edges of the same cast give another map
    coarse = out.masks["pa/coarse"]
    monkeypatch.setattr(guiding_module, "reference_canny", lambda v: canny_edges(wrap_to_uint8(v)))
    with torch.no_grad():
        other = model(batch).masks["pa/coarse"]
    assert torch.isfinite(coarse).all() and not torch.equal(coarse, other)


def test_a_clear_error_names_the_extra_when_opencv_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    image = _scene(32, 32, 10)
    with pytest.raises(ImportError, match=r"opencv extra: pip install 'samflow\[opencv\]'") as err:
        guiding_input(image, _normalise(image), (16, 16), reference_edges=True)
    assert isinstance(err.value, PluginError)  # the CLI prints it as one line, exit 1
    assert "reference_edges" in str(err.value) and "\n" not in str(err.value)
    # the kornia edges (the default, the GPU choice) need no OpenCV
    for edge_filter in ("sobel", "canny"):
        assert guiding_input(image, _normalise(image), (16, 16), edge_filter).shape == (1, 4, 16, 16)


def test_missing_opencv_fails_when_the_plugin_is_built(monkeypatch):
    from samflow_plugins.pa_sam import PASam
    from samflow_plugins.pa_sam.guiding import OpenCVMissingError

    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(OpenCVMissingError, match="opencv"):
        PASam(reference_edges=True)
    PASam()  # the kornia default needs no OpenCV
