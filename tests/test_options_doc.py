"""docs/options.md: current with the code, and every option in it described (docs/make_options.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_options", ROOT / "docs" / "make_options.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sections(generator: ModuleType) -> list[Any]:
    return generator.collect()


def test_options_doc_is_current(generator: ModuleType, sections: list[Any]) -> None:
    assert (ROOT / "docs" / "options.md").read_text() == generator.render(sections), (
        "docs/options.md is stale: run `python docs/make_options.py` (`--check` shows the diff)."
    )


def test_every_option_has_a_description(generator: ModuleType, sections: list[Any]) -> None:
    missing = generator.undocumented(sections)
    assert not missing, (
        "Options without a description; add an `Args:` entry to the class docstring (or a help= to "
        "the argparse option):\n  " + "\n  ".join(missing)
    )


def test_doc_covers_plugins_commands_and_audited_options(generator: ModuleType, sections: list[Any]) -> None:
    from samflow.cli import COMMANDS

    titles = {section.title for section in sections}
    names = {option.name for section in sections for option in section.options}
    assert {f"{name}: " for name in generator.builtin_plugins()} <= {t.split(": ")[0] + ": " for t in titles}
    assert {f"samflow {name}" for name in COMMANDS} <= titles
    audited = [
        "`model.threshold`",
        "`model.sam.variant`",
        "`batch_size`",
        "`eval_batch_size`",
        "`num_workers`",
        "`pin_memory`",
        "`test_report.columns`",
        "`run_report.wandb_artifacts`",
        "`last.dirpath`",
        "`--split`",
        "`--shard-size`",
        "`--device`",
        "`mask_threshold`",
        "`--experiment`",
        "`--resume`",
        "`--quiet`",
    ]
    assert [name for name in audited if name not in names] == []
