"""A diverging run (NaN or infinite loss or gradient) stops with one line, or skips and counts the step.

Either way no checkpoint holds non-finite weights. The CLI runs use a tiny plugin, written to a temporary
folder put first on the import path (the DDP run's: on its processes' PYTHONPATH), whose loss term is
NaN at chosen global steps: deterministic and a few steps long on the tiny SAM and the procedural
quickstart data.
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import samflow_here
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from samflow.batch import SamBatch
from samflow.callbacks.finite import NonFiniteCheck, NonFiniteError

NAN_PLUGIN = '''
import torch
from samflow.plugins.base import SamPlugin


class NaNAtSteps(SamPlugin):
    """A loss term that is NaN at the given global steps of training (-1: every step)."""

    def __init__(self, steps: list[int] | None = None) -> None:
        super().__init__()
        self.steps = list(steps or [])

    def losses(self, out, batch, ctx):
        if ctx.training and (ctx.global_step in self.steps or -1 in self.steps):
            return {"nan": out.pred.sum() * float("nan")}
        return {}
'''


def samflow(args: list[str], cwd: Path, plugin_dir: Path) -> subprocess.CompletedProcess:
    return samflow_here(args, cwd, pythonpath=plugin_dir)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("nan_plugin")
    (folder / "nan_plugin.py").write_text(NAN_PLUGIN)
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("quickstart") / "data")


def fit_args(data_root: str, nan_steps: list[int], epochs: int, batches: int) -> list[str]:
    return [
        "fit", "--experiment", "quickstart",
        "--data.init_args.quickstart.root", data_root,
        "--data.init_args.batch_size", "2",
        "--trainer.max_epochs", str(epochs),
        "--trainer.limit_train_batches", str(batches),
        "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.log_every_n_steps", "1",
        "--model.plugins.nan", f"{{class_path: nan_plugin.NaNAtSteps, init_args: {{steps: {nan_steps}}}}}",
    ]  # fmt: skip


def tensors_in(value: object, where: str) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a nested checkpoint, with a dotted name."""
    if isinstance(value, torch.Tensor):
        return [(where, value)]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in tensors_in(v, f"{where}.{k}")]
    if isinstance(value, (list, tuple)):
        return [t for i, v in enumerate(value) for t in tensors_in(v, f"{where}[{i}]")]
    return []


def checkpoints_are_finite(run: Path) -> list[Path]:
    """Every .ckpt under ``run``, after checking that each floating tensor in it is finite (weights,
    optimizer state, loop and callback states)."""
    found = sorted(run.rglob("*.ckpt"))
    for path in found:
        tensors = tensors_in(torch.load(path, map_location="cpu", weights_only=False), path.name)
        assert any(name.startswith(f"{path.name}.state_dict.") for name, _ in tensors)
        assert any(name.startswith(f"{path.name}.optimizer_states") for name, _ in tensors)
        # ModelCheckpoint keeps +-inf as the score of "no checkpoint yet": bookkeeping, not weights.
        sentinels = (".kth_value", ".best_model_score")
        bad = [
            name
            for name, t in tensors
            if t.is_floating_point() and not torch.isfinite(t).all() and not name.endswith(sentinels)
        ]
        assert bad == [], f"non-finite tensors in {path}: {bad[:5]}"
    return found


def test_diverging_fit_stops_with_one_line_and_keeps_finite_checkpoints(tmp_path, plugin_dir, data_root):
    """NaN at global step 3 = epoch 1, batch 1 (2 batches per epoch): exit 1, one line, finite checkpoints.

    ``--checkpoint.save_on_exception true`` makes Lightning write a checkpoint as the error passes: it
    must hold the weights from before the failing step too.
    """
    args = [*fit_args(data_root, [3], epochs=3, batches=2), "--checkpoint.save_on_exception", "true"]
    proc = samflow(args, tmp_path, plugin_dir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("samflow: error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0]
    line = errors[0]
    assert "non-finite loss (nan) at global step 3, epoch 1, batch 1" in line
    files = line.split(", files ", 1)[1].split(".png")[:2]
    assert len(files) == 2 and all(Path(f"{f.lstrip(', ')}.png").is_file() for f in files), line
    run = tmp_path / "runs" / "quickstart" / "version_0"
    written = {p.name for p in checkpoints_are_finite(run)}
    assert "last.ckpt" in written  # the end of epoch 0 is kept (named with its val/iou)
    assert any(name.startswith("epoch=0-step=2-") for name in written), written
    assert not any("epoch=2" in name for name in written)  # the run stopped in epoch 1
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] <= 3


def test_skip_mode_completes_counts_and_keeps_finite_weights(tmp_path, plugin_dir, data_root):
    args = [*fit_args(data_root, [1], epochs=1, batches=3), "--non_finite.action", "skip"]
    proc = samflow(args, tmp_path, plugin_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samflow: skipped a step: non-finite loss (nan) at global step 1, epoch 0, batch 1" in proc.stderr
    assert "samflow: skipped 1 of 3 training steps" in proc.stderr
    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert "last.ckpt" in {p.name for p in checkpoints_are_finite(run)}
    with open(run / "metrics.csv") as handle:
        counts = [
            row["train/skipped_non_finite"]
            for row in csv.DictReader(handle)
            if row["train/skipped_non_finite"]
        ]
    assert counts == ["1.0"]


# ---- the callback on a small module ----
class Tiny(LightningModule):
    """A linear model on SamBatch batches; ``nan_grad`` / ``inf_loss`` name the global steps that go bad."""

    def __init__(self, nan_grad: tuple[int, ...] = (), inf_loss: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.nan_grad, self.inf_loss = nan_grad, inf_loss
        self.weights_at: dict[int, torch.Tensor] = {}  # global step -> weights when its batch starts

    def training_step(self, batch: SamBatch, batch_idx: int) -> torch.Tensor:
        self.weights_at.setdefault(self.global_step, self.layer.weight.detach().clone())
        hidden = self.layer(batch.image.mean(dim=(2, 3)))
        if self.global_step in self.nan_grad or -1 in self.nan_grad:
            hidden.register_hook(lambda grad: grad * float("nan"))  # the loss stays finite
        loss = hidden.square().mean()
        if self.global_step in self.inf_loss:
            loss = loss + torch.tensor(float("inf"))  # gradients stay finite
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def loader(n: int = 4, per_batch: int = 2) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    batches = [
        SamBatch(
            image=torch.rand(per_batch, 3, 8, 8, generator=gen),
            path=[f"/data/img_{b}_{i}.png" for i in range(per_batch)],
        )
        for b in range(n)
    ]
    return DataLoader(batches, batch_size=None)


def trainer(check: NonFiniteCheck, **kwargs) -> Trainer:
    options = {
        "max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False,
    }  # fmt: skip
    return Trainer(callbacks=[check], **{**options, **kwargs})


def test_non_finite_gradient_with_finite_loss_stops_before_the_step():
    model = Tiny(nan_grad=(2,))
    with pytest.raises(NonFiniteError) as info:
        trainer(NonFiniteCheck()).fit(model, loader())
    message = str(info.value)
    assert "non-finite gradient of layer.weight and 1 more at global step 2, epoch 0, batch 2" in message
    assert "files /data/img_2_0.png, /data/img_2_1.png" in message
    assert "\n" not in message
    assert torch.equal(model.layer.weight, model.weights_at[2])  # no step was taken
    assert torch.isfinite(model.layer.weight).all() and torch.isfinite(model.layer.bias).all()


def test_infinite_loss_with_finite_gradients_is_caught():
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(inf\) at global step 1, epoch 0, batch 1"):
        trainer(NonFiniteCheck()).fit(Tiny(inf_loss=(1,)), loader())


def test_accumulated_batches_name_the_one_with_the_bad_loss():
    """With 2 batches per step, a NaN loss in the second one names that batch and its files only."""

    class NaNOnBatch3(Tiny):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 3 else loss

    model = NaNOnBatch3()
    with pytest.raises(NonFiniteError) as info:
        trainer(NonFiniteCheck(), accumulate_grad_batches=2).fit(model, loader(n=6))
    message = str(info.value)
    assert "at global step 1, epoch 0, batch 3, files /data/img_3_0.png, /data/img_3_1.png." in message


def test_skip_mode_leaves_weights_and_optimizer_state_unchanged():
    model = Tiny(nan_grad=(1,))
    check = NonFiniteCheck(action="skip")
    trainer(check).fit(model, loader())
    assert (check.skipped, check.steps) == (1, 4)
    assert check.skipped_files == ["/data/img_1_0.png", "/data/img_1_1.png"]
    assert torch.equal(model.weights_at[1], model.weights_at[2])  # the skipped step changed nothing
    assert not torch.equal(model.weights_at[0], model.weights_at[1])  # the others did
    state = model.trainer.optimizers[0].state[model.layer.weight]
    assert int(state["step"]) == 3 and torch.isfinite(state["exp_avg_sq"]).all()
    assert torch.isfinite(model.layer.weight).all()


def test_skip_mode_fails_when_every_step_of_an_epoch_is_skipped():
    model = Tiny(nan_grad=(-1,))
    with pytest.raises(NonFiniteError, match="all 4 steps of epoch 0 had a non-finite loss or gradient"):
        trainer(NonFiniteCheck(action="skip")).fit(model, loader())
    assert torch.equal(model.layer.weight, model.weights_at[0])


def test_skip_mode_fails_when_every_step_of_the_run_is_skipped():
    """Stopped by max_steps inside the epoch: the (shortened) epoch's end notices that nothing was learnt."""
    with pytest.raises(NonFiniteError, match="all 2 steps of epoch 0 had a non-finite loss or gradient"):
        trainer(NonFiniteCheck(action="skip"), max_steps=2).fit(Tiny(nan_grad=(-1,)), loader())


def test_with_a_grad_scaler_gradients_are_left_to_it_and_a_nan_loss_still_stops():
    """16-mixed: the GradScaler skips steps with inf/NaN gradients itself (its scale search makes them)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def fp16(check: NonFiniteCheck) -> Trainer:
        return trainer(check, plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])

    check, model = NonFiniteCheck(), Tiny(nan_grad=(1,))
    fp16(check).fit(model, loader())
    assert (check.skipped, check.steps) == (0, 4) and torch.isfinite(model.layer.weight).all()

    class NaNLossAt2(Tiny):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 2 else loss

    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at global step 2, epoch 0, batch 2"):
        fp16(NonFiniteCheck()).fit(NaNLossAt2(), loader())


def test_finite_run_is_untouched():
    check = NonFiniteCheck()
    model = Tiny()
    trainer(check).fit(model, loader())
    assert (check.skipped, check.steps) == (0, 4)


def test_bad_action_is_refused():
    with pytest.raises(ValueError, match="action must be 'error' or 'skip'"):
        NonFiniteCheck(action="ignore")  # type: ignore[arg-type]


def test_option_is_documented_in_help(capsys):
    from samflow.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--non_finite.action {error,skip}" in out and "train/skipped_non_finite" in out


INF_ON_RANK_1 = '''
import torch.distributed as dist
from samflow.plugins.base import SamPlugin


class InfOnRank1(SamPlugin):
    """An infinite constant loss term (the gradients stay finite) at global step 1, on rank 1 only."""

    def losses(self, out, batch, ctx):
        if ctx.training and ctx.global_step == 1 and dist.is_initialized() and dist.get_rank() == 1:
            return {"inf": out.pred.new_tensor(float("inf"))}
        return {}
'''


def test_ddp_ranks_stop_together_when_one_rank_diverges(tmp_path, plugin_dir, data_root):
    """Only rank 1 sees the bad loss; both ranks stop at the same step (no rank left waiting), exit 1."""
    (plugin_dir / "inf_rank1.py").write_text(INF_ON_RANK_1)
    args = [
        *fit_args(data_root, [], epochs=1, batches=3),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--model.plugins.inf", "{class_path: inf_rank1.InfOnRank1}",
    ]  # fmt: skip
    proc = samflow(args, tmp_path, plugin_dir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("samflow: error:")]
    assert len(errors) == 2, proc.stderr[-3000:]  # one line per process
    assert sum("non-finite loss (inf) at global step 1, epoch 0, batch 1, files " in e for e in errors) == 1
    assert (
        sum("non-finite loss or gradient on another process at global step 1, epoch 0" in e for e in errors)
        == 1
    )
    assert "Traceback" not in proc.stderr
    checkpoints_are_finite(tmp_path / "runs")


def test_evaluating_non_finite_weights_is_one_line_not_zero_metrics(tmp_path, plugin_dir, data_root):
    """A checkpoint whose mask tokens are NaN: `samflow validate` stops with one line naming the set and
    the count, exit 1, instead of reporting IoU 0 (a NaN map thresholds to an empty mask)."""
    fit = fit_args(data_root, [], epochs=1, batches=1)
    fit = fit[: fit.index("--model.plugins.nan")]
    assert samflow(fit, tmp_path, plugin_dir).returncode == 0
    checkpoint = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    key = "model.sam.mask_decoder.mask_tokens.weight"
    state["state_dict"][key] = torch.full_like(state["state_dict"][key], float("nan"))
    torch.save(state, tmp_path / "nan.ckpt")
    args = ["validate", *fit[1:], "--ckpt_path", str(tmp_path / "nan.ckpt")]
    proc = samflow(args, tmp_path, plugin_dir)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("samflow: error:")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert "val: the model predicted NaN or infinite values for 2 prompt row(s) of 2 image(s)" in lines[0]


def test_float16_on_the_cpu_is_named_as_the_likely_cause_of_a_divergence():
    from lightning.pytorch import Trainer

    from samflow.callbacks.finite import half_precision_hint

    def hint(precision: str) -> str:
        return half_precision_hint(Trainer(accelerator="cpu", precision=precision, logger=False))

    assert "float16 on the CPU (--trainer.precision 16-true)" in hint("16-true")
    assert hint("32-true") == hint("bf16-mixed") == ""
