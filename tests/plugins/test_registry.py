"""Entry-point discovery: out-of-tree plugins, broken plugins isolated, clear errors."""

from __future__ import annotations

import textwrap
import warnings

import pytest

from samflow.experiment_files import ExperimentError
from samflow.plugin_check import check_plugins
from samflow.plugins import registry
from samflow.plugins.registry import PluginError, create_plugin, discover, get_plugin_class


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A distribution 'acme-sam' 1.2 on sys.path with a working and a broken plugin."""
    (tmp_path / "acme_plugin.py").write_text(
        textwrap.dedent(
            """
            from samflow import SamPlugin

            class AcmePlugin(SamPlugin):
                '''A third-party plugin that does nothing.'''
            """
        )
    )
    (tmp_path / "acme_broken.py").write_text("raise ImportError('acme needs libfoo')\n")
    info = tmp_path / "acme_sam-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-sam\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(
        "[samflow.plugins]\nacme = acme_plugin:AcmePlugin\nacme_broken = acme_broken:Broken\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    discover.cache_clear()
    yield tmp_path
    discover.cache_clear()


def test_builtins_are_registered():
    names = discover()
    assert {"decoder_tuning", "tokens"} <= set(names)
    assert names["tokens"].distribution == "samflow"
    assert names["tokens"].status == "ok"


def test_out_of_tree_plugin_is_found_with_its_distribution(third_party):
    with pytest.warns(UserWarning, match="acme_broken.*acme-sam"):
        plugins = discover()
    info = plugins["acme"]
    assert (info.distribution, info.version, info.status) == ("acme-sam", "1.2", "ok")
    assert type(create_plugin("acme")).__name__ == "AcmePlugin"


def test_broken_plugin_is_listed_and_isolated(third_party):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plugins = discover()
    assert plugins["acme_broken"].status.startswith("broken: ImportError: acme needs libfoo")
    # unrelated plugins keep working
    assert get_plugin_class("tokens").__name__ == "ExtraTokens"
    with pytest.raises(PluginError, match="acme_broken.*'acme-sam' 1.2.*acme needs libfoo"):
        get_plugin_class("acme_broken")


def test_experiment_naming_a_broken_plugin_fails_with_its_distribution(third_party, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        discover()
    config = tmp_path / "exp.yaml"
    config.write_text("model:\n  plugins:\n    a:\n      class_path: acme_broken.Broken\n")
    with pytest.raises(ExperimentError, match="model.plugins.a.*'acme-sam' 1.2.*failed to load"):
        check_plugins(config)
    config.write_text("model:\n  plugins:\n    a:\n      class_path: AcmePlugin\n")
    check_plugins(config)  # a working third-party plugin passes


def test_unknown_plugin_name_lists_the_registered_ones():
    with pytest.raises(PluginError, match="No samflow plugin named 'nope'.*tokens"):
        get_plugin_class("nope")


def test_non_plugin_entry_point_is_broken(tmp_path, monkeypatch):
    info = tmp_path / "odd-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: odd\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[samflow.plugins]\nodd = os.path:join\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.discover.cache_clear()
    try:
        with pytest.warns(UserWarning, match="not a SamPlugin"):
            assert discover()["odd"].cls is None
    finally:
        registry.discover.cache_clear()
