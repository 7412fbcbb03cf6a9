"""``ForwardContext.rand`` on the model's device: the host's draw, copied; a row's own alone or in a batch."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, random_batch

from samflow.sam import HookedSam, build_sam


@pytest.mark.parametrize("device", DEVICES)
def test_rand_on_the_device_is_the_host_draw_and_a_rows_own(device):
    hooked = HookedSam(build_sam("tiny", seed=0)).to(device)
    pair = random_batch(2, prompt="points").replace(sample_seed=[11, 12]).to(device)
    ctx = hooked.context(pair)
    drawn = ctx.rand("test/stream", (3, 4), device=device)
    assert drawn.device.type == device and drawn.shape == (pair.num_rows, 3, 4)
    torch.testing.assert_close(drawn.cpu(), ctx.rand("test/stream", (3, 4)), rtol=0, atol=0)
    rows = pair.image_index.tolist()
    for image in range(2):
        alone = hooked.context(pair.select_images([image])).rand("test/stream", (3, 4), device=device)
        together = drawn[[r for r, i in enumerate(rows) if i == image]]
        torch.testing.assert_close(alone, together, rtol=0, atol=0)
    assert not torch.equal(drawn[0], drawn[-1])  # two images: two draws
