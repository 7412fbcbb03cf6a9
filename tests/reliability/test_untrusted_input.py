"""Bad-input matrix, untrusted and unusual input that samflow must refuse safely or simply accept.

| input                                                  | result                                          |
|---|---|
| a SAM checkpoint whose pickle would run code           | CheckpointError naming the file; the code never runs |
| ``class_path: os.system`` for a plugin                 | one line, exit 1; nothing called                |
| an unknown plugin in a later ``--config``              | one line naming the file and the closest class  |
| an unknown option (``--trainer.max_epocs``)            | one line naming it, exit 1, no usage dump        |
| file names in any script (unicode, spaces)             | read like any other                             |
| a 6000 x 4000 image                                    | read and resized to the model's input           |
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samflow.cli import main
from samflow.data import MaskFolderDataset
from samflow.sam.build import CheckpointError, build_sam

FIT = ["fit", "--experiment", "quickstart", "--trainer.max_epochs", "0"]


def one_error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and "Traceback" not in err and "usage:" not in err, err[-3000:]
    assert lines and lines[-1].startswith("samflow: error:"), err[-3000:]
    assert sum(line.startswith("samflow: error:") for line in lines) == 1, err[-3000:]
    return lines[-1]


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for a checkpoint that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_naming_the_file_and_never_runs(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "sam_vit_b_evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        build_sam("tiny", checkpoint=path)
    assert str(path) in str(info.value) and "weights_only=False" not in str(info.value)
    assert not marker.exists()


def _in_process(args: list[str], tmp_path: Path, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    code = main(args)
    return code, capsys.readouterr().err


def test_class_path_os_system_is_refused_before_anything_is_called(tmp_path, monkeypatch, capsys):
    calls: list[object] = []
    monkeypatch.setattr("os.system", lambda *a, **k: calls.append(a) or 0)
    code, err = _in_process(
        [*FIT, "--model.plugins.x.class_path", "os.system"], tmp_path, monkeypatch, capsys
    )
    line = one_error_line(code, err)
    assert "model.plugins.x" in line and "os.system" in line
    assert calls == []


def test_an_unknown_plugin_in_a_later_config_names_the_file_and_the_closest(tmp_path, monkeypatch, capsys):
    extra = tmp_path / "more.yaml"
    extra.write_text("model:\n  plugins:\n    hq: {class_path: HQSamm}\n")
    code, err = _in_process([*FIT, "--config", str(extra)], tmp_path, monkeypatch, capsys)
    line = one_error_line(code, err)
    assert line.startswith(f"samflow: error: {extra}: model.plugins.hq.class_path")
    assert "'HQSamm'" in line and "Did you mean HQSam," in line


def test_an_unknown_option_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    code, err = _in_process([*FIT, "--trainer.max_epocs", "2"], tmp_path, monkeypatch, capsys)
    assert "max_epocs" in one_error_line(code, err)


def _pair(root: Path, stem: str, height: int, width: int) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(root / "images" / f"{stem}.png")
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height // 2, width // 4 : width // 2] = 255
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def test_file_names_in_any_script_are_read(tmp_path):
    stems = ["café façade", "日本語の画像", "Ünïcødé-ÅØ", "emoji_🐟"]
    for stem in stems:
        _pair(tmp_path / "données", stem, 12, 16)
    dataset = MaskFolderDataset(tmp_path / "données", img_size=16)
    assert sorted(dataset[i]["id"] for i in range(len(dataset))) == sorted(stems)
    assert all(float(dataset[i]["mask"].sum()) > 0 for i in range(len(dataset)))


def test_a_6000_by_4000_image_is_read_and_resized(tmp_path):
    _pair(tmp_path, "huge", 4000, 6000)
    item = MaskFolderDataset(tmp_path, img_size=64)[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert tuple(item["original_size"].tolist()) == (4000, 6000)
    assert tuple(item["gt_original"].shape) == (4000, 6000)
    assert int(item["gt_original"].sum()) == 1000 * 1500  # the box, at full resolution
