"""Packaging: the package list in pyproject.toml matches the tree, and a built wheel carries the experiments.

setuptools stops an install when a listed folder is missing, and leaves a folder out of a
non-editable install without saying anything when it is not listed. These tests catch both cases
before CI does, and check that the top-level ``experiments/`` folder lands in a non-editable install
as ``samflow/experiments/``, where ``samflow --experiment NAME`` finds it.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.name for p in (ROOT / "experiments").glob("*.yaml"))


def _declared() -> tuple[set[str], dict[str, str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"]), config["package-dir"]


def _on_disk(package_dir: dict[str, str]) -> set[str]:
    found = set()
    for top, folder in package_dir.items():
        base = ROOT / folder
        if base.is_dir() and not (base / "__init__.py").is_file():
            found.add(top)  # a data package: a folder of package data without __init__.py (experiments/)
            continue
        for init in base.rglob("__init__.py"):
            relative = init.parent.relative_to(base)
            found.add(".".join((top, *relative.parts)))
    return found


def test_every_listed_package_exists_and_every_package_is_listed():
    declared, package_dir = _declared()
    on_disk = _on_disk(package_dir)
    assert declared - on_disk == set(), "listed in pyproject.toml but missing in the tree"
    assert on_disk - declared == set(), "in the tree but not listed in pyproject.toml"


def test_entry_points_name_listed_packages():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared, _ = _declared()
    for name, target in config["project"]["entry-points"]["samflow.plugins"].items():
        module = target.split(":")[0]
        assert module in declared, f"plugin {name!r} points at {module!r}, which is not packaged"


def test_the_experiments_live_at_the_top_level():
    assert "quickstart.yaml" in EXPERIMENTS
    assert not (ROOT / "samflow" / "experiments").exists(), "the experiments moved to ./experiments"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the tree (so the build leaves no build/ folder in the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("samflow", "plugins", "experiments"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)]
    setuptools = importlib.metadata.version("setuptools")
    if int(setuptools.split(".")[0]) >= 77:  # this environment can build it: no download needed
        command.insert(4, "--no-build-isolation")
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("samflow-*.whl")
    return path


def test_the_wheel_carries_every_experiment(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"samflow/experiments/{name}" for name in EXPERIMENTS} <= names
    assert not any(name.startswith("experiments/") for name in names), "no top-level package 'experiments'"


def test_a_non_editable_install_finds_the_experiments_by_name(wheel: Path, tmp_path: Path):
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    proc = subprocess.run(install, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "work"  # no ./experiments here
    work.mkdir()
    script = (
        "import samflow, samflow.cli as cli, samflow.experiment_files as experiment_files; "
        "print(samflow.__file__); print(experiment_files.resolve_experiment('quickstart')); "
        "cli.main(['experiments'])"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    module_file, quickstart, *table = proc.stdout.splitlines()
    installed = target / "samflow"
    assert Path(module_file).parent == installed  # the installed copy, not this checkout
    assert Path(quickstart) == installed / "experiments" / "quickstart.yaml"
    listed = {line.split()[0] for line in table[2:]}
    assert {Path(name).stem for name in EXPERIMENTS} <= listed


def test_test_module_basenames_are_unique():
    """tests/ has no __init__.py files: two test files with one basename stop pytest in a clean clone."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) > 10
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_the_readme_test_command_runs_on_two_workers_each_file_on_one():
    """README: the test command runs on 2 pytest-xdist worker processes, each test file on one; the
    ``test`` extra installs pytest-xdist."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    options = project["tool"]["pytest"]["ini_options"]["addopts"].split()
    assert options[options.index("-n") + 1] == "2"
    assert options[options.index("--dist") + 1] == "loadfile"
    assert any(r.startswith("pytest-xdist") for r in project["project"]["optional-dependencies"]["test"])
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "on 2 worker processes (pytest-xdist, each test file on one worker" in readme
