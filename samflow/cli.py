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

import difflib
import importlib
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from samflow.usage import CommandParser, UsageError

if TYPE_CHECKING:
    from samflow.plugins.registry import PluginInfo

__all__ = ["CommandParser", "UsageError", "main"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")

# Commands beside LightningCLI's: name -> ("module:function", one-line usage). The function takes the
# arguments after the command name (less ``--quiet`` / ``--verbose``) and returns the exit status; the
# user errors it raises (``_user_errors()``, ``ValueError`` subclasses of samflow), its usage errors
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
        "FILE --model RUN_OR_CKPT --images DIR --out DIR [--format instances|labels] [--skip-bad] [--overwrite]",
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
        "samflow.student:main",
        "--experiment NAME --pseudo FILE --out DIR [--images DIR] [--head YAML] [--mps-weight 0.5] [overrides ...]",
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


def _user_errors() -> tuple[type[Exception], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from samflow.callbacks.finite import NonFiniteError
    from samflow.callbacks.monitor import MonitorError
    from samflow.data.folder import DataError
    from samflow.export import ExportError
    from samflow.lightning_cli import ConfigError
    from samflow.module import ModelConfigError
    from samflow.plugins.registry import PluginError
    from samflow.plugins.stack import PluginConflictError
    from samflow.predictor import PredictorError
    from samflow.prompted_predict import PromptFileError
    from samflow.sam.build import CheckpointError
    from samflow.sam.cache import EncoderCacheError

    return (
        DataError,
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
        ExperimentError,
        UsageError,
        NonFiniteError,
        FileNotFoundError,
        MisconfigurationException,  # Lightning's word for a setting it cannot run with
    )


def _packaged_experiments() -> Path:
    """The experiments shipped with samflow.

    They live in the top-level ``experiments/`` folder of the repository. A wheel installs them as
    ``samflow/experiments/`` (pyproject.toml maps the package ``samflow.experiments`` to that folder);
    a source checkout (an editable install) reads the folder itself.
    """
    package = Path(__file__).resolve().parent
    installed = package / "experiments"
    if installed.is_dir():
        return installed
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "experiments").is_dir():
        return checkout / "experiments"
    return installed  # missing: `samflow experiments` lists only ./experiments


PACKAGED = _packaged_experiments()


class ExperimentError(ValueError):
    """An experiment cannot be found or names something that cannot be used."""


# ---- experiments ----
def experiment_dirs() -> list[Path]:
    """Where experiments are looked up, first match wins: ./experiments, then the packaged ones."""
    return [Path.cwd() / "experiments", PACKAGED]


def list_experiments() -> dict[str, tuple[Path, str]]:
    """Experiment name -> (file, one-line description from its ``# description:`` line)."""
    found: dict[str, tuple[Path, str]] = {}
    for folder in experiment_dirs():
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            found.setdefault(path.stem, (path, describe(path)))
    return found


def describe(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# description:"):
            return line.split(":", 1)[1].strip()
    return ""


def resolve_experiment(name: str) -> Path:
    """The YAML file for ``name``: a path, or an experiment name from ``experiment_dirs()``."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ExperimentError(f"Experiment file {str(path)!r} does not exist.")
        return path.resolve()
    known = list_experiments()
    if name not in known:
        names = ", ".join(sorted(known)) or "none"
        raise ExperimentError(
            f"No experiment named {name!r}. Known experiments: {names}. "
            "Pass a YAML path, or run `samflow experiments` to list them."
        )
    return known[name][0].resolve()


def check_plugins(config_path: Path) -> None:
    """Fail early, naming the distribution, when an experiment uses a plugin that is broken or unknown."""
    config = yaml.safe_load(config_path.read_text()) or {}
    plugins = ((config.get("model") or {}).get("plugins")) if isinstance(config, dict) else None
    if not isinstance(plugins, (dict, type(None))):
        raise ExperimentError(f"{config_path}: model.plugins must be a mapping of name -> plugin.")
    for key, spec in (plugins or {}).items():
        target = spec.get("class_path") if isinstance(spec, dict) else spec if isinstance(spec, str) else None
        if isinstance(spec, dict) and not target and "init_args" not in spec:
            raise ExperimentError(f"{config_path}: model.plugins.{key} needs a class_path.")
        if target:
            check_plugin_target(f"{config_path}: model.plugins.{key}.class_path", str(target))


def check_plugin_target(where: str, target: str) -> None:
    """Refuse a plugin ``class_path`` that is broken (naming its distribution), ambiguous (naming both
    candidates) or unknown (naming the closest).

    A full class path names one class. A short class name is what jsonargparse resolves among the
    plugin classes that loaded: one working match is used (a broken one of the same name does not
    matter), two are ambiguous, a broken one alone is refused with its distribution.
    """
    from samflow.plugins.registry import ambiguous, discover

    registry = discover().all
    exact = [info for info in registry if info.class_path == target]
    if exact:
        _refuse_broken(where, exact[0])
        return
    same_class = {info.class_path: info for info in registry if _short(info) == target}
    working = [info for info in same_class.values() if info.cls is not None]
    if len(working) > 1:
        candidates = " and ".join(info.origin for info in working)
        raise ExperimentError(
            f"{where}: plugin class name {target!r} is ambiguous: {candidates}; "
            "write the full class path of the one you mean."
        )
    if working:
        return
    if same_class:
        _refuse_broken(where, next(iter(same_class.values())))
    registrations = ambiguous(target)
    if registrations:
        raise ExperimentError(
            f"{where}: plugin name {target!r} is ambiguous: it is registered by {registrations}; "
            "write the full class path of the one you mean."
        )
    named = [info for info in registry if info.name == target]
    if named:
        _refuse_broken(where, named[0])
        short = _short(named[0])
        clear = sum(_short(info) == short and info.cls is not None for info in registry) == 1
        raise ExperimentError(
            f"{where} is the plugin name {target!r}; write its class instead: "
            f"class_path: {short if clear else named[0].class_path}"
        )
    if "." in target and _importable(where, target):
        return  # a class outside the registry: jsonargparse checks that it is a SamPlugin
    short_of = {}
    for info in registry:
        for name in (info.name, _short(info), info.class_path):
            short_of[name] = _short(info)
    close = difflib.get_close_matches(target, list(short_of), n=6, cutoff=0.5)
    close += difflib.get_close_matches(target.rsplit(".", 1)[-1], list(short_of), n=6, cutoff=0.5)
    suggestions = list(dict.fromkeys(short_of[name] for name in close))[:3]
    hint = f"Did you mean {', '.join(suggestions)}? " if suggestions else ""
    known = ", ".join(sorted({_short(info) for info in registry})) or "none"
    raise ExperimentError(
        f"{where}: no samflow plugin {target!r}. {hint}Registered plugin classes: {known} "
        "(`samflow plugins` lists them; install the package that provides it)."
    )


def _short(info: PluginInfo) -> str:
    return info.class_path.rsplit(".", 1)[-1]


def _refuse_broken(where: str, info: PluginInfo) -> None:
    if info.cls is None:
        raise ExperimentError(
            f"{where} uses plugin {info.name!r} from distribution {info.distribution!r} {info.version}, "
            f"which failed to load: {info.error}. Reinstall or fix that package, or remove the plugin."
        )


def _importable(where: str, target: str) -> bool:
    """Whether ``module.attr`` exists; a module that exists but fails to import is an error naming it."""
    from samflow.plugins.registry import import_failure

    module, _, attr = target.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(f"{err.name}.")):
            return False  # no such module: "no samflow plugin" names the registered ones
        reason = import_failure(err)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - the module's own failure (SystemExit too), in one line
        reason = import_failure(err)
    raise ExperimentError(
        f"{where}: module {module!r} of plugin class {target!r} fails to import: {reason}. "
        "Install what it needs or fix the module."
    )


def check_plugin_args(args: list[str]) -> None:
    """``check_plugins`` for every ``--config`` file and every plugin flag on the command line."""
    i = 0
    while i < len(args):
        arg, value = args[i], None
        if "=" in arg and arg.startswith("-"):
            arg, value = arg.split("=", 1)
        elif i + 1 < len(args):
            value = args[i + 1]
        i += 1
        if value is None:
            continue
        if arg in ("-c", "--config"):
            if Path(value).is_file():
                check_plugins(Path(value))
        elif arg == "--model.plugins":
            try:
                plugins = yaml.safe_load(value)
            except yaml.YAMLError:
                continue  # jsonargparse reports it
            if isinstance(plugins, dict):
                for key, spec in plugins.items():
                    target = spec.get("class_path") if isinstance(spec, dict) else spec
                    if isinstance(target, str):
                        check_plugin_target(f"--model.plugins: {key}.class_path", target)
        elif re.fullmatch(r"--model\.plugins\.[^.]+(\.class_path)?", arg) and not value.startswith("-"):
            try:
                spec = yaml.safe_load(value) if value.lstrip().startswith("{") else value
            except yaml.YAMLError:
                continue  # jsonargparse reports it
            target = spec.get("class_path") if isinstance(spec, dict) else spec
            if isinstance(target, str):
                check_plugin_target(arg if isinstance(spec, str) else f"{arg}.class_path", target)


def _experiment_from_argv(argv: list[str]) -> tuple[list[str], str | None]:
    """Replace ``--experiment NAME`` (or ``--experiment=NAME``) by ``--config /abs/path``.

    ``argv`` starts with the subcommand. The experiment's ``--config`` moves to the front, right after
    it, so that every flag and every other ``--config`` overrides the experiment, also those given
    before ``--experiment`` (jsonargparse applies arguments in order).
    """
    out: list[str] = []
    configs: list[str] = []
    name = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--experiment" or arg.startswith("--experiment="):
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            else:
                raise ExperimentError("--experiment needs a name or a YAML path.")
            path = resolve_experiment(value)
            check_plugins(path)
            name = path.stem
            configs += ["--config", str(path)]
        else:
            out.append(arg)
        i += 1
    if configs and out and not out[0].startswith("-"):
        return [out[0], *configs, *out[1:]], name
    return configs + out, name


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
def configure_wandb() -> None:
    """Log offline unless the user has W&B credentials or chose a mode; never prompt."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
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
    try:
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
    except _user_errors() as err:
        if os.environ.get("SAMFLOW_DEBUG"):
            raise
        return _error(str(err))


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
    if args[0] == "plugins":
        return cmd_plugins()
    if args[0] == "experiments":
        return cmd_experiments()
    if args[0] in ("--version", "-V"):
        from samflow import __version__

        print(f"samflow {__version__}")
        return 0
    from samflow.sweep.agent import agent_args

    if args[0] not in SUBCOMMANDS:
        commands = ", ".join([*SUBCOMMANDS, "experiments", "plugins", *COMMANDS])
        return _error(
            f"unknown command {args[0]!r}; choose one of {commands} (`samflow --help` shows usage)."
        )
    try:
        args = _verbosity_from_argv(args)
        args, name = _experiment_from_argv(args)
        args = agent_args(args, name)  # W&B agent's value forms (--a=None) and its runs' folders
        check_plugin_args(args)
    except ExperimentError as err:
        return _error(str(err))
    # DDP children re-run sys.argv: give them the resolved config path.
    sys.argv = [sys.argv[0], *args]
    configure_wandb()
    from argparse import ArgumentError

    try:
        if any(a == PLUGIN_HELP or a.startswith(PLUGIN_HELP + "=") for a in args):
            return _plugin_help(args, name or "samflow")
        run_cli(args, name or "samflow")
    except ArgumentError as err:  # a bad option or value: jsonargparse's message, made one line
        if os.environ.get("SAMFLOW_DEBUG"):
            raise
        return _error(one_line_argument_error(str(err), args))
    except _user_errors() as err:
        # Bad input (a file, key or plugin) or a diverged run: one clear line, no traceback.
        # SAMFLOW_DEBUG=1 shows it.
        if os.environ.get("SAMFLOW_DEBUG"):
            raise
        return _error(str(err))
    return 0


PLUGIN_HELP = "--model.plugins.help"


def _plugin_help(args: list[str], name: str) -> int:
    """``--model.plugins.help CLASS``: jsonargparse's help for the class, with its options written as
    the flags that set them, ``--model.plugins.<key>.init_args.OPTION`` (jsonargparse writes
    ``--model.plugins.OPTION``, a flag that does not exist for a mapping of plugins)."""
    import contextlib
    import io

    shown = io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(shown):
        try:
            run_cli(args, name)
        except SystemExit as done:
            code = done.code
    text = shown.getvalue().replace("--model.plugins.", "--model.plugins.<key>.init_args.")
    sys.stdout.write(text.replace("--model.plugins.<key>.init_args.help", PLUGIN_HELP))
    return code if isinstance(code, int) else 1


def _error(message: str) -> int:
    """Print ``samflow: error: message`` on one line; every error exits with status 1.

    The line and its newline go out in one write, so the lines of DDP ranks that fail together
    (sharing one stderr) never run into each other; ``print`` writes the newline separately.
    """
    sys.stderr.write(f"samflow: error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return 1


_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "- Expected a <class 'NoneType'>",
)


def one_line_argument_error(message: str, args: list[str], hint: str | None = None) -> str:
    """The most specific part of a jsonargparse error, as one line naming the full option key.

    jsonargparse reports ``--model.plugins.tokens.init_args.num_tokens abc`` as a tree: the outer key
    (``model.plugins``), the union alternatives it tried (``dict[...]``, ``None``), the class it loaded
    and the inner key (``num_tokens``) with the reason. The user needs the full key, the value and the
    innermost reason. ``hint`` says where the options are listed (default: ``samflow ARGS[0] --help``).
    """
    raw = [line for line in message.splitlines() if line.strip()]
    lines = [line.strip() for line in raw]
    outer = re.match(r'Parser key "([^"]+)":', lines[0]) if lines else None
    nested = re.search(r"NestedArg\(key='([^']*)', val='([^']*)'\)", message)
    start = 1 if outer else 0
    problems = [i for i, line in enumerate(raw) if "Problem with given class_path" in line]
    if problems:  # only the reasons under the last class jsonargparse tried, not the other alternatives
        indent = len(raw[problems[-1]]) - len(raw[problems[-1]].lstrip())
        end = next(
            (j for j in range(problems[-1] + 1, len(raw)) if len(raw[j]) - len(raw[j].lstrip()) <= indent),
            len(raw),
        )
        lines, start = lines[problems[-1] + 1 : end], 0
    inner = [line for line in lines[start:] if not line.startswith(_NOISE)]
    detail = " ".join(line.lstrip("- ") for line in inner) or (lines[0] if lines else message)
    detail = re.sub(r"Expected a <class '(?:[\w.]+\.)?(\w+)'>\.?", r"expected \1;", detail)
    detail = detail.replace("; Got value:", ", got")
    detail = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", detail)
    detail = re.sub(r'Parser key "([^"]+)": ', "", detail)
    hint = hint or f"(`samflow {args[0]} --help` lists the options)"
    if outer is None:
        return f"{detail} {hint}"
    key = outer.group(1) + (f".{nested.group(1)}" if nested else "")
    flags = [a.split("=", 1)[0] for a in args if a.startswith(f"--{outer.group(1)}.")]
    key = next((f[2:] for f in flags if nested and f.endswith(f".{nested.group(1)}")), key)
    named = re.findall(r'Parser key "([^"]+)":', message)[1:]
    key = next((f[2:] for f in flags if not nested and any(f.endswith(f".{n}") for n in named)), key)
    value = f" {nested.group(2)!r}" if nested else ""
    return f"--{key}{value}: {detail} {hint}"


def run_cli(args: list[str], run_name: str) -> Any:
    """Run LightningCLI with samflow's module, defaults and callbacks."""
    from samflow.lightning_cli import SamflowCLI

    # ``main`` has put ``args`` in sys.argv already (for DDP children); passing them twice only
    # makes LightningCLI warn that it got both.
    return SamflowCLI(run_name=run_name, args=None if args == sys.argv[1:] else args)


if __name__ == "__main__":
    raise SystemExit(main())
