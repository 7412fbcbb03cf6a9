"""A training step never reads ``image_index`` back from the device (``SamBatch.image_index_host``).

``ctx.rand`` seeds each row's generator with its image's sample seed and the row's rank among its
image's rows: it needs every row's image on the host. Reading ``image_index`` there from a GPU waits
for the device once per forward that draws (PA-SAM, HQ-SAM, SAPNet). The batch is built on the host
(collate), so it keeps those values beside the tensor, through ``to``, ``pin_memory``, ``replace``,
``select_rows``, ``select_images`` and ``with_context``.

``HostReads`` stands for a device tensor: it records every host read of itself and of the integer and
bool tensors computed from it (``tolist``, ``item``, ``int()``, ``bool()``, ``.cpu()``, ``nonzero``,
...); float results (``embeddings[index]``) are plain tensors again.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize

from samflow.plugins import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow.testing import random_batch
from samflow_plugins.hq_sam import HQSam
from samflow_plugins.pa_sam import PASam
from samflow_plugins.sapnet import SAPNet

READS = {
    "tolist", "item", "cpu", "numpy", "__int__", "__index__", "__bool__", "__float__",
    "nonzero", "unique", "masked_select", "bincount", "__array__",
}  # fmt: skip


class HostReads(torch.Tensor):
    """An index tensor whose host reads, armed, are recorded in ``reads``."""

    armed: ClassVar[bool] = False
    reads: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(
            str(a) == "cpu"
            for a in (*args[1:], *(kwargs or {}).values())
            if isinstance(a, (str, torch.device))
        )
        if cls.armed and (name in READS or to_host) and isinstance(args[0], cls):
            cls.reads.append(name)
        out = super().__torch_function__(func, types, args, kwargs)
        return torch.utils._pytree.tree_map(_plain_floats, out)


def _plain_floats(value: Any) -> Any:
    if isinstance(value, HostReads) and value.is_floating_point():
        return value.as_subclass(torch.Tensor)
    return value


@pytest.fixture
def armed():
    HostReads.reads.clear()
    HostReads.armed = True
    yield HostReads.reads
    HostReads.armed = False


def _plugin(name: str):
    if name == "pa":
        return PASam(mining_start_epoch=0)
    if name == "hq":
        return HQSam(num_points=64)
    return SAPNet(num_classes=3, hidden=16, num_negatives=8)


def _loss(model: HookedSam, batch) -> torch.Tensor:
    out, ctx = model.run(batch, model.context(batch, epoch=5))
    pred = F.interpolate(out.pred, size=batch.row_mask.shape[-2:], mode="bilinear", align_corners=False)
    total = F.binary_cross_entropy_with_logits(pred, batch.row_mask)
    return total + sum(model.plugins.losses(out, batch, ctx).values())


@pytest.mark.parametrize("name", ["pa", "hq", "sap"])
def test_a_training_step_reads_no_row_index_from_the_device(name, armed):
    torch.manual_seed(0)
    model = HookedSam(randomize(build_sam("tiny", seed=0)), PluginStack({name: _plugin(name)})).train()
    # rows of images 1, 0, 1, 2: two ranks on image 1; the batch as collate builds it, on the host
    batch = random_batch(3, prompt="box", seed=3).select_rows([1, 0, 1, 2]).replace(sample_seed=[11, 12, 13])
    HostReads.armed = False
    plain = _loss(model, batch)
    spied = batch.to("cpu").replace(image_index=batch.image_index.as_subclass(HostReads))
    spied = spied.select_rows(list(range(spied.num_rows)))  # a host-side change of rows keeps the values
    assert spied.image_index_host == [1, 0, 1, 2] and not armed  # reading it here read nothing

    HostReads.armed = True
    loss = _loss(model, spied)
    loss.backward()
    assert armed == [], f"{name}: host reads of image_index in a training step: {armed}"
    torch.testing.assert_close(loss.detach(), plain.detach(), rtol=0, atol=0)  # the same draws


def test_the_spy_sees_a_host_read(armed):
    """The check can fail: the draws' old way (``image_index.tolist()``) is recorded."""
    index = torch.tensor([0, 1, 0]).as_subclass(HostReads)
    assert (index + 1)[1:].tolist() == [2, 1] and armed == ["tolist"]


def test_the_host_values_follow_every_change_of_rows():
    batch = random_batch(3, prompt="box").select_rows([2, 0, 1, 2, 0])
    assert batch.image_index_host == batch.image_index.tolist() == [2, 0, 1, 2, 0]
    two = batch.select_images([2, 0])
    assert two.image_index_host == two.image_index.tolist() == [0, 1, 0, 1]
    assert two.select_images(torch.tensor([1])).image_index_host == [0, 0]
    context = batch.replace(context_image=batch.image).with_context()
    assert context.image_index_host == context.image_index.tolist()
    meta = batch.to("meta")  # a device whose tensors cannot be read: the values came along
    assert meta.image_index.is_meta and meta.image_index_host == [2, 0, 1, 2, 0]
    assert meta.select_rows([4, 0]).image_index_host == [0, 2]
    assert meta.replace(box=None).image_index_host == [2, 0, 1, 2, 0]
    with pytest.raises(NotImplementedError):  # an index made on the device is read from it, not guessed
        _ = meta.replace(image_index=meta.image_index.flip(0)).image_index_host


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_draws_onto_a_gpu_wait_for_nothing_and_equal_the_hosts():
    """The CUDA path: the batch moved to the GPU keeps its rows' images; the draws, made on the host in
    page-locked memory and copied without blocking, equal the host's and make no synchronising call."""
    from samflow.sam.types import ForwardContext

    batch = random_batch(3, prompt="box").select_rows([1, 0, 1, 2]).replace(sample_seed=[11, 12, 13])
    host = ForwardContext(sam=None, batch=batch).rand("k/use", (5,))  # type: ignore[arg-type]
    moved = batch.to("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        drawn = ForwardContext(sam=None, batch=moved).rand("k/use", (5,), device="cuda")  # type: ignore[arg-type]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert drawn.device.type == "cuda"
    torch.testing.assert_close(drawn.cpu(), host, rtol=0, atol=0)
