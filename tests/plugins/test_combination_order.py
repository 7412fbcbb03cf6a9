"""Built-in plugins in pairs, the key order and identity plugins (float64, tiny SAM).

Split from ``test_combinations.py`` (its plugins, batches and helpers) to keep each file short to run.
The key order written in the experiment changes nothing: each plugin draws its initial values as it
would alone, fold hooks sum their contributions and the decoder's tokens have no order in attention.
A plugin that starts as the identity leaves the others' outputs at initialisation as they are alone.
"""

from __future__ import annotations

import pytest
import torch
from test_combinations import (
    COMPOSING,
    IDENTITY,
    MAKE,
    assert_same_outputs,
    batch_for,
    build,
    double,
    nudged,
    pair_module,
)


@pytest.mark.parametrize("pair", COMPOSING, ids="+".join)
def test_the_key_order_changes_nothing(pair):
    """The same seed and plugins with the keys written the other way round: the same initial values
    (each plugin draws them as it would alone) and, with the parameters moved, the same outputs and
    plugin losses in float64 (fold hooks sum their contributions; tokens have no order in attention)."""
    first, second = pair_module(pair), pair_module(pair[::-1])
    state = second.state_dict()
    for name, value in first.state_dict().items():
        assert torch.equal(state[name], value), name
    batch = double(batch_for(pair))
    results = []
    for module in (first, second):
        nudged(module).eval().double()
        with torch.no_grad():
            out, ctx = module(batch)
            terms = {}
            for key in pair:  # each with the same draws (HQ-SAM's points, SAPNet's negatives)
                torch.manual_seed(3)
                terms.update(
                    {f"{key}/{k}": v for k, v in module.plugins[key].losses(out, batch, ctx).items()}
                )
            results.append((out, terms))
    (out_a, terms_a), (out_b, terms_b) = results
    assert_same_outputs(out_a, out_b)
    assert set(terms_a) == set(terms_b)
    for name, value in terms_a.items():
        torch.testing.assert_close(terms_b[name], value, rtol=0, atol=1e-9, msg=name)


@pytest.mark.parametrize("identity", sorted(IDENTITY))
def test_an_identity_plugin_alone_is_sam(identity):
    batch = double(batch_for((identity,)))
    with torch.no_grad():
        sam = build({}).eval().double()(batch)[0]
        alone = build({identity: IDENTITY[identity]()}).eval().double()(batch)[0]
    assert_same_outputs(sam, alone)


@pytest.mark.parametrize("other", sorted(MAKE))
def test_identity_plugins_leave_the_others_output_as_it_is_alone(other):
    """Float64, at initialisation, with the same seed: with the identity plugins written before it, the
    other plugin's masks, SAM's masks, IoU and the prediction equal those of the other alone."""
    identities = {key: make() for key, make in IDENTITY.items() if key != other}
    batch = double(batch_for((*identities, other)))
    with torch.no_grad():
        alone = build({other: MAKE[other]()}).eval().double()(batch)[0]
        both = build({**identities, other: MAKE[other]()}).eval().double()(batch)[0]
    assert_same_outputs(alone, both, list(alone.masks))  # "sam" and the other's "<other>/..."
