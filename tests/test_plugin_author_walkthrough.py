"""What a third-party plugin author copies from the docs runs as written.

``tests/plugins/test_readme_plugin_package.py`` installs the README's package and runs ``samflow``
with it; this file covers the rest of the walk: the README's "test it without a download" snippet
(in-process, on the tiny SAM, importing the package the README shows), the README plugin on an encoder
it does not fit (refused by name, not an AttributeError from inside its ``setup``), and the
``class_path`` each plugin's section of docs/options.md tells a user to write.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from samflow import HookedSam, PluginStack, build_sam
from samflow.experiment_files import ExperimentError
from samflow.plugin_check import check_plugin_target
from samflow.plugins import PluginError
from samflow.plugins.registry import discover

ROOT = Path(__file__).resolve().parent.parent


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Writing a plugin\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)


@pytest.fixture
def my_pkg(tmp_path, monkeypatch):
    """The README's ``my_pkg`` (``__init__.py`` empty, ``plugin.py`` verbatim) importable, as after
    ``pip install .``; the module is forgotten afterwards."""
    (plugin,) = [b for b in readme_python_blocks() if b.startswith("# my_pkg/plugin.py\n")]
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "plugin.py").write_text(plugin)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_pkg", "my_pkg.plugin"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import my_pkg.plugin

    yield my_pkg.plugin
    for name in ("my_pkg", "my_pkg.plugin"):
        sys.modules.pop(name, None)


def test_readme_tiny_sam_snippet_runs_as_written(my_pkg):
    """The snippet that tests the plugin on the tiny SAM runs in a fresh namespace: it imports what it
    uses (the plugin class from the package too) and its own asserts hold."""
    (snippet,) = [b for b in readme_python_blocks() if "random_batch" in b]
    namespace: dict = {"__name__": "readme_snippet"}
    code = compile(snippet, "README.md (Writing a plugin: tiny SAM snippet)", "exec")
    exec(code, namespace)  # noqa: S102 -- the README's own example, run as a reader runs it
    model = namespace["model"]
    assert isinstance(model, HookedSam)
    plugin = model.plugins["bias"]
    assert isinstance(plugin, my_pkg.BlockBias)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["plugins.bias.bias"]  # SAM frozen, the plugin's vector trains
    assert model.plugins.owned["bias"]  # in the record the optimizer's groups come from


def test_readme_plugin_is_refused_by_name_on_another_encoder(my_pkg):
    """The README plugin reads SAM's ViT (``patch_embed.proj``, one width for every block): on
    MobileSAM's TinyViT it is refused, naming the plugin and the encoder, before its ``setup`` runs."""
    with pytest.raises(PluginError, match=r"Plugin 'bias' \(BlockBias\) adapts SAM's ViT image encoder"):
        HookedSam(build_sam("mobile_sam"), PluginStack({"bias": my_pkg.BlockBias()}))


def options_doc_plugin_paths() -> list[tuple[str, str, str]]:
    """(entry point name, class name, class_path written) for each plugin section of docs/options.md."""
    text = (ROOT / "docs" / "options.md").read_text()
    plugins = text[text.index("\n## Plugins\n") : text.index("\n## Other commands\n")]
    found = []
    for name, cls, line in re.findall(r"\n### (\w+): (\w+)\n\n(.*)\n", plugins):
        paths = re.findall(r"`class_path: ([\w.]+)`|\(or `([\w.]+)`\)", line)
        found += [(name, cls, path) for pair in paths for path in pair if path]
    return found


def test_options_doc_class_paths_name_the_plugin_class():
    """Every ``class_path`` a plugin's section of docs/options.md shows is one samflow accepts and it
    names that plugin's class (the class name or its full path; never the entry point name, which
    the CLI refuses)."""
    registered = {info.name: info for info in discover().all}
    written = options_doc_plugin_paths()
    assert {name for name, _, _ in written} == {
        n for n, i in registered.items() if i.distribution == "samflow"
    }
    for name, cls, path in written:
        info = registered[name]
        assert info.cls is not None and info.cls.__name__ == cls
        try:
            check_plugin_target(f"docs/options.md ({name})", path)
        except ExperimentError as error:
            pytest.fail(f"docs/options.md shows a class_path samflow refuses: {error}")
        assert path in (cls, info.class_path), (name, path)


def test_samplugin_help_names_every_declaration():
    """``help(SamPlugin)`` shows the class docstring but not the ``#:`` comments of its class
    attributes, so the docstring names each declaration a plugin may set."""
    from typing import ClassVar, get_origin, get_type_hints

    from samflow import SamPlugin

    hints = get_type_hints(SamPlugin, include_extras=True)
    declarations = [name for name, hint in hints.items() if get_origin(hint) is ClassVar] + ["predicts"]
    assert len(declarations) >= 5
    missing = [name for name in declarations if f"``{name}``" not in (SamPlugin.__doc__ or "")]
    assert not missing, f"SamPlugin's docstring does not name {missing}"
