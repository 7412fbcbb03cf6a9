"""The README's references are true: the files it names exist, and the flags it shows are options.

A flag in the README that no command knows, or a test file it cites that was renamed, is a claim that
no longer holds; docs/options.md (generated from the code, `tests/test_options_doc.py`) is the list of
options.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
OPTIONS = (ROOT / "docs" / "options.md").read_text()

# Flags the README misspells on purpose, to show the error they get.
MISSPELT = {
    "--trainer.max_epohcs",
    "--model.plugins.tokenz.init_args.lr",
    "--model.plugins.x.class_path",
}
# Paths that exist only after installation.
INSTALLED = {"samflow/experiments/"}
_TOP = ("tests/", "benchmarks/", "samflow/", "plugins/", "experiments/", "docs/")


def _cited_paths() -> list[str]:
    """Repository paths in the README's code: inline spans and fenced blocks."""
    fenced = re.findall(r"^```[a-z]*\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", README, flags=re.MULTILINE | re.DOTALL)
    paths = set()
    for code in fenced + re.findall(r"`([^`\n]+)`", prose):
        for word in code.split():
            word = word.removeprefix("./").split("::")[0].rstrip(".,;:")
            if word.startswith(_TOP) and word not in INSTALLED:
                paths.add(word)
    return sorted(paths)


def _flags() -> list[str]:
    return sorted(set(re.findall(r"--[a-z_]+(?:\.[a-z_0-9]+)+", README)) - MISSPELT)


def _rows(section: str) -> set[str]:
    """The option names of docs/options.md's tables under the heading ``section`` (to the next
    heading of the same or a higher level)."""
    start = OPTIONS.index(section)
    level = section.split(" ")[0]
    end = len(OPTIONS)
    for m in re.finditer(r"^(#+) ", OPTIONS[start + len(section) :], flags=re.MULTILINE):
        if len(m.group(1)) <= len(level):
            end = start + len(section) + m.start()
            break
    return set(re.findall(r"^\| `([^`]+)`", OPTIONS[start:end], flags=re.MULTILINE))


def _plugin_options() -> dict[str, set[str]]:
    out = {}
    for m in re.finditer(r"^### ([a-z_]+): \w+$", OPTIONS, flags=re.MULTILINE):
        out[m.group(1)] = _rows(m.group(0))
    return out


def test_the_readme_cites_paths_and_flags():
    """The checks below have something to check (the patterns still match the README's writing)."""
    assert len(_cited_paths()) >= 20
    assert len(_flags()) >= 20


@pytest.mark.parametrize("path", _cited_paths())
def test_every_path_the_readme_names_exists(path):
    assert (ROOT / path).exists(), f"README.md names {path}, which is not in the repository"


@pytest.mark.parametrize("flag", _flags())
def test_every_flag_the_readme_shows_is_an_option(flag):
    name = flag.removeprefix("--")
    plugin = re.fullmatch(r"model\.plugins\.([a-z_]+)\.init_args\.([a-z_0-9]+)", name)
    if plugin:  # a key named after its plugin, as in the packaged experiments
        options = _plugin_options()
        assert plugin.group(1) in options, f"{flag}: no plugin {plugin.group(1)!r} in docs/options.md"
        assert plugin.group(2) in options[plugin.group(1)], f"{flag}: plugin has no such option"
        return
    if re.fullmatch(r"model\.plugins\.[a-z_]+\.class_path", name):  # a plugin under a key of the user's
        assert "`model.plugins.<key>` with `class_path`" in OPTIONS, f"{flag}: docs/options.md lost the form"
        return
    data = re.fullmatch(r"data\.init_args\.([a-z_0-9]+)(?:\.help|\.init_args)?", name)
    if data:  # an option of one of the data modules (a component's: `--data.init_args.prompt.init_args.X`)
        assert data.group(1) in _rows("### Data (`data.*`)"), f"{flag}: no data module has it"
        return
    trainer = re.fullmatch(r"trainer\.([a-z_]+)", name)
    if trainer:  # any of Lightning's Trainer arguments (docs/options.md lists those samflow sets)
        assert trainer.group(1) in inspect.signature(Trainer).parameters, f"{flag}: not a Trainer argument"
        return
    if name.endswith(".help"):  # `--model.plugins.help CLASS`
        assert f"`--{name} CLASS`" in OPTIONS, f"{flag}: not a help flag docs/options.md names"
        return
    assert re.search(rf"^\| `{re.escape(name)}`", OPTIONS, flags=re.MULTILINE), (
        f"{flag}: not in docs/options.md"
    )


@pytest.mark.parametrize(
    "name",
    sorted(
        {n for n in re.findall(r"--experiment ([a-z0-9_]+)\b(?![./])", README) if n not in {"my_experiment"}}
    ),
)
def test_every_experiment_the_readme_runs_is_packaged(name):
    assert (ROOT / "experiments" / f"{name}.yaml").is_file(), f"README.md runs --experiment {name}"
