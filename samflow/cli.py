"""The ``samflow`` command.

    samflow fit|validate|test|predict --experiment NAME [LightningCLI overrides ...]
    samflow experiments        list experiments with their descriptions
    samflow plugins            list registered plugins and their status

``--experiment NAME`` resolves NAME (a path, ``experiments/NAME.yaml`` in the working directory, or a
packaged experiment) and is rewritten to ``--config /abs/path`` in ``sys.argv``, so DDP children
started by Lightning read the same file. The rewritten ``--config`` goes first, right after the
subcommand: every other flag and ``--config`` overrides the experiment, wherever it stands.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _user_errors() -> tuple[type[Exception], ...]:
    from samflow.callbacks.finite import NonFiniteError
    from samflow.data.folder import DataError
    from samflow.lightning_cli import ConfigError
    from samflow.plugins.registry import PluginError
    from samflow.plugins.stack import PluginConflictError
    from samflow.sam.build import CheckpointError
    from samflow.sam.cache import EncoderCacheError

    return (
        DataError,
        CheckpointError,
        PluginError,
        PluginConflictError,
        EncoderCacheError,
        ConfigError,
        ExperimentError,
        NonFiniteError,
        FileNotFoundError,
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
    from samflow.plugins.registry import discover

    config = yaml.safe_load(config_path.read_text()) or {}
    plugins = ((config.get("model") or {}).get("plugins")) or {}
    if not isinstance(plugins, dict):
        raise ExperimentError(f"{config_path}: model.plugins must be a mapping of name -> plugin.")
    registry = discover()
    for key, spec in plugins.items():
        target = spec.get("class_path") if isinstance(spec, dict) else None
        if not target:
            raise ExperimentError(f"{config_path}: model.plugins.{key} needs a class_path.")
        for info in registry.values():
            names = {info.name, info.class_path, info.class_path.rsplit(".", 1)[-1]}
            if target in names:
                if info.cls is None:
                    raise ExperimentError(
                        f"{config_path}: model.plugins.{key} uses plugin {info.name!r} from distribution "
                        f"{info.distribution!r} {info.version}, which failed to load: {info.error}. "
                        "Reinstall or fix that package, or remove the plugin from the experiment."
                    )
                if target == info.name and info.name != info.class_path.rsplit(".", 1)[-1]:
                    raise ExperimentError(
                        f"{config_path}: model.plugins.{key}.class_path is the plugin name {target!r}; "
                        f"write its class instead: class_path: {info.class_path.rsplit('.', 1)[-1]}"
                    )


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

    rows = [[i.name, i.class_path, i.distribution, i.version, i.status] for i in discover().values()]
    print_table(rows, ["name", "class", "distribution", "version", "status"])
    return 0


def cmd_experiments() -> int:
    rows = [[name, desc, str(path)] for name, (path, desc) in list_experiments().items()]
    print_table(rows, ["name", "description", "file"])
    return 0


USAGE = """usage: samflow {fit,validate,test,predict} --experiment NAME [overrides ...]
       samflow experiments
       samflow plugins

Run `samflow fit --help` for every option of an experiment."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``samflow`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args[0] == "plugins":
        return cmd_plugins()
    if args[0] == "experiments":
        return cmd_experiments()
    if args[0] in ("--version", "-V"):
        from samflow import __version__

        print(f"samflow {__version__}")
        return 0
    if args[0] not in SUBCOMMANDS:
        print(f"samflow: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        args, name = _experiment_from_argv(args)
    except ExperimentError as err:
        print(f"samflow: {err}", file=sys.stderr)
        return 2
    # DDP children re-run sys.argv: give them the resolved config path.
    sys.argv = [sys.argv[0], *args]
    configure_wandb()
    try:
        run_cli(args, name or "samflow")
    except _user_errors() as err:
        # Bad input (a file, key or plugin) or a diverged run: one clear line, no traceback.
        # SAMFLOW_DEBUG=1 shows it.
        if os.environ.get("SAMFLOW_DEBUG"):
            raise
        print(f"samflow: error: {err}", file=sys.stderr)
        return 1
    return 0


def run_cli(args: list[str], run_name: str) -> Any:
    """Run LightningCLI with samflow's module, defaults and callbacks."""
    from samflow.lightning_cli import SamflowCLI

    # ``main`` has put ``args`` in sys.argv already (for DDP children); passing them twice only
    # makes LightningCLI warn that it got both.
    return SamflowCLI(run_name=run_name, args=None if args == sys.argv[1:] else args)


if __name__ == "__main__":
    raise SystemExit(main())
