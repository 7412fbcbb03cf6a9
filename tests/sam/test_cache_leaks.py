"""Process-global caches over long runs: nothing grows without bound, keeps a dropped model alive, or
serves values of weights that were replaced.

``samflow.sam.casts`` keeps cast copies of frozen weights beside their module (weakly keyed) and
``samflow.sam.ops.constant`` index tensors (bounded); ``EncoderCache`` keeps encoder outputs per
image, which are a function of the encoder's weights too.
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import torch
from helpers import new_storage_at_the_same_address, random_batch, randomize

from samflow.sam import EncoderCache, HookedSam, build_sam
from samflow.sam import casts as casts_module
from samflow.sam import ops as ops_module

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def _masks(hooked: HookedSam, batch) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(**BF16):
        return hooked(batch).masks["sam"].float()


def _sams() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two tiny SAMs with different weights."""
    return randomize(build_sam("tiny", seed=0), seed=0), randomize(build_sam("tiny", seed=1), seed=1)


def test_load_state_dict_after_an_autocast_forward_is_seen_by_the_next_forward():
    """The cast copies (decoder layers, prompt embeddings, rel-pos tables) follow the new weights: the
    forward after ``load_state_dict`` equals a model built with them, bit for bit."""
    sam, other = _sams()
    hooked, batch = HookedSam(sam).eval(), random_batch(2, prompt="box")
    before = _masks(hooked, batch)
    assert casts_module.kept_copies(sam.mask_decoder.output_upscaling[0])  # copies were kept
    sam.load_state_dict(other.state_dict())
    after = _masks(hooked, batch)
    expected = _masks(HookedSam(other).eval(), batch)
    assert not torch.equal(before, expected)  # the two weight sets give different masks
    assert torch.equal(after, expected)


def test_the_encoder_cache_empties_when_the_encoder_weights_change():
    weight = torch.ones(3)
    calls: list[int] = []

    def compute(x: torch.Tensor):
        calls.append(x.shape[0])
        return x[:, :2, :2, :2] * weight[0], {}

    cache, x = EncoderCache(4), torch.rand(2, 3, 4, 4)

    def encode():
        return cache.encode(x, (), compute, weights=[weight])

    first = encode()
    encode()
    assert calls == [2]  # the second call came from the cache
    with torch.no_grad():
        weight.copy_(torch.full((3,), 2.0))  # load_state_dict writes this way
    again = encode()
    assert calls == [2, 2]
    torch.testing.assert_close(again[0], 2 * first[0], rtol=0, atol=0)
    weight = torch.full((3,), 3.0)  # replaced by another tensor
    encode()
    assert calls == [2, 2, 2]
    encode()
    assert calls == [2, 2, 2]
    # new storage at the freed one's address, same tensor and version counter (``encoder.half().float()``
    # when the allocator hands the block back)
    new_storage_at_the_same_address(weight, torch.full((3,), 4.0))
    torch.testing.assert_close(encode()[0], 4 * first[0], rtol=0, atol=0)
    assert calls == [2, 2, 2, 2]


def test_a_hooked_sam_with_an_encoder_cache_follows_load_state_dict():
    sam, other = _sams()
    hooked, batch = HookedSam(sam, encoder_cache=EncoderCache(8)).eval(), random_batch(2, prompt="box")
    _masks(hooked, batch)
    sam.load_state_dict(other.state_dict())
    fresh = HookedSam(other, encoder_cache=EncoderCache(8)).eval()
    assert torch.equal(_masks(hooked, batch), _masks(fresh, batch))


def test_models_built_used_and_dropped_leave_nothing_behind():
    batch = random_batch(1, prompt="box")
    gc.collect()
    kept_before = len(casts_module._KEPT)
    refs = []
    for seed in range(8):  # 50 measured by hand: RSS back to within a few MiB (see the report)
        sam = build_sam("tiny", seed=seed)
        hooked = HookedSam(sam, encoder_cache=EncoderCache(2)).eval()
        _masks(hooked, batch)
        refs.append((weakref.ref(sam), weakref.ref(hooked)))
        del sam, hooked
    gc.collect()
    assert all(r() is None for pair in refs for r in pair)
    assert len(casts_module._KEPT) == kept_before
    assert len(ops_module._INDICES) <= 512


def test_a_module_with_kept_copies_deep_copies_and_pickles_to_the_same_outputs():
    """DDP's spawn pickles the model; a copy made after an autocast forward carries no kept copies and
    computes the same masks (its own copies are made at its first forward)."""
    sam, _ = _sams()
    hooked, batch = HookedSam(sam).eval(), random_batch(2, prompt="box")
    expected = _masks(hooked, batch)
    for clone in (copy.deepcopy(sam), pickle.loads(pickle.dumps(sam))):
        assert not casts_module.kept_copies(clone.mask_decoder.output_upscaling[0])
        assert torch.equal(_masks(HookedSam(clone).eval(), batch), expected)
