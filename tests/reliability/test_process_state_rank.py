"""The process's rank, as the data module's file check reads it: from the trainer it is attached to,
else from Lightning (``rank_zero_only.rank``). A set used to fail to build under a trainer-like object
without ``global_rank`` (a stand-in trainer of a test or a script): the check read the rank for every
set it built, not only for what it reports."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from samflow.data import SegmentationDataModule


def _pairs(root: Path, stems: list[str]) -> Path:
    for stem in stems:
        for folder, array in (
            ("images", np.full((12, 16, 3), 90, np.uint8)),
            ("masks", np.eye(12, 16) * 255),
        ):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array.astype(np.uint8)).save(root / folder / f"{stem}.png")
    return root


def test_a_set_builds_under_a_trainer_without_a_rank_and_a_bad_file_is_reported_once(tmp_path):
    good = _pairs(tmp_path / "good", ["a", "b"])
    module = SegmentationDataModule(train=str(good), val=str(good), img_size=32)
    module.trainer = SimpleNamespace()  # no global_rank
    module.setup("fit")
    assert sorted(module.datasets) == ["train", "val"] and len(module.datasets["val"]) == 2

    bad = _pairs(tmp_path / "bad", ["a", "b", "c"])
    (bad / "masks" / "b.png").write_bytes(b"not a png")
    module = SegmentationDataModule(train=str(bad), val=str(good), img_size=32, on_bad_sample="skip")
    module.trainer = SimpleNamespace()
    with pytest.warns(UserWarning, match=r"these 1 bad file\(s\):\n  data.train: .*masks/b.png"):
        module.setup("fit")  # this process is rank 0 for Lightning: it reports
    assert [s.id for s in module.datasets["train"].samples] == ["a", "c"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.setup("fit")  # reported already: not again
        module.val_dataloader()


class _RankNotReadable:
    """A trainer whose rank must not be read (only a set above 500 files, with a progress bar, needs it)."""

    @property
    def global_rank(self) -> int:
        raise RuntimeError("the rank was read")


def test_the_rank_is_read_only_for_a_set_large_enough_for_a_progress_bar(tmp_path):
    good = _pairs(tmp_path / "good", ["a", "b"])
    module = SegmentationDataModule(train=str(good), val=str(good), img_size=32)
    module.trainer = _RankNotReadable()
    module.setup("fit")  # two small sets: no progress bar, no rank
    assert len(module.datasets["train"]) == 2
