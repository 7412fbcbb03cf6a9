"""README, "Resume and run folders": ``last.ckpt`` is written as a new file and renamed, so a run killed
while it writes keeps its last complete one (here the write of step 3 dies half-way: ``last.ckpt``
still loads and holds step 2)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import tiny_linear_module

from samflow.callbacks.resume import LastCheckpoint


class Killed(Exception):
    """What the process would have died of."""


def test_a_write_killed_half_way_keeps_the_previous_last_checkpoint(tmp_path, monkeypatch):
    real = L.Trainer.save_checkpoint

    def dies_at_step_3(self, filepath, *args, **kwargs):
        real(self, filepath, *args, **kwargs)
        if self.global_step == 3:  # the file is half written when the process dies
            data = Path(filepath).read_bytes()
            Path(filepath).write_bytes(data[: len(data) // 2])
            raise Killed

    monkeypatch.setattr(L.Trainer, "save_checkpoint", dies_at_step_3)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[LastCheckpoint(every_n_train_steps=1, dirpath=str(tmp_path))],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(Killed):
        trainer.fit(tiny_linear_module())
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2
