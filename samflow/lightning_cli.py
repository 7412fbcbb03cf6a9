"""samflow's LightningCLI: the module, any data module, and the run's default loggers and callbacks."""

from __future__ import annotations

import sys
import typing
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from samflow.argument_errors import first_not_from_jsonargparse, unknown_option
from samflow.callbacks import ImprovementReport, MaskWriter, NonFiniteCheck, SampleGrid, TestReport
from samflow.callbacks.accumulation import AccumulatedGradients
from samflow.callbacks.resume import BestCheckpoint, LastCheckpoint, PlateauResume, RandomState, SlurmRequeue
from samflow.callbacks.resume_config import SameExperiment, check_fit_config, training_settings
from samflow.callbacks.run_folder import RunCSVLogger, RunInfo, read_run_info, remove_unwritten, run_folder_of
from samflow.callbacks.run_report import RunReport
from samflow.callbacks.wandb_run import SamflowWandbLogger
from samflow.config_checks import (
    ConfigError,
    check_before_build,
    check_plugin_classes,
    optimizer_into_model,
    several_processes,
)
from samflow.console import RunHeader, SamflowProgressBar, local_log_dir, shown, verbosity
from samflow.keyed_config import KeyedConfigFile
from samflow.main_metric import checkpoint_filename, main_metric
from samflow.module import SamflowModule
from samflow.plugins.base import SamPlugin
from samflow.plugins.checks import describe
from samflow.plugins.registry import PluginError, discover
from samflow.run_placement import place_run


class SaveConfig(SaveConfigCallback):
    """Write the resolved config to the run folder and attach it to the W&B run; a validate / test /
    predict of a fit's checkpoint logs into the fit's W&B run and leaves the fit's config there."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # a validate / test / predict's run folder (trainer.ckpt_path is not set yet)
        run = run_folder_of(self.config.get("ckpt_path")) if stage != "fit" else None
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                if run is not None and read_run_info(run).get("wandb_id") == logger.version:
                    continue
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


class SamflowCLI(LightningCLI):
    """LightningCLI with samflow's defaults.

    Runs are written to ``runs/<experiment>/version_N`` (CSV metrics, checkpoints, the resolved
    config, sample grids, ``run.json`` with the W&B id) and to W&B (offline without credentials). A
    ``--ckpt_path`` in a run's ``checkpoints/`` folder (or ``--resume RUN|last``) reuses that run: fit
    continues it exactly, validate / test / predict write ``<run>/<command>[_N]`` (``samflow.run_placement``).
    The callbacks are configurable under ``checkpoint`` (BestCheckpoint, a ModelCheckpoint monitoring
    the main validation metric, ``main_metric``), ``last`` (LastCheckpoint: ``last.ckpt`` every N
    steps and at epoch ends), ``samples``, ``predictions``,
    ``report``, ``test_report`` and ``non_finite`` (NonFiniteCheck: a NaN or infinite loss or gradient
    stops the run before the optimizer step, or ``--non_finite.action skip`` skips and counts it).
    """

    def __init__(
        self,
        run_name: str,
        args: list[str] | None = None,
        before_build: Callable[[Namespace], object] | None = None,
        **kwargs: Any,
    ) -> None:
        self.run_name = run_name
        # given the parsed config once it is checked, before any class is built (``build_experiment``)
        self._before_build = before_build
        discover()  # import every working plugin so configs can name plugin classes by their short name
        # A bad option raises jsonargparse's ArgumentError (``samflow.cli.main`` makes it one line)
        # instead of printing the whole usage and exiting with status 2.
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("exit_on_error", False)
        super().__init__(
            SamflowModule,
            LightningDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveConfig,
            save_config_kwargs={"overwrite": True},
            args=args,
            parser_kwargs=parser_kwargs,
            **kwargs,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """LightningCLI's parsing; an unknown option set in a ``--config`` file names the file and its full
        key, with the closest option (``unknown_option``)."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            given = (
                [str(a) for a in (sys.argv[1:] if args is None else args)]
                if not isinstance(args, dict)
                else []
            )
            subcommands = getattr(parser, "_subcommands_action", None)
            choices = getattr(subcommands, "choices", None) or {}
            sub = choices.get(given[0]) if given else None
            options = [str(a.dest) for a in (sub or parser)._actions]
            located = unknown_option(str(err), given, options)
            if located is None:
                raise
            raise ConfigError(f"{located} (`samflow {given[0]} --help` lists the options)") from err

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """LightningCLI's parser, with ``--config`` merging plugin maps by key (``KeyedConfigFile``)."""
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={pl.__version__}"])
        parser = self.parser_class(**kwargs)
        parser.add_argument(
            "-c",
            "--config",
            action=KeyedConfigFile,
            help="Path to a configuration file in json or yaml format. Several are read in order; a later "
            "file overrides an earlier one, and adds to or changes its model.plugins by key.",
        )
        return parser

    def instantiate_classes(self) -> None:
        """Build the model, plugins, data and trainer; an argument they refuse is one clear error.

        jsonargparse wraps a constructor's ``ValueError`` / ``TypeError`` in its own union-type
        messages; the user needs the outermost one it did not raise, which is samflow's when samflow
        wrapped a cause with the key (``model.losses.dice: ...``), else the constructor's own.
        """
        try:
            self._instantiate_classes()
        except BaseException:  # a model, data or trainer that cannot be built writes nothing
            self._remove_unwritten_command_folder()
            raise

    def _instantiate_classes(self) -> None:
        from samflow.cli import user_errors

        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            chain: BaseException | None = err
            while chain is not None:  # samflow's own error (e.g. a bad SAM checkpoint) names the file
                if isinstance(chain, user_errors()):
                    raise chain from (chain.__cause__ or err)  # its own cause: the plugin's frame
                chain = chain.__cause__
            cause = first_not_from_jsonargparse(err)
            raise ConfigError(f"{type(cause).__name__}: {cause}" if cause is not err else str(err)) from err

    def _add_instantiators(self) -> None:
        super()._add_instantiators()
        self.parser.add_instantiator(self._instantiate_plugin, SamPlugin, subclasses=True)

    def _instantiate_plugin(self, cls: type[SamPlugin], *args: Any, **kwargs: Any) -> SamPlugin:
        """A plugin's constructor; what it raises is named with the plugin's key and class (one line)."""
        try:
            return cls(*args, **kwargs)
        except Exception as err:  # any error of the plugin's own code, named with the plugin
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            plugins = (config.get("model.plugins") if config is not None else None) or {}
            keys = [  # the entries of this class (a class path may name a re-export of it)
                k
                for k, v in plugins.items()
                if isinstance(v, Namespace) and str(v.get("class_path")).rpartition(".")[2] == cls.__name__
            ]
            same = [k for k in keys if dict(plugins[k].get("init_args") or {}) == kwargs]
            key = (same or keys or ["?"])[0]
            raise PluginError(f"{describe(key, cls)}: {type(err).__name__}: {err}") from err

    _random_seed = False  # seed_everything was true: LightningCLI drew a seed, a resume takes the run's
    _resume_checked = False  # the fit's checkpoint was compared with its config (resume_config)

    def _set_seed(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        self._random_seed = config is not None and config.get("seed_everything") is True
        super()._set_seed()

    def before_instantiate_classes(self) -> None:
        """Plain ``ddp`` becomes ``ddp_find_unused_parameters_true``.

        Trained SAM parts are often partly unused by a step's loss (SAM's IoU head, the multimask
        hypernetworks with single-mask output), which plain DDP rejects.
        """
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        strategy = config.get("trainer.strategy")
        if strategy == "ddp" or (strategy == "auto" and several_processes(config)):
            config["trainer.strategy"] = "ddp_find_unused_parameters_true"
            rank_zero_info(f"samflow: using strategy 'ddp_find_unused_parameters_true' for {strategy!r}.")
        if config.get("checkpoint.save_last"):
            raise ConfigError(
                "--checkpoint.save_last: samflow's LastCheckpoint already writes checkpoints/last.ckpt (at "
                "every epoch end and every --last.every_n_train_steps steps); drop --checkpoint.save_last, "
                "which would write the same file a second time."
            )
        optimizer_into_model(config)
        check_plugin_classes(config)
        if self.subcommand:  # samflow's own commands (embed, student, ...) check what they use themselves
            check_before_build(config, self.subcommand)
        if self._before_build is not None:  # such a command's own check (``build_experiment``)
            self._before_build(config)
        self.run_folder, self._command_folder = place_run(config, self.subcommand or "fit", self.run_name)
        if (self.subcommand or "fit") == "fit":
            self._resume_checked = check_fit_config(config, self._random_seed)
        self._monitor_main_metric(config)
        if self.subcommand == "test" and verbosity() != "verbose":
            config["verbose"] = False  # TestReport prints the metrics per dataset; not Lightning's table too

    run_folder: Path | None = None  # the run a --ckpt_path / --resume belongs to (``place_run``)
    _command_folder: Path | None = None  # validate / test / predict's subfolder of the run (``test_1``, ...)

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        """Run the command; one that stops before it has written anything but the files of its start
        removes the folder it claimed (``remove_unwritten``), so that the next takes its name: a new
        fit's ``version_N`` before its first training step (a data folder missing, a plugin's setup, the
        sanity check, a signal), a validate / test / predict's subfolder of the run. A resumed (or
        requeued) run's folder claimed nothing, and stays whatever happens; the W&B run is W&B's."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            trainer = getattr(self, "trainer", None)
            if trainer is not None and not trainer.global_step:
                for logger in trainer.loggers:
                    if isinstance(logger, RunCSVLogger):
                        logger.release_claim()
            self._remove_unwritten_command_folder()
            raise

    def _remove_unwritten_command_folder(self) -> None:
        """Remove the validate / test / predict subfolder of the run (claimed as it was named) while it
        holds nothing but the config files of the command's start."""
        if self._command_folder is not None:
            remove_unwritten(self._command_folder)

    def _monitor_main_metric(self, config: Namespace) -> None:
        """``checkpoint.monitor`` defaults to the experiment's main validation metric (``main_metric``)."""
        if config.get("checkpoint.monitor") is None:
            found = main_metric(config.get("model.metrics"), config.get("data"))
            if found is not None:
                config["checkpoint.monitor"], config["checkpoint.mode"] = found
        monitor = config.get("checkpoint.monitor")
        if monitor and config.get("checkpoint.filename") is None:
            config["checkpoint.filename"] = checkpoint_filename(monitor)
            config["checkpoint.auto_insert_metric_name"] = False

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        """``trainer.enable_checkpointing: false`` turns the ``checkpoint`` callback off (Lightning would refuse both)."""
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
        callbacks = [
            *callbacks,
            RandomState(),
            PlateauResume(),
            AccumulatedGradients(),
            RunInfo(self.run_name),
            SlurmRequeue(),
        ]
        checkpoint = (self.config.get(self.subcommand or "fit") or {}).get("ckpt_path")
        callbacks.append(RunHeader(self.run_name, checkpoint))
        for callback in callbacks:
            if isinstance(callback, BestCheckpoint):  # a resumed run's folder holds its own checkpoints
                callback.resuming = bool(checkpoint)
        if self.subcommand == "fit":  # training settings into every checkpoint, compared on a resume
            settings = training_settings(self.config.get("fit"))
            callbacks.append(SameExperiment(settings, self._random_seed, checked=self._resume_checked))
        elif self.subcommand in ("validate", "test", "predict"):  # writes no checkpoint
            # reads nothing (checked); without it Lightning warns that the checkpoint's callback is missing
            callbacks.append(SameExperiment({}, checked=True))
        callbacks, config = self._console(config, callbacks)
        trainer = super()._instantiate_trainer(config, callbacks)
        self._name_wandb_run(trainer)
        return trainer

    # ---- what the run prints and how W&B names it (samflow.console, samflow.callbacks.wandb_run) ----
    def _console(self, config: dict[str, Any], callbacks: list[Any]) -> tuple[list[Any], dict[str, Any]]:
        """samflow's progress bar (the run folder's version, the main metric); none when quiet."""
        from lightning.pytorch.callbacks import ProgressBar

        if verbosity() == "quiet" and config.get("enable_progress_bar") is None:
            config = {**config, "enable_progress_bar": False}
        wanted = config.get("enable_progress_bar") is not False
        given = [*callbacks, *(config.get("callbacks") or [])]
        if wanted and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, SamflowProgressBar()]
        return callbacks, config

    def _name_wandb_run(self, trainer: Trainer) -> None:
        """The W&B run is ``<experiment>/<run folder>``, tagged with the plugin classes."""
        loggers = [lg for lg in trainer.loggers if isinstance(lg, SamflowWandbLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        # a command into a run's subfolder keeps the run's name; rank 0 only: trainer.log_dir would wait
        folder = self.run_folder or local_log_dir(trainer)
        tags = [type(p).__name__ for p in getattr(self.model, "plugins", {}).values()]
        for logger in loggers:
            logger.name_run(f"{self.run_name}/{Path(folder).name}" if folder else self.run_name, tags)

    # ---- the end of a command: where its files are ----
    def after_fit(self) -> None:
        self._report("fit")

    def after_validate(self) -> None:
        self._report("validate")

    def after_test(self) -> None:
        self._report("test")

    def after_predict(self) -> None:
        self._report("predict")

    def _report(self, command: str) -> None:
        """Print the run folder, the best checkpoint with its score, and ``last.ckpt`` (rank 0)."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        log_dir = local_log_dir(trainer)
        lines = [f"samflow: {command} done; run folder {shown(log_dir or trainer.default_root_dir)}"]
        best = trainer.checkpoint_callback
        if command == "fit" and isinstance(best, ModelCheckpoint) and best.best_model_path:
            score = best.best_model_score
            value = f" ({best.monitor} {float(score):.4f})" if best.monitor and score is not None else ""
            lines.append(f"  best checkpoint {shown(best.best_model_path)}{value}")
        last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)  # type: ignore[attr-defined]
        if command == "fit" and last is not None and (last.folder(trainer) / last.FILE).is_file():
            folder = shown(log_dir or trainer.default_root_dir)
            lines.append(f"  last checkpoint {shown(last.folder(trainer) / last.FILE)} (--resume {folder})")
        ckpt = self.config_init.get(command, {}).get("ckpt_path") if command != "fit" else None
        if ckpt:
            monitor = isinstance(best, ModelCheckpoint) and best.monitor
            prefix = {"validate": "val", "test": "test"}.get(command)
            key = f"{prefix}/{monitor.split('/', 1)[1]}" if monitor and prefix and "/" in monitor else None
            measured = trainer.callback_metrics.get(key) if key else None
            result = f" ({key} {float(measured):.4f})" if measured is not None else ""
            lines.append(f"  checkpoint {shown(ckpt)}{result}")
        print("\n".join(lines), flush=True)

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path``, the experiment and its flags still define the model; the file gives weights.

        LightningCLI would overwrite ``model.sam``, ``losses``, ``metrics`` and ``threshold`` with the
        hyper-parameters saved in the checkpoint, so ``--model.sam.img_size 2048`` (evaluating at
        another resolution) or ``--model.sam.checkpoint`` (the SAM file at another path) would be
        silently ignored.
        """

    @override
    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        """LightningCLI's parser of a subcommand; ``predict`` keeps no predictions in memory by default.

        ``Trainer.predict`` returns every batch's output unless told not to, and ``predict_step``'s
        are the masks and probabilities at each image's original size (5 bytes a pixel): 100k images
        of 1024 x 1024 would hold 500 GiB. The command never uses them (``predictions``, the
        ``MaskWriter``, writes each batch's files as it comes); ``--return_predictions true`` keeps them.
        """
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.set_defaults(return_predictions=False)
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last")
        parser.add_argument(
            "--resume",
            type=typing.Optional[str],  # noqa: UP045 - jsonargparse reads the typing form
            default=None,
            help="fit only: continue a run: a run folder (its checkpoints/last.ckpt), a checkpoint, or "
            "'last' (the newest run of the experiment); the same folder and W&B run, exactly. A changed "
            "training setting (batch size, seed, plugin, loss or optimizer option) is refused.",
        )
        parser.add_lightning_class_args(SampleGrid, "samples")
        parser.add_lightning_class_args(MaskWriter, "predictions")
        parser.add_lightning_class_args(ImprovementReport, "report")
        parser.add_lightning_class_args(RunReport, "run_report")
        parser.add_lightning_class_args(TestReport, "test_report")
        parser.add_lightning_class_args(NonFiniteCheck, "non_finite")
        name = self.run_name
        parser.set_defaults(
            {
                "trainer.default_root_dir": f"runs/{name}",
                "run_report.experiment": name,
                # samflow's header lists what trains; Lightning's summary adds a meaningless FLOPs row
                "trainer.enable_model_summary": verbosity() == "verbose",
                "checkpoint.save_last": False,  # LastCheckpoint ("last") writes last.ckpt, also mid-epoch
                "trainer.logger": [
                    {
                        "class_path": "samflow.callbacks.run_folder.RunCSVLogger",
                        "init_args": {"save_dir": "runs", "name": name},
                    },
                    {
                        "class_path": "samflow.callbacks.wandb_run.SamflowWandbLogger",
                        "init_args": {"project": "samflow", "name": name, "save_dir": "runs"},
                    },
                ],
            }
        )
