"""The recorded official outputs (tests/official_code.py): fingerprints, sketches, record and replay.

These helpers decide whether the comparisons with the official code, run from recordings in CI,
can still fail: a sketch must catch a wrong region and a large single error, a recording must not
be used for other inputs.
"""

from __future__ import annotations

import official_code
import pytest
import torch
from official_code import (
    ReferenceOutputs,
    Sketch,
    _sketched,
    _unsketched,
    assert_close,
    fingerprint,
    same_inputs,
)


def _same(a: tuple, b: tuple) -> bool:
    return same_inputs(fingerprint(*a), fingerprint(*b))


def test_fingerprint_tells_values_dtypes_shapes_and_0d_tensors_apart():
    t = torch.arange(6.0).reshape(2, 3)
    assert _same((t, {"a": 1}), (t.clone(), {"a": 1}))
    assert not _same((t,), (t.double(),))
    assert not _same((t,), (t.reshape(3, 2),))
    assert not _same((t,), (t + 1e-3,))
    assert not _same((t, {"a": 1}), (t, {"a": 2}))
    assert not _same((torch.tensor(3),), (torch.tensor(4),))  # 0-d int64 (BatchNorm's counter)
    assert not _same((torch.nn.Linear(2, 2),), (torch.nn.Linear(2, 2),))  # by its state dict


def test_last_bits_of_another_cpu_are_the_same_inputs_and_another_draw_is_not():
    """A recording made on another CPU (AVX-512 vs AVX2 kernels: other last bits of a draw or a
    convolution) still answers for these inputs; another seed's draw does not."""
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(64, 64, generator=g)
    other_cpu = weights * (1 + 2e-7 * torch.randn(64, 64, generator=g))  # a few ulps, float32
    assert not torch.equal(other_cpu, weights)
    assert _same((weights, 3), (other_cpu, 3))
    assert _same((weights.double(),), (other_cpu.double() + 1e-15,))
    another_draw = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    assert not _same((weights,), (another_draw,))
    assert not _same((weights,), (weights[:, :32].repeat(1, 2),))  # half of it again


def _replayed(t: torch.Tensor) -> Sketch:
    sketch = _unsketched(_sketched({"x": t}, "case"), "case")["x"]
    assert isinstance(sketch, Sketch)
    return sketch


def test_small_tensors_are_kept_whole_and_large_ones_as_sketches():
    small = torch.randn(64, 64)  # 4096 elements: kept
    assert torch.equal(_sketched(small, "k"), small)
    large = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    sketch = _replayed(large)
    assert sketch.values.numel() == official_code.SKETCH and sketch.shape == (64, 128)
    assert [m.shape for m in sketch.marginals] == [(64,), (128,)]
    assert_close(large.clone(), sketch, atol=0, rtol=0)  # the same tensor passes exactly
    assert_close(large + 1e-9, sketch, atol=1e-8, rtol=0)  # within tolerance passes


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.index_put_((torch.arange(2),), t[:2] + 1e-3),  # 2 of 64 rows (3 % of the elements)
        lambda t: t.index_put_(
            (torch.tensor([5]), torch.tensor([7])), torch.tensor(50.0, dtype=t.dtype)
        ),  # one element, far off
        lambda t: t.mul_(1 + 1e-6),  # everything, slightly
    ],
    ids=["two_rows", "one_element_far_off", "all_slightly"],
)
def test_a_sketch_catches_a_wrong_region_a_far_off_element_and_a_small_global_change(change):
    large = torch.randn(64, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sketch = _replayed(large)
    with pytest.raises(AssertionError):
        assert_close(change(large.clone()), sketch, atol=1e-10, rtol=0)


def test_shape_and_dtype_are_checked():
    sketch = _replayed(torch.zeros(64, 128))
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(128, 64), sketch)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(torch.zeros(64, 128, dtype=torch.float64), sketch)


def test_record_then_replay_and_refuse_other_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(official_code, "RECORDINGS", tmp_path)
    monkeypatch.setenv("SAMFLOW_SOME_CHECKOUT", "/somewhere")
    monkeypatch.setenv(official_code.RECORD_ENV, "1")
    ref = ReferenceOutputs("method", "SAMFLOW_SOME_CHECKOUT")
    out = torch.randn(100, 100)
    calls = []
    live = ref.get("case", fingerprint(out), lambda: calls.append(1) or {"y": out, "n": 3})
    assert calls == [1] and torch.equal(live["y"], out) and (tmp_path / "method.pt").is_file()

    monkeypatch.delenv("SAMFLOW_SOME_CHECKOUT")
    replay = ReferenceOutputs("method", "SAMFLOW_SOME_CHECKOUT")
    assert replay.available
    recorded = replay.get(
        "case", fingerprint(out), lambda: pytest.fail("no official code without the checkout")
    )
    assert recorded["n"] == 3 and isinstance(recorded["y"], Sketch)
    assert_close(out, recorded["y"])
    with pytest.raises(pytest.fail.Exception, match="recorded for other inputs"):
        replay.get("case", fingerprint(out + 1), lambda: None)
    with pytest.raises(pytest.fail.Exception, match="has no case 'other'"):
        replay.get("other", fingerprint(out), lambda: None)
    assert not ReferenceOutputs("absent", "SAMFLOW_SOME_CHECKOUT").available
