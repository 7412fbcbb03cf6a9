"""Where experiments are found, and the YAML file an experiment name or path stands for.

An experiment is looked up in ``./experiments``, then among those packaged with samflow; ``samflow
experiments`` lists them with their ``# description:`` lines.
"""

from __future__ import annotations

import difflib
from pathlib import Path


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
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise ExperimentError(
            f"No experiment named {name!r}. {hint}Known experiments: {names}. "
            "Pass a YAML path, or run `samflow experiments` to list them."
        )
    return known[name][0].resolve()
