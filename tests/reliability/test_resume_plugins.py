"""Every built-in plugin, fit on the tiny SAM: a run interrupted mid-epoch and resumed from its
``last.ckpt`` ends with the uninterrupted run's trainable weights and optimizer state, bit for bit.

Each fit is 2 epochs of 2 steps (4 training images of the quickstart's data, batch 2, flips drawn
from the sample seeds) with one validation batch after the first epoch. The interrupted run is
stopped by an exception after step 3 (mid second epoch, as a kill there: ``last.ckpt`` is written after
every step, nothing after the exception) and resumed in a fresh module, data module and trainer,
after the process's generators were moved on. What the plugins draw is what a resume must give back:
PA-SAM's Gumbel noise (mining on from the second epoch: ``ctx.epoch`` must be the resumed one),
HQ-SAM's loss points and SAPNet's negatives (``ctx.rand``, from the sample seeds), LoRA's dropout (the
process's generator: ``RandomState``), the sample order and flips (``ResumableLoader``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import fit_or_interrupt as fit

from samflow.callbacks.resume import LastCheckpoint
from samflow.data import SegmentationDataModule
from samflow.data.quickstart import make_quickstart_data
from samflow.module import SamflowModule, SamSpec
from samflow.plugins.registry import create_plugin

STEPS, STOP = 4, 3  # 2 epochs of 2 steps; the interrupted run stops after 3 batches (step 3)
PLUGINS: dict[str, dict[str, Any]] = {  # the smallest options that still draw what the plugin draws
    "decoder_tuning": {},
    "tokens": {},
    "sam_adapter": {},
    "hq_sam": {"num_points": 256},
    "pa_sam": {"mining_start_epoch": 0},
    "ba_sam": {},
    "lora": {"dropout": 0.25},
    "wsi_sam": {},
    "sapnet": {"num_classes": 3, "hidden": 32, "num_negatives": 40},
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_quickstart_data(tmp_path_factory.mktemp("resume_plugins"), n_train=4, n_val=2, seed=1)


def make_data(root: Path, **kwargs: Any) -> SegmentationDataModule:
    args: dict[str, Any] = {"img_size": 128, "batch_size": 2, "augment": {"hflip": 0.5}}
    return SegmentationDataModule(train=str(root / "train"), val=str(root / "val"), **{**args, **kwargs})


def make_module(plugins: dict[str, dict[str, Any]], **kwargs: Any) -> SamflowModule:
    """A fresh module: SAM and plugins built from seed 0, as a resumed process builds them."""
    torch.manual_seed(0)
    return SamflowModule(
        sam=kwargs.pop("sam", SamSpec(variant="tiny")),
        plugins={key: create_plugin(key, **options) for key, options in plugins.items()},
        **kwargs,
    )


def trained(module: SamflowModule) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}


def optimizer_tensors(trainer: L.Trainer) -> dict[str, Any]:
    """The optimizer's state and group settings, flattened to ``{name: value}``."""
    state = trainer.optimizers[0].state_dict()
    flat: dict[str, Any] = {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            flat[f"state.{index}.{name}"] = value
    for index, group in enumerate(state["param_groups"]):
        for name, value in group.items():
            flat[f"group.{index}.{name}"] = value
    return flat


def assert_same_training(
    expected: tuple[SamflowModule, L.Trainer], got: tuple[SamflowModule, L.Trainer]
) -> None:
    (module_a, trainer_a), (module_b, trainer_b) = expected, got
    assert trainer_b.global_step == trainer_a.global_step
    weights_a, weights_b = module_a.state_dict(), module_b.state_dict()  # buffers too
    assert weights_a.keys() == weights_b.keys()
    changed = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    assert not changed, f"weights differ: {changed[:5]}"
    opt_a, opt_b = optimizer_tensors(trainer_a), optimizer_tensors(trainer_b)
    assert opt_a.keys() == opt_b.keys()
    differ = [
        k
        for k in opt_a
        if not (
            torch.equal(opt_a[k], opt_b[k]) if isinstance(opt_a[k], torch.Tensor) else opt_a[k] == opt_b[k]
        )
    ]
    assert not differ, f"optimizer state differs: {differ[:5]}"


def uninterrupted_and_resumed(
    tmp_path: Path,
    plugins: dict[str, dict[str, Any]],
    data: Any,
    *,
    stop: int = STOP,
    module_args: dict[str, Any] | None = None,
    callbacks: Any = tuple,
    **trainer: Any,
) -> tuple[tuple[SamflowModule, L.Trainer], tuple[SamflowModule, L.Trainer]]:
    """The uninterrupted fit, and the fit stopped after ``stop`` batches and resumed from its ``last.ckpt``.
    ``data()`` and ``callbacks()`` build fresh ones for each run, as a new process would."""
    args = module_args or {}
    whole = make_module(plugins, **args)
    whole_trainer = fit(tmp_path / "whole", whole, data(), callbacks=callbacks(), **trainer)
    fit(tmp_path / "cut", make_module(plugins, **args), data(), stop=stop, callbacks=callbacks(), **trainer)
    resumed = make_module(plugins, **args)
    resumed_trainer = fit(
        tmp_path / "cut", resumed, data(), ckpt_path=tmp_path / "cut" / LastCheckpoint.FILE,
        callbacks=callbacks(), **trainer,
    )  # fmt: skip
    return (whole, whole_trainer), (resumed, resumed_trainer)


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_every_builtin_plugin_resumes_to_the_uninterrupted_weights_and_optimizer(tmp_path, data_root, name):
    whole, resumed = uninterrupted_and_resumed(tmp_path, {name: PLUGINS[name]}, lambda: make_data(data_root))
    assert whole[1].global_step == STEPS
    assert_same_training(whole, resumed)
    # the weights moved: equal weights are not two untrained copies
    start = trained(make_module({name: PLUGINS[name]}))
    assert any(not torch.equal(start[k], v) for k, v in trained(whole[0]).items())


def test_the_hyperparameters_of_a_module_built_in_python_load_with_weights_only(tmp_path):
    """Lightning resumes with torch.load's default ``weights_only=True``; a module built in Python keeps
    its ``SamSpec`` in its hyperparameters (the CLI keeps a dict), which torch refused by class name."""
    module = make_module({"decoder_tuning": {}})
    assert isinstance(module.hparams["sam"], SamSpec)
    torch.save({"hyper_parameters": dict(module.hparams)}, tmp_path / "hparams.ckpt")
    loaded = torch.load(tmp_path / "hparams.ckpt", weights_only=True)
    assert loaded["hyper_parameters"]["sam"] == module.hparams["sam"]


def test_samspec_stays_allowed_after_a_run_is_read_back(tmp_path):
    """``read_checkpoint_state`` (``Predictor.from_run``, export) used torch's ``safe_globals`` context,
    which on leaving removed SamSpec from the process's allowed classes: a resume after it failed."""
    from samflow.rebuild import read_checkpoint_state

    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "hyper_parameters": {"sam": SamSpec()}}, path)
    read_checkpoint_state(path)
    with torch.serialization.safe_globals([]):
        pass
    assert SamSpec in torch.serialization.get_safe_globals()
    assert torch.load(path, weights_only=True)["hyper_parameters"]["sam"] == SamSpec()
