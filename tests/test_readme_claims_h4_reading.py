"""README claims the other tests left open (H4 audit):

- "How masks and images are read": 32-bit integer image files outside 0..65535 are mapped from their own
  [min, max] to [0, 1] (with a ValueRangeWarning naming the rule), while 32-bit integer files inside
  0..65535 are 16-bit data, value / 65535;
- `model.sam.encoder_cache`: the entries are kept on the CPU, "4 MiB each at 1024 px, plus the encoder
  blocks plugins read: 12 MiB more for HQ-SAM on vit_b" (float32 (C, h, w) embedding and (h, w, C_vit)
  block per image; the tiny SAM shows the layout, the arithmetic carries it to vit_b at 1024 px).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_batch
from PIL import Image

from samflow.data.reading import ValueRangeWarning, read_image
from samflow.plugins import PluginStack
from samflow.sam import HookedSam
from samflow.sam.build import VARIANTS
from samflow.sam.cache import EncoderCache
from samflow_plugins.hq_sam import HQSam


def _int32_tiff(path: Path, values: list[list[int]]) -> Path:
    Image.fromarray(np.array(values, dtype=np.int32), mode="I").save(path)
    assert np.asarray(Image.open(path)).dtype == np.int32  # stored and read back as 32-bit integers
    return path


def test_a_32_bit_integer_image_outside_0_65535_is_mapped_from_its_own_range(tmp_path):
    path = _int32_tiff(tmp_path / "wide.tif", [[-5000, 0], [50000, 100000]])
    with pytest.warns(ValueRangeWarning, match=r"32-bit integer values from -5000 to 100000.*mapped from"):
        image = read_image(path)
    expected = (torch.tensor([[-5000.0, 0.0], [50000.0, 100000.0]]) + 5000) / 105000
    assert image.shape == (3, 2, 2)
    for channel in image:
        torch.testing.assert_close(channel, expected)


def test_a_32_bit_integer_image_inside_0_65535_is_read_as_16_bit_data(tmp_path):
    path = _int32_tiff(tmp_path / "narrow.tif", [[0, 6000], [30000, 65535]])
    image = read_image(path)
    expected = torch.tensor([[0.0, 6000.0], [30000.0, 65535.0]]) / 65535
    for channel in image:
        torch.testing.assert_close(channel, expected)


def test_encoder_cache_entries_are_float32_on_the_cpu_4_mib_and_12_mib_for_hq_sam_on_vit_b(tiny_sam):
    cache = EncoderCache(8)
    model = HookedSam(tiny_sam, PluginStack({"hq": HQSam()}), encoder_cache=cache).eval()
    with torch.no_grad():
        model(random_batch(2))
    entries = list(cache._entries.values())
    assert len(entries) == 2
    spec = VARIANTS["tiny"]
    grid = spec.img_size // spec.patch_size
    for embedding, blocks in entries:
        assert embedding.device.type == "cpu" and embedding.dtype == torch.float32
        assert embedding.shape == (spec.prompt_dim, grid, grid)
        (block,) = blocks.values()  # HQ-SAM's early block
        assert block.device.type == "cpu" and block.dtype == torch.float32
        assert block.shape == (grid, grid, spec.embed_dim)
    vit_b, mib = VARIANTS["vit_b"], 2**20
    grid = vit_b.img_size // vit_b.patch_size
    assert vit_b.img_size == 1024
    assert vit_b.prompt_dim * grid * grid * 4 == 4 * mib  # the embedding, float32
    assert grid * grid * vit_b.embed_dim * 4 == 12 * mib  # HQ-SAM's block on vit_b, float32
