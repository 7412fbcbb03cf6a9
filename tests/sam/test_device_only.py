"""The forward makes no tensor on the host to mix with the model's (on a GPU, each such tensor is a copy
that waits for the queue): the whole pass runs with model and batch on PyTorch's ``meta`` device,
where a host tensor meeting a device tensor in an operation is an error."""

from __future__ import annotations

import pytest
import torch

from samflow.plugins import PluginStack
from samflow.plugins.registry import create_plugin
from samflow.sam import HookedSam, build_sam
from samflow.testing import random_batch

# sam_adapter's FFT and ba_sam's equality check have no meta kernels, so they cannot run there
PLUGINS = [None, "decoder_tuning", "tokens", "hq_sam", "pa_sam", "lora", "wsi_sam", "sapnet"]


@pytest.mark.parametrize("plugin", PLUGINS)
@pytest.mark.parametrize("prompt", ["box", "points"])
def test_forward_runs_on_the_meta_device(plugin, prompt):
    stack = PluginStack({plugin: create_plugin(plugin)}) if plugin else None
    hooked = HookedSam(build_sam("tiny", seed=0), stack).to("meta").eval()
    batch = random_batch(2, 128, prompt=prompt, seed=0).to(torch.device("meta"))
    with torch.no_grad():
        out = hooked(batch)
    assert out.pred.device.type == "meta" and out.pred.shape == (2, 1, 32, 32)


def test_a_host_tensor_in_the_prompt_path_would_be_caught(monkeypatch):
    """The check can fail: the prompt-coordinate scaling done with a host tensor (as before) errors."""
    import samflow.sam.ops as ops

    def host_scaled(pe, coords, frame):
        return ops.fourier_pe(pe.pe_layer, coords / torch.tensor([frame[1], frame[0]], dtype=coords.dtype))

    monkeypatch.setattr(ops, "_pixel_pe", host_scaled)
    hooked = HookedSam(build_sam("tiny", seed=0)).to("meta").eval()
    batch = random_batch(1, 128, prompt="box", seed=0).to(torch.device("meta"))
    with torch.no_grad(), pytest.raises(RuntimeError, match="device"):
        hooked(batch)
