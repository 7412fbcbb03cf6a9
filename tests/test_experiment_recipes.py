"""Packaged experiments against the papers' recipes (../shared/reference notes) and the README.

``PAPER`` holds the notes' values; a value an experiment does not follow must be in ``STATED`` with a
phrase its YAML comments carry (the reason is next to it). Then each segmentation recipe runs one tiny
training step on the tiny SAM with generated data, as a user's run with a paths file after it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import wandb
import yaml
from test_experiments import EXPERIMENTS, resolved

from samflow.cli import main
from samflow.data import build_prompt, make_quickstart_data
from samflow.data.prompts import BoxPrompt, MixedPrompt, NoisyMaskPrompt, NoPrompt, PointPrompt
from samflow.data.wsi import SlideDataModule
from samflow.data.wsi.patches import CentreSizeBoxPrompt
from samflow.experiment_files import PACKAGED
from samflow.main_metric import main_metric

README = Path(__file__).resolve().parents[1] / "README.md"

SAM_ADAPTER = {
    "variant": "vit_h", "lr": 2e-4, "max_epochs": 20, "total_batch": 8, "img_size": 1024, "train_prompt": "none",
    "eval_prompt": "none", "checkpoint_on": None,  # the reference tests the last epoch (its validation is broken)
}  # fmt: skip
HQSEG = {
    "variant": "vit_l", "lr": 1e-3, "total_batch": 32, "img_size": 1024, "eval_prompt": "box", "checkpoint_on": None,
    "train_prompt": {"box": 1 / 3, "10 points": 1 / 3, "noisy mask": 1 / 3},
}  # fmt: skip
PAPER = {
    "sam_adapter_cod": {**SAM_ADAPTER, "losses": {"bce": 1.0, "soft_iou": 1.0}},
    "sam_adapter_shadow": {**SAM_ADAPTER, "losses": {"balanced_bce": 1.0}},
    "sam_adapter_polyp": {**SAM_ADAPTER, "losses": {"bce": 1.0, "soft_iou": 1.0}},
    "hq_sam_hqseg": {**HQSEG, "max_epochs": 12, "losses": {}},  # the plugin's point-sampled BCE + Dice
    # PA-SAM: 7 prompt names, collapsed by the if/elif chain to box 4/7, points 2/7, noisy mask 1/7
    "pa_sam_hqseg": {**HQSEG, "max_epochs": 21, "losses": {"bce": 1.0, "dice": 1.0},
                     "train_prompt": {"box": 4 / 7, "10 points": 2 / 7, "noisy mask": 1 / 7}},
    "ba_sam_resolution": {
        "variant": "vit_b", "lr": 1e-4, "max_epochs": 50, "total_batch": 32, "img_size": 1024, "train_prompt": "1 points",
        "eval_prompt": "1 points", "losses": {"bce": 1.0, "dice": 1.0}, "checkpoint_on": "val/mae",
    },
    "wsi_sam_camelyon16": {
        "variant": "vit_b", "lr": 1e-3, "max_epochs": 20, "total_batch": 1, "img_size": 1024, "losses": {}, "eval_prompt": "box",
        "train_prompt": {"noisy box": 1 / 3, "10 points": 1 / 3, "noisy mask": 1 / 3}, "checkpoint_on": None,
    },
    "sapnet_coco": {"variant": None, "lr": 0.015, "max_epochs": 12, "total_batch": 32, "losses": {}, "checkpoint_on": None},
}  # fmt: skip
# Deviations from PAPER and a phrase of the YAML comment that states each one.
STATED = {
    "sam_adapter_cod": {"variant": "ViT-B, not the paper's ViT-H", "total_batch": "the paper used 4 GPUs"},
    "sam_adapter_shadow": {"variant": "ViT-B, not the paper's ViT-H", "total_batch": "batch 2 per GPU"},
    "sam_adapter_polyp": {"variant": "ViT-B, not the paper's ViT-H", "total_batch": "batch 2 per GPU"},
    "hq_sam_hqseg": {"total_batch": "the paper: 8 GPUs"},
    "pa_sam_hqseg": {"total_batch": "the paper: 8 GPUs"},
    "ba_sam_resolution": {
        "total_batch": "batch 2, not the README's `-b 32`",
        "eval_prompt": "evaluation with the tight box",
        "checkpoint_on": "the best checkpoint is kept by val IoU",
    },
    "wsi_sam_camelyon16": {"checkpoint_on": "the best checkpoint is kept by val/dice"},
    "sapnet_coco": {"variant": "which SAM made the reference's"},
}


def prompt_summary(sampler):
    """'none', 'box', 'noisy box', '<k> points' or, for a mix, {summary: probability}."""
    if isinstance(sampler, MixedPrompt):
        weights = sampler.weights / sampler.weights.sum()
        return {prompt_summary(s): float(w) for s, w in zip(sampler.samplers, weights, strict=True)}
    if isinstance(sampler, NoPrompt):
        return "none"
    if isinstance(sampler, BoxPrompt):
        return "noisy box" if sampler.jitter else "box"
    if isinstance(sampler, CentreSizeBoxPrompt):
        return "noisy box"
    if isinstance(sampler, PointPrompt):
        return f"{sampler.positive} points" + (f" + {sampler.negative} negative" if sampler.negative else "")
    if isinstance(sampler, NoisyMaskPrompt):
        return "noisy mask"
    return type(sampler).__name__


def facts(config: dict) -> dict:
    """The recipe's values that PAPER names, read from the resolved config."""
    model, trainer = config["model"], config["trainer"]
    data = config["data"]["init_args"]
    out = {
        "variant": model["sam"]["variant"],
        "lr": model["optimizer"]["init_args"]["lr"],
        "max_epochs": trainer["max_epochs"],
        "total_batch": data["batch_size"] * trainer["devices"],
        "img_size": data["img_size"],
        "losses": model["losses"],
    }
    if config["data"]["class_path"].endswith("SlideDataModule"):
        module = SlideDataModule(
            **{**data, "eval_prompt": data["eval_prompt"] and build_prompt(data["eval_prompt"])}
        )
        out["train_prompt"], out["eval_prompt"] = (
            prompt_summary(module.prompt),
            prompt_summary(module.eval_prompt),
        )
    elif "prompt" in data:
        out["train_prompt"] = prompt_summary(build_prompt(data["prompt"]))
        out["eval_prompt"] = prompt_summary(build_prompt(data["eval_prompt"]))
    monitor = main_metric(model["metrics"], config["data"])
    out["checkpoint_on"] = monitor[0] if monitor and config["checkpoint"]["save_top_k"] != 0 else None
    return out


def comments(name: str) -> str:
    """The YAML's comments as one line of text."""
    lines = (PACKAGED / f"{name}.yaml").read_text().splitlines()
    return " ".join(line.split("#", 1)[1].strip() for line in lines if "#" in line)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_follows_the_paper_or_states_why_not(name, tmp_path, capsys, monkeypatch):
    found = facts(resolved(["fit", "--experiment", name], tmp_path, capsys, monkeypatch))
    text = comments(name)
    for key, paper in PAPER[name].items():
        value = found[key]
        same = value == pytest.approx(paper) if isinstance(paper, (float, dict)) else value == paper
        if key in STATED[name]:
            assert not same, f"{name}: {key} is the paper's {paper!r}; drop the stale deviation note"
            assert STATED[name][key] in text, f"{name}: {key} = {value!r}, the paper {paper!r}, unstated"
        else:
            assert same, f"{name}: {key} = {value!r}, the paper's recipe has {paper!r}"


def readme_experiments_table() -> dict[str, list[str]]:
    text = README.read_text().split("\n## Experiments\n", 1)[1]
    table = text[text.index("\n| experiment |") :].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return {re.match(r"\| `(\w+)`", row)[1]: [c.strip() for c in row.strip("|").split("|")] for row in rows}


def readme_folders() -> list[str]:
    """Folders of the README's block of expected folders: each entry's prefix before a pattern."""
    text = README.read_text().split("The folders they expect:", 1)[1].split("```", 2)[1]
    return [re.split(r"[{*]|\.\.\.", token)[0] for token in text.split() if token.startswith("/data/")]


def paths(value) -> list[str]:
    if isinstance(value, dict):
        return [p for item in value.values() for p in paths(item)]
    if isinstance(value, list):
        return [p for item in value for p in paths(item)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


def test_readme_table_lists_every_experiment_with_its_backbone_and_metrics(tmp_path, capsys, monkeypatch):
    table = readme_experiments_table()
    assert sorted(table) == sorted(set(EXPERIMENTS) - {"quickstart"})
    for name, (_, method, *_, metrics) in table.items():
        model = resolved(["fit", "--experiment", name], tmp_path, capsys, monkeypatch)["model"]
        assert model["sam"]["variant"].replace("_", "-") in method.lower(), (name, method)
        named = re.findall(r"`(\w+)`", metrics)
        assert set(named) <= set(model["metrics"]), (name, named, model["metrics"])


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n != "quickstart"])
def test_paths_are_placeholders_under_data_in_the_readme_folders(name, tmp_path, capsys, monkeypatch):
    config = resolved(["fit", "--experiment", name], tmp_path, capsys, monkeypatch)
    found = paths(config["model"]["sam"]) + paths(config["data"]["init_args"])
    folders = readme_folders()
    assert found and all(p.startswith("/data/") for p in found)
    unlisted = [p for p in found if not any((p + "/").startswith(f) for f in folders)]
    assert not unlisted, f"{name}: not in README's folder block: {unlisted}"


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return make_quickstart_data(tmp_path_factory.mktemp("data"), n_train=2, n_val=2, size=(48, 64))


# tests/wsi/test_wsi_fit_cli.py runs WSI-SAM's; SAPNet's needs a proposal store (tests/sapnet_e2e)
SEGMENTATION = [n for n in EXPERIMENTS if n not in ("quickstart", "wsi_sam_camelyon16", "sapnet_coco")]


@pytest.mark.parametrize("name", SEGMENTATION)
def test_recipe_trains_one_step_on_the_tiny_sam(name, generated, tmp_path, monkeypatch, capsys):
    """The recipe with a paths file after it (README) and the tiny SAM: one step, one validation batch;
    the checkpoints are the recipe's (only last.ckpt where the test sets are the validation sets)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    recipe = yaml.safe_load((PACKAGED / f"{name}.yaml").read_text())
    init = recipe["data"]["init_args"]
    data = {"train": str(generated / "train"), "test_sets": {"generated": str(generated / "val")}}
    if "val" in init:
        data["val"] = str(generated / "val")
    if "val_sets" in init:
        data["val_sets"] = {"generated": str(generated / "val")}
    (tmp_path / "paths.yaml").write_text(yaml.safe_dump({"data": {"init_args": data}}))
    options = {
        "model.sam.variant": "tiny", "model.sam.checkpoint": "null", "data.init_args.img_size": "128",
        "data.init_args.batch_size": "2", "data.init_args.num_workers": "0", "trainer.max_epochs": "1",
        "trainer.limit_train_batches": "1", "trainer.limit_val_batches": "1", "trainer.accelerator": "cpu",
        "trainer.num_sanity_val_steps": "0", "trainer.enable_progress_bar": "false",
    }  # fmt: skip
    flags = [item for key, value in options.items() for item in (f"--{key}", value)]
    try:
        status = main(["fit", "--experiment", name, "--config", str(tmp_path / "paths.yaml"), *flags])
    finally:
        wandb.finish()
    assert status == 0, capsys.readouterr().err[-3000:]
    kept = sorted(p.name for p in (tmp_path / "runs" / name / "version_0" / "checkpoints").iterdir())
    if recipe.get("checkpoint", {}).get("save_top_k") == 0:
        assert kept == ["last.ckpt"]
    elif "val" in init or "val_sets" in init:
        key = main_metric(recipe["model"]["metrics"], {**recipe["data"], "init_args": {**init, **data}})[0]
        key = key.replace("/", "_")
        assert len(kept) == 2 and f"-{key}=" in kept[0] and kept[1] == "last.ckpt", kept
