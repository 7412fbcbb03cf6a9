"""README "Experiments": in a second config file, a list or a mapping of data (``train``, ``test_sets``)
replaces the experiment's whole value (where ``model.plugins`` merges by key, tests/test_config_forms.py);
a flag naming one set (``--data.init_args.test_sets.CAMO``) changes that set alone."""

from __future__ import annotations

import sys

import pytest
import yaml

from samflow.cli import main


def resolved(args: list[str], capsys, monkeypatch, cwd) -> dict:
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main([*args, "--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err[-3000:]
    return yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]


def test_a_second_config_replaces_the_experiments_data_lists_and_mappings(tmp_path, capsys, monkeypatch):
    packaged = resolved(["fit", "--experiment", "sam_adapter_cod"], capsys, monkeypatch, tmp_path)
    assert len(packaged["train"]) == 2 and list(packaged["test_sets"]) == ["COD10K", "CAMO", "CHAMELEON"]
    mine = tmp_path / "my_paths.yaml"
    train = [{"root": "/my/COD10K/train", "images": "Imgs", "masks": "GT"}]
    mine.write_text(
        yaml.safe_dump({"data": {"init_args": {"train": train, "test_sets": {"MINE": "/my/test"}}}})
    )
    data = resolved(
        ["fit", "--experiment", "sam_adapter_cod", "--config", str(mine)], capsys, monkeypatch, tmp_path
    )
    assert data["train"] == train and data["test_sets"] == {"MINE": "/my/test"}
    flag = ["--data.init_args.test_sets.CAMO", "/my/CAMO/test"]
    data = resolved(["fit", "--experiment", "sam_adapter_cod", *flag], capsys, monkeypatch, tmp_path)
    assert data["test_sets"] == {**packaged["test_sets"], "CAMO": "/my/CAMO/test"}
