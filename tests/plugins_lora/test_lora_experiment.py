"""Experiment lora_polyp: SAMed's LoRA + decoder tuning on exactly sam_adapter_polyp's recipe."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from samflow.cli import main
from samflow.module import SamflowModule, SamSpec
from samflow_plugins.decoder_tuning import DecoderTuning
from samflow_plugins.lora import LoRA


def resolved(name: str, tmp_path: Path, capsys, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)  # the packaged experiment, not a ./experiments copy
    monkeypatch.setattr(sys, "argv", ["samflow"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--experiment", name, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out.replace(name, "EXPERIMENT"))  # run names and folders


def test_lora_polyp_is_sam_adapter_polyp_with_lora_and_decoder_tuning(tmp_path, capsys, monkeypatch):
    lora = resolved("lora_polyp", tmp_path, capsys, monkeypatch)
    adapter = resolved("sam_adapter_polyp", tmp_path, capsys, monkeypatch)
    plugins = lora["model"].pop("plugins")
    adapter["model"].pop("plugins")
    assert lora == adapter  # data, prompts, augmentation, losses, metrics, optimizer, schedule, trainer
    assert list(plugins) == ["lora", "decoder"]
    assert plugins["lora"]["class_path"] == "samflow_plugins.lora.LoRA"
    assert {"rank": 4, "alpha": 4.0, "dropout": 0.0, "targets": ["qkv"], "blocks": None}.items() <= plugins[
        "lora"
    ]["init_args"].items()
    assert plugins["decoder"]["class_path"] == "samflow_plugins.decoder_tuning.DecoderTuning"
    assert plugins["decoder"]["init_args"]["parts"] == ["mask_decoder", "prompt_encoder"]


def test_lora_polyp_plugins_build_and_own_what_samed_trains(tmp_path, capsys, monkeypatch):
    plugins = resolved("lora_polyp", tmp_path, capsys, monkeypatch)["model"]["plugins"]
    built = {
        "lora": LoRA(**plugins["lora"]["init_args"]),
        "decoder": DecoderTuning(**plugins["decoder"]["init_args"]),
    }
    with torch.device("meta"):
        module = SamflowModule(sam=SamSpec(variant="vit_b", seed=0), plugins=built)
    assert module.trainable_parameters() == {"lora": 147_456, "decoder": 4_058_340 + 6_220}
