"""``PatchPairFolder`` seeds a pair's prompt by its key, not its position: removing one pair keeps every
other pair's prompt (before, the pairs after it took their neighbours' draws)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from samflow.data.prompts import PointPrompt
from samflow.data.wsi.folder import PatchPairFolder


def _folders(root, names):
    rng = np.random.default_rng(0)
    for sub in ("hr", "lr", "hr_m", "lr_m"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        for sub in ("hr", "lr"):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                root / sub / f"{name}.png"
            )
        for sub in ("hr_m", "lr_m"):
            mask = np.zeros((32, 32), np.uint8)
            mask[4:28, 6:26] = 255
            Image.fromarray(mask).save(root / sub / f"{name}.png")
    return [root / sub for sub in ("hr", "lr", "hr_m", "lr_m")]


def _points(folders):
    data = PatchPairFolder(*folders, img_size=32, prompt=PointPrompt(positive=4), seed=3)
    return {key: data[i]["points"] for i, key in enumerate(data.keys)}


def test_removing_a_pair_keeps_every_other_pairs_prompt(tmp_path):
    folders = _folders(tmp_path, ["a", "b", "c", "d"])
    before = _points(folders)
    for folder in folders:
        (folder / "b.png").unlink()
    after = _points(folders)
    assert sorted(after) == ["a", "c", "d"]
    for key in after:
        torch.testing.assert_close(after[key], before[key], msg=key)
    assert not torch.equal(before["c"], before["d"])  # the pairs do draw apart
