"""README "Writing a plugin": ``ctx.seeds(stream)`` gives the seeds ``ctx.rand`` uses (to seed a generator
on the device for draws too large for the host), and SAM's operations that plugins reuse are public in
``samflow.sam``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import samflow.sam
from samflow.plugins import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow.testing import random_batch

README = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_ctx_seeds_are_the_seeds_ctx_rand_draws_from(per_image, training):
    model = HookedSam(build_sam("tiny", seed=0), PluginStack({})).train(training)
    batch = random_batch(3, prompt="box", seed=1).replace(sample_seed=[11, 22, 33])
    ctx = model.context(batch, epoch=2)
    seeds = ctx.seeds("key/use", per_image=per_image)
    drawn = ctx.rand("key/use", (4, 2), per_image=per_image)
    assert seeds is not None and len(seeds) == drawn.shape[0] == 3
    assert (
        len(set(seeds)) == 3 and ctx.seeds("key/other", per_image=per_image) != seeds
    )  # per row, per stream
    for seed, row in zip(seeds, drawn):
        torch.testing.assert_close(row, torch.rand(4, 2, generator=torch.Generator().manual_seed(seed)))


def test_a_batch_without_seeds_or_ids_has_no_seeds():
    model = HookedSam(build_sam("tiny", seed=0), PluginStack({})).eval()
    batch = random_batch(2, prompt="box", seed=1).replace(sample_seed=[], id=[])
    assert model.context(batch).seeds("key/use") is None


def test_the_operations_the_readme_lists_are_public_in_samflow_sam():
    found = re.search(r"SAM's operations that plugins reuse are public in `samflow.sam`: (.*?)\.", README)
    assert found, "README: the sentence listing samflow.sam's public operations moved"
    names = re.findall(r"`(\w+)`", found.group(1))
    assert len(names) >= 8, names
    for name in names:
        assert name in samflow.sam.__all__ and callable(getattr(samflow.sam, name)), name


def test_the_built_in_plugins_table_names_each_registered_built_in_and_its_class():
    """Every row of "Built-in plugins" is a registered name whose class is the row's, and every plugin
    samflow registers (distribution samflow) has a row; the LoRA row's options are LoRA's."""
    from samflow.plugins.registry import discover, get_plugin_class
    from samflow_plugins.lora import LoRA

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Built-in plugins") : text.index("### Checked against the official code")]
    rows = dict(re.findall(r"^\| `(\w+)` \| `(\w+)` \|", section, flags=re.MULTILINE))
    built_in = {name for name, info in discover().items() if info.distribution == "samflow"}
    assert set(rows) == built_in
    for name, cls in rows.items():
        assert get_plugin_class(name).__name__ == cls, name
    lora_row = re.search(r"^\| `lora` .*options: (.*?)\)", section, flags=re.MULTILINE).group(1)
    import inspect

    options = set(inspect.signature(LoRA.__init__).parameters)
    assert set(re.findall(r"`(\w+)`", lora_row.split("targets")[0])) | {"targets"} <= options
