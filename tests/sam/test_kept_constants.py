"""What the encoder makes once and keeps: index tensors (``ops.constant``) and the rel-pos tables of
frozen tables (``rel_pos.rel_pos_table``); and where kept copies live (beside their owner, never in it)."""

from __future__ import annotations

import collections
import copy
import gc
import pickle

import pytest
import torch
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from samflow.batch import SamBatch
from samflow.sam import HookedSam
from samflow.sam import casts as casts_module
from samflow.sam.casts import CastOnceLinear, cache_frozen_casts, kept_copies
from samflow.sam.ops import window_slots
from samflow.sam.rel_pos import rel_pos_table


class Operators(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_a_second_encode_builds_no_index_and_gathers_no_rel_pos_table(tiny_sam):
    """On the GPU's path (the augmented attention; on the CPU taken when the input needs a gradient)."""
    hooked = HookedSam(tiny_sam)
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0), requires_grad=True)
    index_ops = ("remainder", "floor_divide", "eq", "index")  # window slots, one-hot keys, table gathers
    runs = []
    for _ in range(2):
        with Operators() as mode:
            out = hooked.encode(hooked.context(SamBatch(image=image))).embeddings
        runs.append((mode.counts, out))
    (first, out1), (second, out2) = runs
    if any(first[op] for op in index_ops):  # a fresh process: the first encode made them
        assert sum(first.values()) > sum(second.values())
    assert not any(second[op] for op in index_ops), {op: second[op] for op in index_ops}
    assert torch.equal(out1, out2)
    (grad,) = torch.autograd.grad(out2.square().sum(), image)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("size", [7, 14, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_kept_rel_pos_table_is_sams_and_follows_its_table(size, dtype):
    torch.manual_seed(size)
    rel_pos = nn.Parameter(torch.randn(2 * size - 1, 8, dtype=torch.float64), requires_grad=False)
    for _ in range(2):  # made, then kept
        assert torch.equal(rel_pos_table(size, rel_pos, dtype), get_rel_pos(size, size, rel_pos).to(dtype))
    assert kept_copies(rel_pos)
    with torch.no_grad():
        rel_pos.mul_(-3)  # in place: seen through the version counter
    assert torch.equal(rel_pos_table(size, rel_pos, dtype), get_rel_pos(size, size, rel_pos).to(dtype))


def test_a_trained_rel_pos_table_is_not_kept_and_gets_sams_gradient():
    rel_pos = nn.Parameter(torch.randn(27, 8, dtype=torch.float64))
    weights = torch.randn(14, 14, 8, dtype=torch.float64)
    (ours,) = torch.autograd.grad((rel_pos_table(14, rel_pos) * weights).sum(), rel_pos)
    (theirs,) = torch.autograd.grad((get_rel_pos(14, 14, rel_pos) * weights).sum(), rel_pos)
    assert torch.equal(ours, theirs)
    assert not kept_copies(rel_pos)


def test_a_table_of_another_length_goes_through_sams_interpolation():
    rel_pos = nn.Parameter(torch.randn(19, 8), requires_grad=False)  # not 2 * 14 - 1
    assert torch.equal(rel_pos_table(14, rel_pos), get_rel_pos(14, 14, rel_pos))


def test_window_slots_are_made_once_per_grid_window_and_device():
    a = window_slots((20, 30), 7)
    assert window_slots((20, 30), 7) is a  # kept
    assert window_slots((20, 30), 7, torch.device("meta")).device.type == "meta"
    assert window_slots((20, 31), 7) is not a and window_slots((20, 30), 14) is not a


def _frozen_linear() -> nn.Module:
    return cache_frozen_casts(nn.Sequential(nn.Linear(8, 8))).requires_grad_(False)


def _fill(module: nn.Module) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(torch.randn(2, 8))


def test_kept_copies_live_beside_their_module_not_in_it():
    module = _frozen_linear()
    plain = pickle.dumps(module)
    _fill(module)
    assert kept_copies(module[0])
    assert pickle.dumps(module) == plain  # pickling (torch.save, spawned workers) carries none
    assert not kept_copies(copy.deepcopy(module)[0])  # nor does a copy
    assert "_samflow" not in "".join(vars(module[0]))


def test_kept_copies_go_with_their_module():
    class Marked(CastOnceLinear):
        pass

    module = nn.Sequential(Marked(8, 8)).requires_grad_(False)
    _fill(module)
    assert any(isinstance(owner, Marked) for owner in list(casts_module._KEPT.keys()))
    del module
    gc.collect()
    assert not any(isinstance(owner, Marked) for owner in list(casts_module._KEPT.keys()))
