"""`--last.every_n_train_steps` (README "Resume"): last.ckpt after every N optimizer steps and at each
epoch end, default 50; 0 writes it at epoch ends only."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import run_samflow, tiny_linear_module

from samflow.callbacks.resume import LastCheckpoint


def _fit_saving(
    tmp_path, monkeypatch, max_epochs: int, every: int = 1, accumulate: int = 2, ckpt_path: str | None = None
) -> list[int]:
    """The global steps at which ``LastCheckpoint`` saved in a fit of ``tiny_linear_module`` (5 steps an epoch)."""
    saved: list[int] = []
    save = LastCheckpoint.save

    def spy(self, trainer):
        saved.append(trainer.global_step)
        return save(self, trainer)

    monkeypatch.setattr(LastCheckpoint, "save", spy)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accumulate_grad_batches=accumulate,
        callbacks=[LastCheckpoint(every_n_train_steps=every, dirpath=str(tmp_path))],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(tiny_linear_module(), ckpt_path=ckpt_path)
    return saved


# at an epoch's end it is written again after validation (ModelCheckpoint's state in it then current)
@pytest.mark.parametrize(("every", "steps"), [(0, [5, 10]), (2, [2, 4, 5, 6, 8, 10, 10]), (50, [5, 10])])
def test_last_checkpoint_steps(tmp_path, monkeypatch, every, steps):
    assert _fit_saving(tmp_path, monkeypatch, 2, every=every, accumulate=1) == steps
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 10


def test_the_default_is_50_and_negative_is_refused(tmp_path):
    assert LastCheckpoint().every_n_train_steps == 50
    with pytest.raises(ValueError, match="last.every_n_train_steps must be 0 or more"):
        LastCheckpoint(every_n_train_steps=-1)
    help_text = run_samflow(["fit", "--experiment", "quickstart", "--help"], tmp_path).stdout
    entry = help_text[help_text.rindex("--last.every_n_train_steps") :]  # its entry, not the usage
    entry = " ".join(entry[: entry.index("--last.dirpath")].split())
    assert "0: only at the end of each epoch" in entry and entry.endswith("default: 50)")


def test_with_gradient_accumulation_last_is_written_only_after_an_optimizer_step(tmp_path, monkeypatch):
    """Accumulating 2 batches of 5 an epoch, the optimizer steps after batches 2, 4 and 5 (the epoch's
    end): ``last.ckpt`` after each of those (and again at the epoch's end), never after batch 1 or 3,
    whose gradients wait for the next batch; also not after a resumed run's first batch."""
    assert _fit_saving(tmp_path, monkeypatch, 1) == [1, 2, 3, 3]
    resumed = _fit_saving(tmp_path, monkeypatch, 2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed == [4, 5, 6, 6]
