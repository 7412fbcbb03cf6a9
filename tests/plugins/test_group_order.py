"""The optimizer's groups do not depend on the order of the experiment's plugin keys.

Two plugins that train one SAM part (``mask_decoder`` here) at one rate: the part trains in the group of
the plugin whose key sorts first, and the groups come in the keys' sorted order, so a run resumed with
its keys written in another order gives every saved optimizer state back to its own parameter, and ends
as the uninterrupted run, bit for bit. A checkpoint written when the groups followed the key order
(before this rule) still loads: its groups are matched by name.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import fit_or_interrupt, random_batch

from samflow.callbacks.resume import LastCheckpoint
from samflow.data import SegmentationDataModule
from samflow.data.quickstart import make_quickstart_data
from samflow.module import SamflowModule, SamSpec
from samflow.plugins import SamPlugin
from samflow_plugins.decoder_tuning import DecoderTuning
from samflow_plugins.lora import LoRA
from samflow_plugins.tokens import ExtraTokens

KEYS = ("decoder", "parts", "tokens")  # written in this order, then reversed


def plugins(order: tuple[str, ...]) -> dict[str, SamPlugin]:
    """``decoder`` and ``parts`` both train SAM's mask decoder (one rate), ``parts`` also the prompt
    encoder; ``tokens`` at another rate, so that a group given another group's rate would show."""
    make = {
        "decoder": lambda: DecoderTuning(lr=1e-3),
        "parts": lambda: DecoderTuning(parts=["mask_decoder", "prompt_encoder"], lr=1e-3),
        "tokens": lambda: ExtraTokens(init_from_sam=False, lr=5e-3),
    }
    return {key: make[key]() for key in order}


def build(order: tuple[str, ...]) -> SamflowModule:
    torch.manual_seed(0)
    return SamflowModule(
        sam=SamSpec(variant="tiny"),
        plugins=plugins(order),
        scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5),
    )


def layout(module: SamflowModule) -> list[tuple[str, float, list[str]]]:
    """Each optimizer group as (name, lr, the names of its parameters in order)."""
    names = {id(p): n for n, p in module.named_parameters()}
    optimizer = module.configure_optimizers()["optimizer"]
    return [(g["name"], g["lr"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]


def test_the_groups_are_the_same_in_every_key_order():
    first = layout(build(KEYS))
    assert [name for name, _, _ in first] == sorted(KEYS)
    decoder = [n for n, _ in build(KEYS).named_parameters() if n.startswith("model.sam.mask_decoder.")]
    assert [names for name, _, names in first if name == "decoder"] == [decoder]  # the first key by sort
    for order in itertools.permutations(KEYS):
        assert layout(build(order)) == first, order


# ---- a fit resumed with the keys in another order ----
def fit(
    folder: Path, module: SamflowModule, root: Path, *, stop: int | None = None, ckpt: Path | None = None
):
    """2 epochs of 2 steps, ``last.ckpt`` after every step; stopped after ``stop`` batches, or resumed."""
    data = SegmentationDataModule(
        train=str(root / "train"), val=str(root / "val"), img_size=128, batch_size=2, augment={"hflip": 0.5}
    )
    return fit_or_interrupt(folder, module, data, stop=stop, ckpt_path=ckpt)


def optimizer_by_name(module: SamflowModule, trainer: L.Trainer) -> dict[str, Any]:
    """The optimizer's state by parameter name and its group settings by group name (not by position)."""
    optimizer = trainer.optimizers[0]
    names = {id(p): n for n, p in module.named_parameters()}
    flat: dict[str, Any] = {}
    for group in optimizer.param_groups:
        for setting, value in group.items():
            if setting != "params":
                flat[f"group {group['name']}.{setting}"] = value
        for param in group["params"]:
            for name, value in optimizer.state[param].items():
                flat[f"{names[id(param)]}.{name}"] = value
    return flat


def test_a_run_resumed_with_the_keys_reordered_ends_as_the_uninterrupted_run(tmp_path):
    root = make_quickstart_data(tmp_path / "data", n_train=4, n_val=2, seed=1)
    whole = build(KEYS)
    whole_trainer = fit(tmp_path / "whole", whole, root)
    fit(tmp_path / "cut", build(KEYS), root, stop=3)
    resumed = build(KEYS[::-1])
    resumed_trainer = fit(tmp_path / "cut", resumed, root, ckpt=tmp_path / "cut" / LastCheckpoint.FILE)

    assert resumed_trainer.global_step == whole_trainer.global_step == 4
    trained = {n: p for n, p in whole.named_parameters() if p.requires_grad}
    again = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert trained.keys() == again.keys()
    assert not [n for n in trained if not torch.equal(trained[n], again[n])]
    expected, got = optimizer_by_name(whole, whole_trainer), optimizer_by_name(resumed, resumed_trainer)
    assert expected.keys() == got.keys()
    differ = [
        k
        for k, v in expected.items()
        if not (torch.equal(v, got[k]) if isinstance(v, torch.Tensor) else v == got[k])
    ]
    assert not differ, differ[:5]
    start = {n: p for n, p in build(KEYS).named_parameters() if p.requires_grad}
    assert all(not torch.equal(start[n], trained[n]) for n in ("model.plugins.tokens.tokens.weight",))


# ---- checkpoints written before: groups in the key order ----
def test_a_checkpoint_with_its_groups_in_the_key_order_loads_onto_the_same_parameters():
    """Before, the groups followed the experiment's keys (``tokens`` before ``lora``); such an optimizer
    state loads onto the same parameters, its groups matched by name, not by position."""
    order = ("tokens", "lora")
    module = build_plain({"tokens": ExtraTokens(lr=5e-3), "lora": LoRA()})
    owned = module.plugins.owned
    old = torch.optim.AdamW(
        [{"params": list(owned[key].values()), "name": key} for key in order], lr=1e-3
    )  # the groups as configure_optimizers made them before
    for param in (p for g in old.param_groups for p in g["params"]):
        param.grad = torch.randn_like(param)
    old.step()
    saved = old.state_dict()
    expected = {id(p): old.state[p]["exp_avg"].clone() for g in old.param_groups for p in g["params"]}

    optimizer = module.configure_optimizers()
    optimizer.load_state_dict(saved)
    assert [g["name"] for g in optimizer.param_groups] == list(order)
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert torch.equal(optimizer.state[param]["exp_avg"], expected[id(param)]), group["name"]
    batch = random_batch(2, prompt="box")
    out, ctx = module(batch)
    module.compute_losses(out, batch, ctx)["total"].backward()
    optimizer.step()  # the loaded state fits its parameters


def build_plain(plugins: dict[str, SamPlugin]) -> SamflowModule:
    torch.manual_seed(0)
    return SamflowModule(sam=SamSpec(variant="tiny"), plugins=plugins)


@pytest.mark.parametrize("name", ["decoder_tuning", "tokens", "lora"])
def test_a_single_plugins_group_is_as_before(name):
    """One plugin: one group named by its key, its own parameters, then those it put into SAM, then the
    SAM parts it trains, each in ``named_parameters`` order, as before (old checkpoints load by position)."""
    make = {"decoder_tuning": DecoderTuning, "tokens": ExtraTokens, "lora": LoRA}
    module = build_plain({name: make[name]()})
    plugin, sam = module.plugins[name], module.model.sam
    parts = [p for part in plugin.sam_modules_to_train() for p in sam.get_submodule(part).parameters()]
    own = [p for p in plugin.parameters() if p.requires_grad]
    injected = [p for n, p in sam.named_parameters() if p.requires_grad and "lora_" in n]
    expected = list({id(p): p for p in own + injected + parts}.values())
    (group,) = module.configure_optimizers().param_groups
    assert group["name"] == name
    assert [id(p) for p in group["params"]] == [id(p) for p in expected]


def test_reordered_keys_of_groups_of_one_size_load_each_state_onto_its_own_parameter_and_rate():
    """Two extra-token plugins: groups of one size and shape, so a state paired by position loads without
    an error; before, ``b``'s token took ``a``'s moments and ``a``'s rate after a resume with the keys
    written ``b, a``."""
    rates = {"a": 1e-3, "b": 5e-3}

    def tokens(order: tuple[str, ...]) -> SamflowModule:
        return build_plain({key: ExtraTokens(lr=rates[key], predict=key == "a") for key in order})

    module = tokens(("a", "b"))
    optimizer = module.configure_optimizers()
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.full_like(param, 1.0 if group["name"] == "a" else 100.0)
    optimizer.step()
    moments = {n: optimizer.state[p]["exp_avg"] for n, p in module.named_parameters() if p.requires_grad}

    again = tokens(("b", "a"))
    loaded = again.configure_optimizers()
    loaded.load_state_dict(optimizer.state_dict())
    names = {id(p): n for n, p in again.named_parameters()}
    for group in loaded.param_groups:
        assert group["lr"] == rates[group["name"]]
        for param in group["params"]:
            assert names[id(param)].startswith(f"model.plugins.{group['name']}.")
            assert torch.equal(loaded.state[param]["exp_avg"], moments[names[id(param)]])


def test_a_checkpoint_with_a_shared_part_in_the_first_keys_group_loads_onto_the_same_parameters():
    """Before, a SAM part two plugins train was in the group of the first key written (``parts``, not
    ``decoder``, which sorts first and so owns it now): such a state gets its layout back on load."""
    module = build_plain(plugins(("parts", "decoder")))
    sam = module.model.sam
    old_params = [*sam.mask_decoder.parameters(), *sam.prompt_encoder.parameters()]
    old = torch.optim.AdamW([{"params": old_params, "name": "parts", "lr": 1e-3}])  # "decoder": no group
    for param in old_params:
        param.grad = torch.randn_like(param)
    old.step()
    expected = {id(p): old.state[p]["exp_avg"].clone() for p in old_params}

    optimizer = module.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == ["decoder", "parts"]
    optimizer.load_state_dict(old.state_dict())
    (group,) = optimizer.param_groups
    assert group["name"] == "parts" and [id(p) for p in group["params"]] == [id(p) for p in old_params]
    assert all(torch.equal(optimizer.state[p]["exp_avg"], expected[id(p)]) for p in old_params)
    assert {id(p) for p in group["params"]} == {id(p) for p in module.parameters() if p.requires_grad}
