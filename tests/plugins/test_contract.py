"""The contract every registered plugin meets, checked on the tiny SAM (like timm's model tests).

Parametrised over the registry, so a new plugin, built-in or third-party, is checked without
writing a test. Plugins are built with their default arguments.
"""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from helpers import random_batch

from samflow.module import SamflowModule, SamSpec
from samflow.plugins import PluginConflictError
from samflow.plugins.registry import discover

# Every registration, also both of a name that two distributions register (``discover()`` leaves such a
# name out, so it would escape the contract): those as ``name@distribution``, built by their class.
REGISTERED = {
    (f"{i.name}@{i.distribution.replace('.', '_')}" if i.clashes else i.name): i for i in discover().all
}
NAMES = sorted(REGISTERED)
BUILTIN = sorted(n for n, i in REGISTERED.items() if i.distribution == "samflow")


def make(*names: str, seed: int = 0) -> SamflowModule:
    torch.manual_seed(seed)
    plugins = {n: REGISTERED[n].cls() for n in names}  # type: ignore[misc]
    return SamflowModule(sam=SamSpec(variant="tiny"), plugins=plugins)


def test_registry_entries_all_load():
    broken = {n: i.status for n, i in REGISTERED.items() if i.cls is None}
    assert not broken, f"broken plugins: {broken}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prompt", ["box", "none"])
def test_output_shapes(name, prompt):
    module = make(name).train()
    out, _ = module(random_batch(3, prompt=prompt))
    assert out.pred.shape == (3, 1, 32, 32)
    assert out.masks["sam"].shape == (3, 4, 32, 32)
    for key, masks in out.masks.items():
        assert masks.shape[0] == 3 and masks.shape[-2:] == (32, 32), key
        assert key == "sam" or key.startswith(f"{name}/")


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_only_trainable_parameters(name):
    module = make(name).train()
    declared = module.plugins[name].sam_modules_to_train()
    owned = set(module.plugins.owned[name])
    for pname, param in module.model.sam.named_parameters():
        # SAM trains exactly what the plugin owns: the parts it declares and the modules it injected
        assert param.requires_grad == (f"sam.{pname}" in owned), pname
        if any(pname.startswith(part + ".") for part in declared):
            assert param.requires_grad, pname
    batch = random_batch(2)
    out, ctx = module(batch)
    module.compute_losses(out, batch, ctx)["total"].backward()
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable, "a plugin must train something"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    for pname, param in module.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, pname
    assert sum(module.trainable_parameters().values()) == sum(p.numel() for p in trainable)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_reproduces_outputs(name):
    batch = random_batch(2)
    first = make(name, seed=1).eval()
    with torch.no_grad():
        # move trainable weights away from their initial values so the round trip means something
        for p in first.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
        expected = first(batch)[0].pred
    second = make(name, seed=2).eval()
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(second(batch)[0].pred, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_picklable_for_ddp_spawn(name):
    module = make(name).eval()
    clone = pickle.loads(pickle.dumps(module))
    batch = random_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(clone(batch)[0].pred, module(batch)[0].pred, rtol=0, atol=0)


@pytest.mark.parametrize("pair", list(itertools.combinations(BUILTIN, 2)), ids="+".join)
def test_builtins_compose(pair):
    if set(pair) <= {"hq_sam", "tokens", "wsi_sam"}:  # both give the prediction: refused, naming both
        with pytest.raises(PluginConflictError, match="both give the model's prediction"):
            make(*pair)
        return
    module = make(*pair).train()
    batch = random_batch(2)
    out, ctx = module(batch)
    loss = module.compute_losses(out, batch, ctx)["total"]
    loss.backward()
    assert torch.isfinite(loss)
    owned = module.plugins.owned
    first, second = (set(map(id, owned[key].values())) for key in pair)
    assert not first & second, "a parameter has two owners"
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert first | second == trainable
    assert first, f"{pair[0]} owns nothing"  # the key that sorts first keeps every part it declares
    for key in pair:
        assert module.trainable_parameters()[key] == sum(p.numel() for p in owned[key].values())
        if owned[key]:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in owned[key].values()), key


@pytest.mark.parametrize("name", NAMES)
def test_each_image_alone_equals_its_rows_in_a_batch(name):
    """In evaluation a row's output does not depend on the other rows of its batch: every output of
    each image of a batch of 3 (boxes at other places) equals the batch of that image alone."""
    module = make(name).eval().double()
    batch = random_batch(3, dtype=torch.float64)
    with torch.no_grad():
        together, _ = module(batch)
        for i in range(3):
            alone, _ = module(batch.select_images([i]))
            rows = (together.image_index == i).nonzero().flatten()
            assert set(alone.masks) == set(together.masks)
            for key, masks in alone.masks.items():
                torch.testing.assert_close(together.masks[key][rows], masks, rtol=1e-9, atol=1e-9, msg=key)
            torch.testing.assert_close(together.iou_pred[rows], alone.iou_pred, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(together.pred[rows], alone.pred, rtol=1e-9, atol=1e-9)
