"""The ``samflow`` command.

    samflow fit|validate|test|predict --experiment NAME [--quiet | --verbose] [LightningCLI overrides ...]
    samflow experiments        list experiments with their descriptions
    samflow plugins            list registered plugins and their status

``--experiment NAME`` resolves NAME (a path, ``experiments/NAME.yaml`` in the working directory, or a
packaged experiment) and is rewritten to ``--config /abs/path`` in ``sys.argv``, so DDP children
started by Lightning read the same file. The rewritten ``--config`` goes first, right after the
subcommand: every other flag and ``--config`` overrides the experiment, wherever it stands.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from samflow.argument_errors import one_line_argument_error
from samflow.commands import experiment_from_argv
from samflow.experiment_files import ExperimentError, list_experiments
from samflow.plugin_check import check_plugin_args
from samflow.process_state import restored_process_state
from samflow.requeue_hold import requeue_signal_held
from samflow.usage import CommandParser, UsageError

__all__ = ["CommandParser", "UsageError", "experiment_from_argv", "main", "user_errors"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")

# Commands beside LightningCLI's: name -> ("module:function", one-line usage). The function takes the
# arguments after the command name (less ``--quiet`` / ``--verbose``) and returns the exit status; the
# user errors it raises (``user_errors()``, ``ValueError`` subclasses of samflow), its usage errors
# (``CommandParser``) and the experiment overrides jsonargparse refuses are printed as one line, exit 1.
COMMANDS: dict[str, tuple[str, str]] = {
    "embed": (
        "samflow.embed.command:main",
        "--experiment NAME [--out DIR] [--batch-size N] [--overwrite] [overrides ...]",
    ),
    "export": (
        "samflow.export:main",
        "RUN_OR_CKPT --out DIR [--merged | --onnx [--single-mask]] [--sam-checkpoint PATH] [--overwrite]",
    ),
    "predict --prompts": (
        "samflow.prompted_predict:main",
        "FILE --model RUN_OR_CKPT --images DIR --out DIR [--format instances|labels] [--skip-bad] [--overwrite | --resume]",
    ),
    "proposals": (
        "samflow.proposals:main",
        "--experiment NAME --out DIR [--split train] [--batch-size N] [--shard-size N] [--overwrite]",
    ),
    "pseudo-masks": (
        "samflow.pseudo_masks:main",
        "--experiment NAME --ckpt CKPT --out FILE [--batch-size N] [--overwrite] [overrides ...]",
    ),
    "student": (
        "samflow.student_command:main",
        "--experiment NAME --pseudo FILE --out DIR [--images DIR] [--head YAML] [--mps-weight 0.5] [--overwrite | --resume] [overrides ...]",
    ),
    "predict-slide": (
        "samflow.wsi_predict:main",
        (
            "SLIDE... --experiment NAME --out DIR [--ckpt PATH] [--annotations FILE...] [--mpp 1.0] "
            "[--tile 1024] [--overlap 128] [overrides ...]"
        ),
    ),
    "sweep": (
        "samflow.sweep:main",
        "FILE [--backend optuna|wandb] [--trials N] [--storage URL] [--study NAME] [--summary]",
    ),
}


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input or a run that cannot go on (not a samflow bug): the commands
    print them as one ``samflow: error:`` line and exit 1 (``SAMFLOW_DEBUG=1`` shows the traceback)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from samflow.callbacks.finite import NonFiniteError
    from samflow.callbacks.monitor import MonitorError
    from samflow.callbacks.resume_config import ResumeError
    from samflow.data.errors import DataError
    from samflow.data.wsi.slide import SlideError
    from samflow.export import ExportError
    from samflow.lightning_cli import ConfigError
    from samflow.module import ModelConfigError
    from samflow.plugins.registry import PluginError
    from samflow.plugins.stack import PluginConflictError
    from samflow.predictor_types import PredictorError
    from samflow.prompt_files import PromptFileError
    from samflow.sam.build import CheckpointError
    from samflow.sam.cache import EncoderCacheError

    return (
        DataError,
        SlideError,
        ExportError,
        PredictorError,
        PromptFileError,
        CheckpointError,
        PluginError,
        PluginConflictError,
        EncoderCacheError,
        ConfigError,
        ModelConfigError,
        MonitorError,
        ResumeError,
        ExperimentError,
        UsageError,
        NonFiniteError,
        FileNotFoundError,
        MisconfigurationException,  # Lightning's word for a setting it cannot run with
    )


# ---- console ----
VERBOSITY_FLAGS = {"--quiet": "quiet", "--verbose": "verbose"}


def _verbosity_from_argv(argv: list[str]) -> list[str]:
    """Take ``--quiet`` / ``--verbose`` out of ``argv``, set the verbosity and silence the known noise.

    ``--quiet``: only warnings, errors and results (tables, where the run and its report are).
    ``--verbose``: also the third-party lines samflow silences (``samflow.console``). The verbosity goes
    into the environment (``SAMFLOW_VERBOSITY``), so DDP processes get it without the flag.
    """
    from samflow.console import set_verbosity, silence_third_party

    chosen = [VERBOSITY_FLAGS[a] for a in argv if a in VERBOSITY_FLAGS]
    if len(set(chosen)) > 1:
        raise ExperimentError("Give --quiet or --verbose, not both.")
    if chosen:
        set_verbosity(chosen[0])
    silence_third_party()
    return [a for a in argv if a not in VERBOSITY_FLAGS]


# ---- W&B ----
def wandb_credentials() -> bool:
    """Whether W&B has an API key: ``WANDB_API_KEY``, or the netrc entry ``wandb login`` writes for the
    W&B host (``WANDB_BASE_URL``'s, api.wandb.ai by default) in ``NETRC`` or ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    return netrc.is_file() and host in netrc.read_text(errors="ignore")


def configure_wandb() -> None:
    """Log offline unless the user has W&B credentials or chose a mode; never prompt."""
    if os.environ.get("WANDB_MODE") or wandb_credentials():
        return
    os.environ["WANDB_MODE"] = "offline"


# ---- listing ----
def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def cmd_plugins() -> int:
    from samflow.plugins.registry import discover

    rows = [[i.name, i.class_path, i.distribution, i.version, i.status] for i in discover().all]
    print_table(rows, ["name", "class", "distribution", "version", "status"])
    return 0


def cmd_experiments() -> int:
    rows = [[name, desc, str(path)] for name, (path, desc) in list_experiments().items()]
    print_table(rows, ["name", "description", "file"])
    return 0


def usage() -> str:
    lines = [
        "usage: samflow {fit,validate,test,predict} --experiment NAME [--quiet | --verbose] [overrides ...]",
        "       samflow experiments",
        "       samflow plugins",
        *(f"       samflow {name} {summary}" for name, (_, summary) in COMMANDS.items()),
    ]
    return "\n".join(lines) + "\n\nRun `samflow fit --help` for every option of an experiment."


def run_command(name: str, args: list[str]) -> int:
    """Run one of ``COMMANDS`` at the verbosity of ``--quiet`` / ``--verbose`` (the known noise silenced);
    its user errors, usage errors and refused experiment overrides become one line and exit 1."""
    from argparse import ArgumentError

    module, _, function = COMMANDS[name][0].partition(":")
    _keep_freed_memory()
    try:  # in a SLURM job the requeue signal is held for HELD_COMMANDS (samflow.requeue_hold)
        with requeue_signal_held(name.split()[0]), restored_process_state():  # the verbosity: this command's
            args = _verbosity_from_argv(args)
            return int(getattr(importlib.import_module(module), function)(args) or 0)
    except ArgumentError as err:  # an experiment override jsonargparse refused (the command passed it on)
        if os.environ.get("SAMFLOW_DEBUG"):
            raise
        command = name.split()[0]
        hint = (
            f"(`samflow {name} --help` lists its options; the other arguments override the experiment, "
            f"`samflow fit --help` lists them)"
        )
        return _error(f"samflow {command}: {one_line_argument_error(str(err), [command, *args], hint)}")
    except user_errors() as err:
        if os.environ.get("SAMFLOW_DEBUG"):
            raise
        return _error(str(err))
    except SystemExit as stop:
        return _stopped(stop, name.split()[0])


def _one_line_plugin_warnings() -> None:
    """Print the registry's warnings (a broken plugin, a name two distributions register) as one
    ``samflow: warning: ...`` line, without samflow's source file and line; other warnings unchanged."""
    import warnings

    default = warnings.formatwarning
    if getattr(default, "__name__", "") == "_format_plugin_warning":
        return

    def _format_plugin_warning(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
    ) -> str:
        if category.__name__ == "PluginWarning" and category.__module__ == "samflow.plugins.registry":
            return f"samflow: warning: {' '.join(str(message).split())}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = _format_plugin_warning


def _keep_freed_memory() -> None:
    """The commands that compute keep freed host memory for reuse (``samflow.host_memory``; on glibc,
    unless ``SAMFLOW_KEEP_FREED_MEMORY=0`` or the user set the allocator up themselves)."""
    from samflow.host_memory import keep_freed_memory

    keep_freed_memory()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``samflow`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    _one_line_plugin_warnings()
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] in COMMANDS:
        return run_command(args[0], args[1:])
    if args[0] == "predict" and any(a == "--prompts" or a.startswith("--prompts=") for a in args):
        return run_command("predict --prompts", args[1:])  # a trained model on prompts from a file
    prompted_only = [f for f in ("--images", "--out") if any(a == f or a.startswith(f + "=") for a in args)]
    if args[0] == "predict" and prompted_only:  # else Lightning's parser reads --model RUN as a model config
        return _error(
            f"samflow predict: {' and '.join(prompted_only)} belong to `samflow predict --prompts FILE --model "
            "RUN --images DIR --out DIR` (a trained model on prompts from a file); add --prompts, or predict an "
            "experiment's predict data with `samflow predict --experiment X --ckpt_path CKPT`."
        )
    if args[0] == "plugins":
        return cmd_plugins()
    if args[0] == "experiments":
        return cmd_experiments()
    if args[0] in ("--version", "-V"):
        from samflow import __version__

        print(f"samflow {__version__}")
        return 0
    if args[0] not in SUBCOMMANDS:
        commands = ", ".join([*SUBCOMMANDS, "experiments", "plugins", *COMMANDS])
        return _error(
            f"unknown command {args[0]!r}; choose one of {commands} (`samflow --help` shows usage)."
        )
    _keep_freed_memory()
    # in a SLURM job, SLURM's requeue signal before the fit's handler stops the fit; validate, test and
    # predict go on through it (SlurmRequeue)
    with requeue_signal_held(args[0]), restored_process_state():  # the verbosity and sys.argv: this run's
        return _run_subcommand(args)


def _run_subcommand(args: list[str]) -> int:
    """``samflow fit|validate|test|predict ...``: resolve the experiment, run LightningCLI."""
    from samflow.sweep.agent import agent_args

    try:
        args = _verbosity_from_argv(args)
        args, name = experiment_from_argv(args)
        args = agent_args(args, name)  # W&B agent's value forms (--a=None) and its runs' folders
        check_plugin_args(args)
    except ExperimentError as err:
        return _error(str(err))
    # DDP children re-run sys.argv: give them the resolved config path.
    sys.argv = [sys.argv[0], *args]
    from argparse import ArgumentError

    try:
        flags = _class_help_flags(args)
        if flags:
            return _class_help(args, name or "samflow", *flags)
        run_cli(args, name or "samflow")
    except ArgumentError as err:  # a bad option or value: jsonargparse's message, made one line
        if os.environ.get("SAMFLOW_DEBUG"):
            raise
        return _error(one_line_argument_error(str(err), args))
    except user_errors() as err:
        # Bad input (a file, key or plugin) or a diverged run: one clear line, no traceback.
        # SAMFLOW_DEBUG=1 shows it.
        if os.environ.get("SAMFLOW_DEBUG"):
            raise
        return _error(str(err))
    except SystemExit as stop:
        return _stopped(stop, args[0])
    return 0


def _stopped(stop: SystemExit, command: str) -> int:
    """The status of a command that Lightning stopped after a SIGTERM (a scheduler's time limit or
    ``scancel``, SLURM's preemption): 1 with one line saying so (``LastCheckpoint`` adds where the fit can
    continue from). Lightning's ``SIGTERMException`` is a ``SystemExit`` without a code, which made the
    process exit with status 0, as if the run had ended. Any other ``SystemExit`` goes on."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if not isinstance(stop, SIGTERMException):
        raise stop
    notes = [note for note in getattr(stop, "__notes__", []) if note]
    return _error(" ".join(notes) if notes else f"{command} stopped by SIGTERM.")


PLUGIN_HELP = "--model.plugins.help"
#: ``--data.init_args.NAME.help CLASS`` (``prompt``, ``eval_prompt``, ``augment``)
_DATA_HELP = re.compile(r"--data\.init_args\.(\w+)\.help(?:=|$)")


def _class_help_flags(args: list[str]) -> tuple[str, str, str] | None:
    """For a class's help flag among ``args``: that flag, the option prefix jsonargparse writes in its
    help and the prefix of the flags that set those options. jsonargparse drops the path above the
    class's own key, so it writes ``--model.plugins.OPTION`` and ``--prompt.OPTION``, flags no run
    accepts."""
    for arg in args:
        if arg == PLUGIN_HELP or arg.startswith(PLUGIN_HELP + "="):
            return PLUGIN_HELP, "--model.plugins.", "--model.plugins.<key>.init_args."
        nested = _DATA_HELP.match(arg)
        if nested:
            key = f"data.init_args.{nested[1]}"
            return f"--{key}.help", f"--{nested[1]}.", f"--{key}.init_args."
    return None


def _class_help(args: list[str], name: str, flag: str, shown: str, real: str) -> int:
    """``--model.plugins.help CLASS``, ``--data.init_args.prompt.help CLASS``, ...: jsonargparse's help
    for the class, with its options written as the flags that set them (``shown`` -> ``real``:
    ``--model.plugins.<key>.init_args.OPTION``, ``--data.init_args.prompt.init_args.OPTION``)."""
    import io

    captured = io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(captured):
        try:
            run_cli(args, name)
        except SystemExit as done:
            code = done.code
    text = captured.getvalue().replace(shown, real)
    sys.stdout.write(text.replace(f"{real}help", flag))
    return code if isinstance(code, int) else 1


def _error(message: str) -> int:
    """Print ``samflow: error: message`` on one line; every error exits with status 1.

    The line and its newline go out in one write, so the lines of DDP ranks that fail together
    (sharing one stderr) never run into each other; ``print`` writes the newline separately.
    """
    sys.stderr.write(f"samflow: error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return 1


def run_cli(args: list[str], run_name: str) -> Any:
    """Run LightningCLI with samflow's module, defaults and callbacks (W&B offline without an account,
    ``configure_wandb``). The run's settings end with it, for whatever runs next in the process (a
    sweep's or a test's next fit): the process is left as found (``restored_process_state``), and the
    W&B run, which the next run's logger would reuse, is finished."""
    from samflow.lightning_cli import SamflowCLI

    with restored_process_state():
        configure_wandb()
        failed = True
        try:
            # ``main`` has put ``args`` in sys.argv already (for DDP children); passing them twice only
            # makes LightningCLI warn that it got both.
            cli = SamflowCLI(run_name=run_name, args=None if args == sys.argv[1:] else args)
            failed = False
            return cli
        finally:
            wandb = sys.modules.get("wandb")
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.finish(exit_code=1 if failed else 0)


if __name__ == "__main__":
    raise SystemExit(main())
