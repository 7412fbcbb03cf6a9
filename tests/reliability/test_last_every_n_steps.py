"""`--last.every_n_train_steps` (README "Resume"): last.ckpt after every N optimizer steps and at each
epoch end, default 50; 0 writes it at epoch ends only."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import samflow_here, tiny_linear_module
from quickstart_tiny import samflow
from signal_at import Killed

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
    help_text = samflow_here(["fit", "--experiment", "quickstart", "--help"], tmp_path).stdout
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


EVERY_STEP = [  # 2 steps, last.ckpt after each, a validation after each (the second: the epoch's end)
    *("--trainer.limit_train_batches", "2", "--data.init_args.batch_size", "1"),
    *("--last.every_n_train_steps", "1", "--trainer.val_check_interval", "1"),
]


def _killed_at(step: int) -> list[str]:
    spec = {"class_path": "signal_at.KillAt", "init_args": {"step": step}}
    return ["--trainer.callbacks+", json.dumps(spec)]


def test_a_run_killed_in_the_validation_after_a_last_checkpoint_resumes_into_that_validation(
    tmp_path, monkeypatch
):
    """kill -9 (no handler runs) in the validation after step 1 (mid-epoch, ``val_check_interval``), and
    after the resume in the one after step 2 (the epoch's end): each time ``last.ckpt`` holds the step
    before the validation, and the resumed fit runs that validation, ending with the uninterrupted fit's
    metrics.csv, best checkpoint and weights. Before, the resumed fit went on with the next batch without
    the validation (its row, best checkpoint, plateau and early-stopping decisions lost), and from the
    epoch's end's checkpoint it took the epoch as ended."""
    data = tmp_path / "data"
    for name in ("whole", "cut"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    assert samflow("fit", *EVERY_STEP, data=data) == 0
    whole = tmp_path / "whole" / "runs" / "quickstart" / "version_0"

    monkeypatch.chdir(tmp_path / "cut")
    run = Path("runs/quickstart/version_0")
    with pytest.raises(Killed):
        samflow("fit", *EVERY_STEP, *_killed_at(1), data=data)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1
    with pytest.raises(Killed):
        samflow("fit", *EVERY_STEP, *_killed_at(2), "--resume", str(run), data=data)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert samflow("fit", *EVERY_STEP, "--resume", str(run), data=data) == 0

    metrics = run / "metrics.csv"  # the old code's last resume logged nothing: it wrote none
    assert (metrics.read_text() if metrics.is_file() else "") == (whole / "metrics.csv").read_text()
    names = sorted(p.name for p in (whole / "checkpoints").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == names
    reference = torch.load(whole / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    got = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert got["global_step"] == reference["global_step"] == 2
    best = [
        {k: Path(v).name for k, v in c.items() if k in ("best_model_path", "kth_best_model_path")}
        for c in (reference, got)
        for key, c in c["callbacks"].items()
        if key.startswith("ModelCheckpoint")
    ]
    assert best[0] == best[1] and best[0]["best_model_path"], best
    changed = [k for k, v in reference["state_dict"].items() if not torch.equal(v, got["state_dict"][k])]
    assert not changed, changed
