"""README "Writing a plugin": the third-party package it shows, built and installed for real.

The plugin module and the ``pyproject.toml`` are taken verbatim from README.md and installed with pip
(``--target``, no network, the environment's setuptools); then ``samflow plugins`` and short ``samflow
fit`` runs in subprocesses check what the README says: the entry point is listed with its distribution,
an experiment names the class by short name or full import path and it is the plugin that trains, a
class name two installed plugins share is refused naming both, and a package whose import fails is
listed as broken without breaking unrelated runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from functools import cache
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_samflow, short_run
from packaging.requirements import Requirement

from samflow.experiment_files import list_experiments

README = Path(__file__).resolve().parents[2] / "README.md"
BROKEN = "raise ImportError('broken_pkg needs libfoo')\n"


@cache
def readme_blocks() -> dict[str, list[str]]:
    """The fenced blocks of the section, by language, and its whole text as ``prose``."""
    text = README.read_text()
    assert "\n## Writing a plugin\n" in text, "README.md has no section '## Writing a plugin'"
    start = text.index("## Writing a plugin")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else None]
    blocks: dict[str, list[str]] = {}
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL):
        blocks.setdefault(lang, []).append(body)
    blocks["prose"] = [section]
    return blocks


def readme_package() -> tuple[str, str]:
    """The plugin module's text and the pyproject text, as the README shows them."""
    plugin = [b for b in readme_blocks().get("python", []) if b.startswith("# my_pkg/plugin.py\n")]
    toml = [b for b in readme_blocks().get("toml", []) if b.startswith("# pyproject.toml")]
    assert len(plugin) == 1, "README 'Writing a plugin' should show one block starting '# my_pkg/plugin.py'"
    assert len(toml) == 1, "README 'Writing a plugin' should show one toml block starting '# pyproject.toml'"
    assert "class BlockBias(SamPlugin)" in plugin[0], "the README's plugin class changed name"
    # the toml block's comment names the package's files
    assert "my_pkg/__init__.py" in toml[0] and "my_pkg/plugin.py" in toml[0]
    return plugin[0], toml[0]


def replaced(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"expected {old!r} once in the README block"
    return text.replace(old, new)


def write_package(root: Path, module: str, dist: str, entry: str, code: str, toml: str) -> Path:
    """The README's package layout, as ``module`` registering ``entry`` in distribution ``dist``."""
    src = root / dist
    (src / module).mkdir(parents=True)
    (src / module / "__init__.py").write_text("")
    (src / module / "plugin.py").write_text(code)
    toml = replaced(toml, 'name = "my-pkg"', f'name = "{dist}"')
    toml = replaced(toml, 'block_bias = "my_pkg.plugin:BlockBias"', f'{entry} = "{module}.plugin:BlockBias"')
    (src / "pyproject.toml").write_text(toml)
    return src


def pip_install(src: Path, site: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    cmd += ["--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(site), str(src)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


class Installed:
    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        self.my_pkg = root / "site-my"  # the README's package
        self.other = root / "site-other"  # another distribution with a class BlockBias
        self.broken = root / "site-broken"  # a distribution whose plugin module fails to import

    @property
    def all(self) -> list[Path]:
        return [self.my_pkg, self.other, self.broken]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    code, toml = readme_package()
    meta = tomllib.loads(toml)
    # what the toml needs is what this environment has: the build backend and the dependency
    for req in [*meta["build-system"]["requires"], *meta["project"]["dependencies"]]:
        parsed = Requirement(req)
        assert parsed.specifier.contains(version(parsed.name)), f"{req}: installed {version(parsed.name)}"
    root = tmp_path_factory.mktemp("readme_plugin")
    inst = Installed(root)
    src = root / "src"
    pip_install(write_package(src, "my_pkg", "my-pkg", "block_bias", code, toml), inst.my_pkg)
    pip_install(write_package(src, "other_pkg", "other-pkg", "other_bias", code, toml), inst.other)
    pip_install(write_package(src, "broken_pkg", "broken-pkg", "broken", BROKEN, toml), inst.broken)
    for site, dist in [(inst.my_pkg, "my_pkg"), (inst.other, "other_pkg"), (inst.broken, "broken_pkg")]:
        assert (site / f"{dist}-0.1.0.dist-info" / "entry_points.txt").is_file()
    return inst


def samflow(args: list[str], cwd: Path, sites: list[Path]) -> subprocess.CompletedProcess:
    """``samflow ARGS`` with the ``sites`` (pip ``--target`` folders) on PYTHONPATH."""
    path = os.pathsep.join([*map(str, sites), os.environ.get("PYTHONPATH", "")])
    return run_samflow(args, cwd, env={"PYTHONPATH": path}, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def fit(installed: Installed, cwd: Path, sites: list[Path], plugins: dict | None = None) -> tuple[dict, str]:
    """A one-step fit of ``cwd/experiment.yaml`` if there is one, else of the quickstart with exactly
    ``plugins``; the last checkpoint (with the run's resolved config) and stdout."""
    own = cwd / "experiment.yaml"
    args = ["fit", "--experiment", str(own) if own.is_file() else "quickstart"]
    args += [*short_run(train=1, val=0), "--trainer.limit_val_batches", "0"]
    args += ["--data.init_args.quickstart.root", str(installed.data)]
    args += ["--data.init_args.quickstart.n_train", "4", "--data.init_args.quickstart.n_val", "4"]
    args += ["--model.plugins", json.dumps(plugins)] if plugins is not None else []
    proc = ok(samflow(args, cwd, sites))
    (run,) = (cwd / "runs").glob("*/version_0")
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    ckpt["config"] = yaml.safe_load((run / "config.yaml").read_text())
    return ckpt, proc.stdout


def assert_only_plugins_trained(ckpt: dict, keys: list[str]) -> None:
    """The checkpoint holds only the plugins' biases, each moved off its zero start; SAM was frozen
    (left out of the checkpoint) and the optimizer held nothing else."""
    state = ckpt["state_dict"]
    assert sorted(state) == sorted(f"model.plugins.{key}.bias" for key in keys)
    assert ckpt["samflow"]["frozen_sam_omitted"] is True
    for key in keys:
        assert state[f"model.plugins.{key}.bias"].abs().sum() > 0, f"{key}: the bias did not train"
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert sorted(g["name"] for g in groups) == sorted(keys)
    optimized = sum(s["exp_avg"].numel() for s in ckpt["optimizer_states"][0]["state"].values())
    assert optimized == sum(state[k].numel() for k in state)


def readme_plugin_map() -> dict:
    """``model.plugins`` of the README's yaml block (the full import path), and its comment's short name."""
    (block,) = readme_blocks().get("yaml", [None])
    assert block is not None and "# or BlockBias" in block, "README yaml block changed shape"
    plugins = yaml.safe_load(block)["model"]["plugins"]
    assert plugins == {"bias": {"class_path": "my_pkg.plugin.BlockBias"}}, plugins
    return plugins


def write_experiment(folder: Path, class_path: str) -> Path:
    """``folder/experiment.yaml``: the quickstart with the README's plugin map, naming ``class_path``."""
    plugins = readme_plugin_map()
    plugins["bias"]["class_path"] = class_path
    experiment = yaml.safe_load(list_experiments()["quickstart"][0].read_text())
    experiment["model"]["plugins"] = plugins
    (folder / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    return folder / "experiment.yaml"


def test_samflow_plugins_lists_the_installed_packages(installed, tmp_path):
    listed_name = re.search(r"`samflow plugins` lists `(\w+)`", readme_blocks()["prose"][0])
    assert listed_name, "README: 'After `pip install .` ..., `samflow plugins` lists `<name>`' changed"
    toml = tomllib.loads(readme_package()[1])
    assert list(toml["project"]["entry-points"]["samflow.plugins"]) == [listed_name.group(1)]
    out = ok(samflow(["plugins"], tmp_path, installed.all)).stdout
    rows = {line.split()[0]: line.split(maxsplit=4)[1:] for line in out.splitlines()[2:] if line.strip()}
    assert rows[listed_name.group(1)] == ["my_pkg.plugin.BlockBias", "my-pkg", "0.1.0", "ok"]
    assert rows["other_bias"] == ["other_pkg.plugin.BlockBias", "other-pkg", "0.1.0", "ok"]
    assert rows["broken"][:3] == ["broken_pkg.plugin.BlockBias", "broken-pkg", "0.1.0"]
    assert rows["broken"][3] == "broken: ImportError: broken_pkg needs libfoo"
    assert rows["tokens"][-1] == "ok"  # the built-ins are unaffected


def test_an_experiment_naming_the_short_class_name_trains_the_plugin(installed, tmp_path):
    """An experiment file (the quickstart's, with the README's plugin map, by short name) trains the
    plugin. The broken package is installed too (its entry point names a ``BlockBias`` as well): a run
    that does not need it is unaffected, and a namesake that failed to load makes nothing ambiguous."""
    write_experiment(tmp_path, "BlockBias")
    ckpt, out = fit(installed, tmp_path, [installed.my_pkg, installed.broken])
    assert ckpt["config"]["model"]["plugins"]["bias"]["class_path"] == "my_pkg.plugin.BlockBias"
    assert_only_plugins_trained(ckpt, ["bias"])
    numel = ckpt["state_dict"]["model.plugins.bias.bias"].numel()
    assert re.search(rf"plugin\s+bias: BlockBias, {numel} trainable", out), out


def test_a_shared_short_class_name_is_refused_naming_both(installed, tmp_path):
    experiment = write_experiment(tmp_path, "BlockBias")
    args = ["fit", "--experiment", str(experiment), "--trainer.max_epochs", "0"]
    proc = samflow(args, tmp_path, [installed.my_pkg, installed.other])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert line.startswith("samflow: error:") and "'BlockBias' is ambiguous" in line, proc.stderr[-3000:]
    assert "my_pkg.plugin.BlockBias (distribution 'my-pkg' 0.1.0)" in line
    assert "other_pkg.plugin.BlockBias (distribution 'other-pkg' 0.1.0)" in line
    assert not (tmp_path / "runs").exists()  # refused before the run started


def test_full_paths_work_beside_a_clash_and_a_broken_package(installed, tmp_path):
    """The README's yaml (full import path) and the other package's class in one run, with the broken
    package installed too: both named classes train, the broken one does not matter."""
    plugins = {**readme_plugin_map(), "other": {"class_path": "other_pkg.plugin.BlockBias"}}
    ckpt, _ = fit(installed, tmp_path, installed.all, plugins)
    chosen = {key: spec["class_path"] for key, spec in ckpt["config"]["model"]["plugins"].items()}
    assert chosen == {"bias": "my_pkg.plugin.BlockBias", "other": "other_pkg.plugin.BlockBias"}
    assert_only_plugins_trained(ckpt, ["bias", "other"])
