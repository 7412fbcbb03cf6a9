"""Checks of a parsed ``samflow fit|validate|test|predict`` config, before anything is built.

``ConfigError``: a class of the experiment refused its arguments, or two settings cannot run together
(one ``samflow: error:`` line); ``check_plugin_classes``: a plugin entry without its ``class_path``;
``several_processes``: whether Lightning's ``auto`` strategy would start DDP (``SamflowCLI`` then makes
it ``ddp_find_unused_parameters_true``); ``optimizer_into_model``: LightningCLI's ``--optimizer`` and
``--lr_scheduler`` become the module's; ``check_before_build``: what the config alone shows cannot run
(data framed at another size than SAM's input, a fit with nothing to train, no loss term, a plateau
scheduler ranking the checkpoint's metric the other way) and data folders the data module would refuse
(listed, no file opened), refused before SAM is built and before a run folder is made.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from jsonargparse import Namespace

from samflow.module import (
    ModelConfigError,
    input_size_error,
    no_loss_terms,
    nothing_to_train,
    plateau_monitor,
)
from samflow.plugins.base import SamPlugin
from samflow.sam.backbones import BACKBONES
from samflow.sam.build import BACKBONE_DECODER, VARIANTS

__all__ = [
    "ConfigError",
    "check_before_build",
    "check_plugin_classes",
    "optimizer_into_model",
    "several_processes",
]


class ConfigError(ValueError):
    """A class of the experiment (model, plugin, data, trainer) refused its arguments."""


def check_plugin_classes(config: Namespace) -> None:
    """Refuse a plugin entry that is ``SamPlugin`` itself, the base class that does nothing.

    jsonargparse makes an entry with ``init_args`` and no ``class_path`` the base class, so a misspelt
    key (``--model.plugins.tokenz.init_args.lr 1e-4``, or ``tokenz: {init_args: ...}`` in a later
    ``--config``) would add a plugin that does nothing and leave the plugin meant unchanged.
    """
    plugins = config.get("model.plugins") or {}
    bare = [
        key
        for key, spec in plugins.items()
        if isinstance(spec, Namespace)
        and str(spec.get("class_path")) in ("samflow.SamPlugin", f"{SamPlugin.__module__}.SamPlugin")
    ]
    if not bare:
        return
    named = [key for key in plugins if key not in bare]
    close = difflib.get_close_matches(bare[0], named, n=1)
    hint = f"did you mean model.plugins.{close[0]}? " if close else ""
    raise ConfigError(
        f"model.plugins.{bare[0]} has no class_path (only options), so it is not one of the experiment's "
        f"plugins ({', '.join(named) or 'none'}): {hint}To add a plugin, give "
        f"model.plugins.{bare[0]}.class_path."
    )


def optimizer_into_model(config: Namespace) -> None:
    """``--optimizer`` / ``--lr_scheduler`` (LightningCLI's) set ``model.optimizer`` / ``model.scheduler``.

    LightningCLI ignored a ``--lr_scheduler`` given alone and, with ``--optimizer``, replaced the module's
    optimizer by one group of every parameter (frozen SAM included) without the plugins' own ``lr`` /
    ``weight_decay``, and without the check that a resumed optimizer's groups are the plugins'.
    """
    for flag, key in (("optimizer", "model.optimizer"), ("lr_scheduler", "model.scheduler")):
        if config.get(flag):
            config[key], config[flag] = config[flag], None


def several_processes(config: Any) -> bool:
    """Whether Lightning's 'auto' strategy would start DDP (several devices or nodes)."""
    devices = config.get("trainer.devices")
    if isinstance(devices, str):
        devices = (
            int(devices)
            if devices.lstrip("-").isdigit()
            else (devices.count(",") + 1 if "," in devices else 1)
        )
    count = len(devices) if isinstance(devices, (list, tuple)) else devices
    return count == -1 or (isinstance(count, int) and count > 1) or (config.get("trainer.num_nodes") or 1) > 1


def check_before_build(config: Namespace, command: str) -> None:
    """Refuse what the parsed config alone shows cannot run, before SAM is built (20 s for ``vit_b`` on a
    CPU) and before a run folder is made: ``SamflowModule`` found these at setup or at the sanity check.

    - ``data.init_args.img_size`` other than SAM's input side (``model.sam.img_size``, else the variant's);
    - ``fit`` without a plugin (nothing can train; plugins whose parameters all stay frozen are still
      found at setup);
    - ``model.losses: {}`` with no plugin that brings loss terms (one overriding ``SamPlugin.losses``):
      ``fit``, ``validate`` and ``test`` compute the loss; a plugin that can turn its loss off is still
      checked at the first batch;
    - ``predict`` with ``--predictions.resume`` and ``--predictions.overwrite``, or without data, or into a
      ``--predictions.output_dir`` that another live samflow process writes into now (``check_output_dir_free``);
    - ``fit`` with a ``ReduceLROnPlateau`` without a monitor of its own, which would watch the checkpoint's
      monitor ranked in another mode (``plateau_monitor``, asked again by ``configure_optimizers``);
    - ``fit``, ``validate`` and ``test`` on ``SegmentationDataModule`` data whose folders its ``setup``
      would refuse (missing, empty, images without masks): listed, no file opened
      (``SegmentationDataModule.list_before_build``; its ``DataError``).
    """
    _check_input_size(config)
    plugins = config.get("model.plugins") or {}
    if command == "fit" and not plugins:
        raise ConfigError(nothing_to_train([]))
    if command == "predict":
        from samflow.callbacks.mask_writer import check_output_dir_free, check_resume_options

        resume, overwrite = (bool(config.get(f"predictions.{key}")) for key in ("resume", "overwrite"))
        check_resume_options(resume, overwrite, config.get("data") is not None)
        check_output_dir_free(config.get("predictions.output_dir"))
    losses = config.get("model.losses")
    evaluates = command in ("fit", "validate", "test")  # the loss of every batch with a mask
    if evaluates and losses == {} and not any(_may_add_losses(spec) for spec in plugins.values()):
        raise ConfigError(no_loss_terms(list(plugins)))
    if command == "fit":
        _check_plateau(config)
    if command in ("fit", "validate", "test"):  # the config's own mistakes first: its data's folders last
        _list_data(config, command)


def _check_input_size(config: Namespace) -> None:
    data = config.get("data")
    options = data.get("init_args") if isinstance(data, Namespace) else None
    size = options.get("img_size") if isinstance(options, Namespace) else None
    variant = config.get("model.sam.variant") or "vit_b"
    if not isinstance(size, int) or isinstance(size, bool) or not isinstance(variant, str):
        return
    if size <= 0 or size % 4:  # no frame at all: the data module names what it takes
        return
    if variant not in VARIANTS and variant not in BACKBONES:  # refused when SAM is built
        return
    given = config.get("model.sam.img_size")
    sam = given if isinstance(given, int) else VARIANTS.get(variant, BACKBONE_DECODER).img_size
    if size != sam:
        raise ConfigError(input_size_error(size, sam, variant, isinstance(given, int)))


def _list_data(config: Namespace, command: str) -> None:
    """``SegmentationDataModule.list_before_build`` of ``data`` when it is that class (a subclass may
    take other options or list otherwise: its ``setup`` checks its folders)."""
    from samflow.data.datamodule import SegmentationDataModule

    data = config.get("data")
    options = data.get("init_args") if isinstance(data, Namespace) else None
    if _class_of(data) is SegmentationDataModule and isinstance(options, Namespace):
        stage = "fit" if command == "fit" else command
        SegmentationDataModule.list_before_build(options.as_dict(), stage)


def _check_plateau(config: Namespace) -> None:
    """``plateau_monitor`` of ``model.scheduler`` when it is a ``ReduceLROnPlateau`` and the checkpoint
    it would watch is known here: ``checkpoint.monitor`` (else the main metric ``SamflowCLI`` gives it) and
    ``checkpoint.mode``, with checkpointing on and no checkpoint callback of the user's in
    ``trainer.callbacks`` (which one the module sees is then known only to the trainer)."""
    import torch

    from samflow.main_metric import main_metric

    spec = config.get("model.scheduler")
    options = spec.get("init_args") if isinstance(spec, Namespace) else None
    cls = _class_of(spec)
    if not isinstance(cls, type) or not issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return
    if not isinstance(options, Namespace) or not isinstance(options.get("mode"), str):
        return
    if config.get("trainer.enable_checkpointing") is False:
        return
    from lightning.pytorch.callbacks import Checkpoint

    callbacks = config.get("trainer.callbacks") or []
    if any(not isinstance(c, Namespace) or _class_of(c) is None for c in callbacks):
        return  # a callback not known here: may be a checkpoint
    if any(isinstance(_class_of(c), type) and issubclass(_class_of(c), Checkpoint) for c in callbacks):
        return
    monitor, mode = config.get("checkpoint.monitor"), config.get("checkpoint.mode")
    if monitor is None:
        found = main_metric(config.get("model.metrics"), config.get("data"))
        if found is None:
            return  # the run's checkpoint monitor is not known here: configure_optimizers asks
        monitor, mode = found
    try:
        plateau_monitor(options.get("monitor"), options.get("mode"), monitor, mode)
    except ModelConfigError as err:
        raise ConfigError(str(err)) from None


def _class_of(spec: Any) -> Any:
    """The class a ``{class_path, init_args}`` entry names, or None when it cannot be imported here."""
    path = str(spec.get("class_path") or "") if isinstance(spec, Namespace) else ""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _may_add_losses(spec: Any) -> bool:
    """Whether a ``model.plugins`` entry may add loss terms: its class overrides ``SamPlugin.losses``
    (or cannot be read here: the model then checks the terms at the first batch)."""
    cls = _class_of(spec)
    return not (isinstance(cls, type) and issubclass(cls, SamPlugin)) or cls.losses is not SamPlugin.losses
