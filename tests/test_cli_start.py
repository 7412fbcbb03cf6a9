"""The ``samflow`` command's start: ``import samflow`` and the answers that need no model (``--help``,
``--version``, ``experiments``) import neither torch nor Lightning, and the public names of ``samflow``
are there on first use.

Before, ``import samflow`` imported torch, Lightning, torchmetrics and segment-anything (7-9 s on this
2-core machine): every ``samflow --help`` waited that long, and a command in a SLURM job held the
requeue signal only after them (tests/reliability/test_slurm_early_signal.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import samflow

HEAVY = ("torch", "lightning", "segment_anything", "torchmetrics")

NO_MODEL = """
import contextlib, io, sys
from samflow.cli import main
for command in (["--help"], ["--version"], ["experiments"]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(command) == 0, command
    assert out.getvalue().strip(), command
print(sorted(m for m in HEAVY if m in sys.modules))
"""


def test_help_version_and_the_experiment_list_import_neither_torch_nor_lightning():
    script = f"HEAVY = {HEAVY!r}\n{NO_MODEL}"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[]"


#: what listing the plugins needs not: Lightning (with torchmetrics) and peft (with transformers)
NOT_FOR_THE_LIST = ("lightning", "torchmetrics", "peft", "transformers")

PLUGIN_LIST = """
import contextlib, io, sys
from samflow.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    assert main(["plugins"]) == 0
rows = {line.split()[0]: line.split() for line in out.getvalue().splitlines()[2:]}
assert rows["lora"][1:] == ["samflow_plugins.lora.LoRA", "samflow", rows["lora"][3], "ok"], rows
print(sorted(m for m in NOT_FOR_THE_LIST if m in sys.modules))
"""


def test_the_plugin_list_imports_neither_lightning_nor_peft():
    """``samflow plugins`` imports every plugin class (torch and segment-anything with them) but neither
    Lightning nor peft: ``samflow.sam.cache`` imports Lightning where it logs and the LoRA plugin imports
    peft where it builds or reads its layers. Before, both were imported at module level and the list
    took 6.4-9.1 s on this 2-core machine instead of 3.6-4.1 s (benchmarks/README.md, "Command start-up")."""
    script = f"NOT_FOR_THE_LIST = {NOT_FOR_THE_LIST!r}\n{PLUGIN_LIST}"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("name", sorted(set(samflow.__all__) - {"__version__"}))
def test_each_public_name_is_the_object_of_its_module(name):
    """``samflow.NAME`` and ``from samflow import NAME`` give the defining module's object, and
    ``dir(samflow)`` lists it."""
    import importlib

    value = getattr(samflow, name)
    module = importlib.import_module(value.__module__)
    assert getattr(module, name) is value
    assert name in dir(samflow)
    namespace: dict[str, object] = {}
    exec(f"from samflow import {name}", namespace)
    assert namespace[name] is value


def test_an_unknown_name_is_an_attribute_error_that_names_it():
    with pytest.raises(AttributeError, match="module 'samflow' has no attribute 'SamBatchh'"):
        samflow.SamBatchh  # noqa: B018
    assert not hasattr(samflow, "_no_such_name")


def test_the_submodules_are_attributes_of_samflow_as_before():
    """``import samflow`` then ``samflow.plugins.SamPlugin``, ``samflow.sam.build_sam``: a plugin or script
    written when ``import samflow`` imported them keeps working."""
    code = (
        "import samflow\n"
        "assert samflow.plugins.SamPlugin is samflow.SamPlugin\n"
        "assert samflow.sam.build_sam is samflow.build_sam\n"
        "assert samflow.batch.SamBatch is samflow.SamBatch\n"
        "print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stdout.strip() == "ok", done.stderr[-3000:]
