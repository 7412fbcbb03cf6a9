"""Third-party plugins that clash with built-ins or each other, exit at import, or fail to import.

Each test makes its fake installed distributions on the fly (a ``*.dist-info`` with
``entry_points.txt`` next to the plugin modules on ``sys.path``), as a ``pip install --target`` would.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import run_samflow

from samflow import cli
from samflow.experiment_files import ExperimentError, list_experiments
from samflow.plugin_check import check_plugin_args, check_plugin_target, check_plugins
from samflow.plugins.registry import PluginError, PluginWarning, discover, get_plugin_class

WORKING = textwrap.dedent(
    """
    from samflow import SamPlugin

    class {cls}(SamPlugin):
        '''A third-party plugin that does nothing.'''
    """
)


def make_dist(root: Path, dist: str, modules: dict[str, str], plugins: dict[str, str]) -> Path:
    """An installed distribution ``dist`` 0.1 in ``root``: its modules and its ``samflow.plugins``."""
    root.mkdir(parents=True, exist_ok=True)
    for module, text in modules.items():
        (root / f"{module}.py").write_text(text)
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in plugins.items())
    (info / "entry_points.txt").write_text(f"[samflow.plugins]\n{lines}")
    return root


@pytest.fixture
def installed(monkeypatch):
    """``installed(root)`` puts ``root`` on sys.path; the fake modules are forgotten afterwards, so no
    other test's jsonargparse sees a second ``ExtraTokens``."""
    roots: list[Path] = []

    def install(root: Path) -> None:
        roots.append(root)
        monkeypatch.syspath_prepend(str(root))
        discover.cache_clear()

    yield install
    for root in roots:
        for path in root.glob("*.py"):
            sys.modules.pop(path.stem, None)
    discover.cache_clear()
    gc.collect()


def quiet_discover():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return discover()


def test_broken_plugin_sharing_a_builtin_class_name_leaves_the_builtin_usable(tmp_path, installed):
    modules = {"brokentok_plugin": "import not_installed_dep\n"}
    installed(
        make_dist(tmp_path, "broken-tokens", modules, {"better_tokens": "brokentok_plugin:ExtraTokens"})
    )
    quiet_discover()
    check_plugin_target("model.plugins.t.class_path", "ExtraTokens")  # the working built-in wins
    check_plugins(list_experiments()["quickstart"][0])
    with pytest.raises(ExperimentError, match="'broken-tokens' 0.1, which failed to load.*not_installed_dep"):
        check_plugin_target("model.plugins.t.class_path", "brokentok_plugin.ExtraTokens")


def test_working_class_name_clash_is_named_with_both_candidates(tmp_path, installed):
    installed(
        make_dist(
            tmp_path,
            "alt-tokens",
            {"alttok_plugin": WORKING.format(cls="ExtraTokens")},
            {"alt_tokens": "alttok_plugin:ExtraTokens"},
        )
    )
    quiet_discover()
    with pytest.raises(ExperimentError) as err:
        check_plugin_target("model.plugins.t.class_path", "ExtraTokens")
    message = str(err.value)
    assert "ambiguous" in message and "\n" not in message
    assert "samflow_plugins.tokens.ExtraTokens (distribution 'samflow'" in message
    assert "alttok_plugin.ExtraTokens (distribution 'alt-tokens' 0.1)" in message
    check_plugin_target("w", "samflow_plugins.tokens.ExtraTokens")
    check_plugin_target("w", "alttok_plugin.ExtraTokens")
    for path, _ in list_experiments().values():
        check_plugins(path)  # the packaged experiments name their plugins by full class path


def test_packaged_experiments_name_plugins_by_full_class_path():
    for name, (path, _) in list_experiments().items():
        plugins = (yaml.safe_load(path.read_text()).get("model") or {}).get("plugins") or {}
        for key, spec in plugins.items():
            assert spec["class_path"].startswith("samflow_plugins."), f"{name}: model.plugins.{key}"


def test_packaged_experiment_runs_beside_a_clashing_third_party_class(tmp_path):
    root = make_dist(
        tmp_path / "site",
        "alt-tokens",
        {"alttok_plugin": WORKING.format(cls="ExtraTokens")},
        {"alt_tokens": "alttok_plugin:ExtraTokens"},
    )
    result = run_samflow(
        ["fit", "--experiment", "quickstart", "--print_config"], tmp_path, pythonpath=root, timeout=240
    )
    assert result.returncode == 0, result.stderr
    assert "class_path: samflow_plugins.tokens.ExtraTokens" in result.stdout


EXITS = {
    "exit_plugin": "import sys\nsys.exit('exit_plugin needs a GPU')\n",
    "argv_plugin": "import argparse\nparser = argparse.ArgumentParser()\nparser.add_argument('--rank')\nparser.parse_args()\n",
}


def test_plugin_exiting_at_import_is_broken_not_fatal(tmp_path, installed, monkeypatch):
    installed(
        make_dist(tmp_path, "bad-exit", EXITS, {"bad_exit": "exit_plugin:P", "bad_argv": "argv_plugin:P"})
    )
    monkeypatch.setattr(
        sys, "argv", ["samflow", "fit", "--experiment", "quickstart"]
    )  # not the test runner's
    with pytest.warns(PluginWarning, match="'bad_exit' from distribution 'bad-exit' 0.1.*exited at import"):
        plugins = discover()
    assert plugins["bad_exit"].status == "broken: exited at import with sys.exit('exit_plugin needs a GPU')"
    assert plugins["bad_argv"].status.startswith("broken: exited at import with sys.exit(2)")
    assert "unrecognized arguments: fit --experiment quickstart" in plugins["bad_argv"].status
    assert get_plugin_class("tokens").__name__ == "ExtraTokens"
    with pytest.raises(PluginError, match="'bad_exit' from distribution 'bad-exit'.*exited at import"):
        get_plugin_class("bad_exit")


def test_what_a_plugin_prints_at_import_and_later_reaches_stderr(tmp_path, installed, capsys):
    """A plugin module's stderr is held while it is imported (for the status of one that exits), then
    released: what it printed then shows, and a logging handler it made on stderr keeps printing."""
    module = WORKING.format(cls="Chatty") + textwrap.dedent(
        """
        import logging, sys
        print("chatty imported", file=sys.stderr)
        LOG = logging.getLogger("chatty_plugin")
        LOG.addHandler(logging.StreamHandler(sys.stderr))
        LOG.propagate = False
        """
    )
    installed(make_dist(tmp_path, "chatty", {"chatty_plugin": module}, {"chatty": "chatty_plugin:Chatty"}))
    assert discover()["chatty"].status == "ok"
    assert "chatty imported" in capsys.readouterr().err
    import chatty_plugin

    chatty_plugin.LOG.warning("after discovery")
    assert "after discovery" in capsys.readouterr().err


def test_samflow_plugins_survives_a_plugin_exiting_and_warns_in_one_line(tmp_path):
    root = make_dist(
        tmp_path / "site", "bad-exit", EXITS, {"bad_exit": "exit_plugin:P", "bad_argv": "argv_plugin:P"}
    )
    result = run_samflow(
        ["plugins"], tmp_path, pythonpath=root, env={"PYTHONWARNINGS": "default"}, timeout=240
    )
    assert result.returncode == 0, result.stderr
    assert "tokens" in result.stdout and "bad_exit" in result.stdout
    warned = [line for line in result.stderr.splitlines() if "bad_exit" in line]
    assert warned == [
        (
            "samflow: warning: samflow plugin 'bad_exit' from distribution 'bad-exit' 0.1 is broken and cannot be "
            "used: exited at import with sys.exit('exit_plugin needs a GPU')"
        )
    ]
    assert "cli.py" not in result.stderr and "discover()" not in result.stderr


def test_plugin_warning_prints_as_one_line():
    cli._one_line_plugin_warnings()
    line = warnings.formatwarning(
        PluginWarning("plugin 'x'\n is broken"), PluginWarning, "/a/cli.py", 3, "x = 1"
    )
    assert line == "samflow: warning: plugin 'x' is broken\n"
    other = warnings.formatwarning(UserWarning("other"), UserWarning, "/a/b.py", 3, "x = 1")
    assert "/a/b.py:3" in other  # other warnings keep their form


@pytest.fixture
def two_scales(tmp_path, installed):
    """Two distributions registering the name ``scale`` with different classes."""
    installed(
        make_dist(
            tmp_path / "a", "scale-a", {"scale_a": WORKING.format(cls="ScaleA")}, {"scale": "scale_a:ScaleA"}
        )
    )
    installed(
        make_dist(
            tmp_path / "b", "scale-b", {"scale_b": WORKING.format(cls="ScaleB")}, {"scale": "scale_b:ScaleB"}
        )
    )


def test_name_registered_by_two_distributions_keeps_both(two_scales):
    with pytest.warns(
        PluginWarning, match="'scale' is registered by scale_a.ScaleA .*'scale-a'.* and scale_b"
    ):
        plugins = discover()
    both = [info for info in plugins.all if info.name == "scale"]
    assert sorted(info.distribution for info in both) == ["scale-a", "scale-b"]
    assert all(info.status.startswith("ambiguous") for info in both)
    with pytest.raises(
        PluginError, match="'scale' is ambiguous.*scale_a.ScaleA.*'scale-a'.*scale_b.ScaleB.*'scale-b'"
    ):
        get_plugin_class("scale")
    with pytest.raises(ExperimentError, match="plugin name 'scale' is ambiguous.*'scale-a'.*'scale-b'"):
        check_plugin_target("model.plugins.s.class_path", "scale")
    for target in ("scale_a.ScaleA", "scale_b.ScaleB", "ScaleA", "ScaleB"):
        check_plugin_target("model.plugins.s.class_path", target)


def test_samflow_plugins_lists_both_registrations_of_a_name(two_scales, capsys):
    quiet_discover()
    assert cli.cmd_plugins() == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("scale ")]
    assert len(rows) == 2
    assert "scale-a" in rows[0] and "ambiguous" in rows[0] and "scale-b" in rows[1] and "ambiguous" in rows[1]


def test_per_key_mapping_flag_is_checked():
    with pytest.raises(ExperimentError, match=r"--model.plugins.b.class_path: no samflow plugin 'BadImport'"):
        check_plugin_args(["fit", "--model.plugins.b", "{class_path: BadImport}"])
    with pytest.raises(ExperimentError, match="no samflow plugin 'BadImport'"):
        check_plugin_args(["fit", "--model.plugins.b={class_path: BadImport, init_args: {x: 1}}"])
    check_plugin_args(["fit", "--model.plugins.b", "{class_path: ExtraTokens, init_args: {num_tokens: 2}}"])
    check_plugin_args(["fit", "--model.plugins.b", "{class_path: [unclosed"])  # jsonargparse reports it


def test_class_path_whose_module_fails_to_import_names_the_error(tmp_path, installed):
    (tmp_path / "needs_libfoo.py").write_text("import libfoo_not_installed\n")
    installed(tmp_path)
    with pytest.raises(ExperimentError) as err:
        check_plugin_target("model.plugins.a.class_path", "needs_libfoo.Adapter")
    message = str(err.value)
    assert "module 'needs_libfoo'" in message and "No module named 'libfoo_not_installed'" in message
    assert "install the package" not in message and "\n" not in message
    with pytest.raises(ExperimentError, match="no samflow plugin 'no_such_module.Adapter'"):
        check_plugin_target("model.plugins.a.class_path", "no_such_module.Adapter")


def test_entry_point_name_is_refused_as_class_path_as_the_options_doc_says():
    with pytest.raises(ExperimentError, match="is the plugin name 'tokens'; write its class instead"):
        check_plugin_target("model.plugins.t.class_path", "tokens")
    doc = (Path(__file__).parents[2] / "docs" / "options.md").read_text()
    assert "the entry point name or the class" not in doc
    assert "not the entry point name" in doc


def test_readme_plugin_package_builds_with_its_entry_point(tmp_path):
    """The "Writing a plugin" pyproject.toml is a complete package: it builds a wheel registering block_bias."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Writing a plugin", 1)[1].split("\n## ", 1)[0]
    toml = section.split("```toml\n", 1)[1].split("```", 1)[0]
    plugin = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "pyproject.toml").write_text(toml)
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "plugin.py").write_text(plugin)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", "."]
    result = subprocess.run(pip, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "block_bias = my_pkg.plugin:BlockBias" in archive.read(entry_points).decode()
    assert "my_pkg/plugin.py" in names
