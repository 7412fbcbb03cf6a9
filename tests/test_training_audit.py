"""The optimizer holds every trainable parameter exactly once, in its owner's group, and nothing else;
the warm-up counts optimizer steps, also with accumulation, limited epochs and a resume."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from samflow.callbacks.warmup import LinearWarmup
from samflow.module import ModelConfigError, SamflowModule, SamSpec
from samflow.plugins import SamPlugin
from samflow_plugins.tokens import ExtraTokens


class DeltaLinear(nn.Module):
    """A frozen linear layer plus a learnable delta (zero at the start)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.delta = nn.Linear(base.in_features, base.out_features, bias=False)
        nn.init.zeros_(self.delta.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.delta(x)


class KeepsInjected(SamPlugin):
    """Injects a module into SAM's decoder and keeps it as its own attribute too (as many plugins do),
    so its parameters are both the plugin's and SAM's."""

    def setup(self, sam):
        head = sam.mask_decoder.iou_prediction_head.layers
        self.wrapped = DeltaLinear(head[0])
        head[0] = self.wrapped


class TrainsBehindTheStack(SamPlugin):
    """Turns a SAM part trainable in ``setup`` instead of naming it in ``sam_modules_to_train``."""

    def setup(self, sam):
        sam.mask_decoder.iou_prediction_head.requires_grad_(True)


def _module(**plugins: SamPlugin) -> SamflowModule:
    torch.manual_seed(0)
    return SamflowModule(sam=SamSpec(variant="tiny"), plugins=plugins, losses={"bce": 1.0})


def test_a_parameter_the_plugin_and_sam_share_is_stepped_once():
    module = _module(keep=KeepsInjected(lr=0.5))
    module.optimizer = torch.optim.SGD
    optimizer = module.configure_optimizers()
    weight = module.plugins["keep"].wrapped.delta.weight
    assert [id(p) for group in optimizer.param_groups for p in group["params"]] == [id(weight)]
    out, _ = module(random_batch(2))
    out.iou_pred.sum().backward()
    before, grad = weight.detach().clone(), weight.grad.clone()
    assert grad.abs().sum() > 0
    optimizer.step()  # by lr * grad: a parameter listed twice would move twice
    torch.testing.assert_close(weight.detach(), before - 0.5 * grad, rtol=0, atol=1e-7)
    # and it is counted once in what the run prints at start
    assert module.plugins.trainable_counts() == {"keep": weight.numel()}


def test_a_trainable_parameter_no_plugin_owns_is_refused_by_name():
    module = _module(tokens=ExtraTokens(), direct=TrainsBehindTheStack())
    with pytest.raises(
        ModelConfigError,
        match=r"no plugin owns.*model\.sam\.mask_decoder\.iou_prediction_head\.layers\.0\.weight.*sam_modules_to_train",
    ):
        module.configure_optimizers()


def test_every_trainable_parameter_is_in_exactly_one_group_and_no_frozen_one():
    from samflow_plugins.decoder_tuning import DecoderTuning
    from samflow_plugins.hq_sam import HQSam

    module = _module(hq=HQSam(lr=1e-3, weight_decay=0.0), decoder=DecoderTuning(weight_decay=0.5))
    optimizer = module.configure_optimizers()
    ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in module.parameters() if p.requires_grad}
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert (groups["hq"]["lr"], groups["hq"]["weight_decay"]) == (1e-3, 0.0)
    assert (groups["decoder"]["lr"], groups["decoder"]["weight_decay"]) == (optimizer.defaults["lr"], 0.5)


class _RecordingSGD(torch.optim.SGD):
    """SGD that records the rate each of its steps uses."""

    used: list[float]

    def step(self, closure=None):
        loss = closure() if closure is not None else None  # Lightning's closure: the training step
        self.used.append(self.param_groups[0]["lr"])
        super().step()
        return loss


class _Linear(LightningModule):
    def __init__(self, used: list[float]) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.used = used

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        optimizer = _RecordingSGD(self.parameters(), lr=0.1)
        optimizer.used = self.used
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1], 0.1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(8, 1)), batch_size=1)


def _fit_linear(root, used: list[float], epochs: int, ckpt_path=None) -> Trainer:
    trainer = Trainer(
        max_epochs=epochs, accumulate_grad_batches=2, limit_train_batches=3, logger=False,
        callbacks=[LinearWarmup(steps=4, ratio=0.2), ModelCheckpoint(dirpath=root, save_last=True)],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(_Linear(used), ckpt_path=ckpt_path)
    return trainer


def test_warmup_counts_optimizer_steps_with_accumulation_limited_epochs_and_resume(tmp_path):
    """3 batches an epoch accumulated by 2: two optimizer steps an epoch (the last one on a single
    batch), so 4 warm-up steps span two epochs; a run resumed after the first epoch goes on warming."""
    used: list[float] = []
    assert _fit_linear(tmp_path / "whole", used, epochs=2).global_step == 4
    # regular rate 0.1 in epoch 0, 0.01 after the milestone; factor 0.2 + 0.8 s / 4 at step s
    assert used == pytest.approx([0.02, 0.04, 0.006, 0.008])
    first: list[float] = []
    _fit_linear(tmp_path / "parts", first, epochs=1)
    resumed: list[float] = []
    _fit_linear(tmp_path / "parts", resumed, epochs=2, ckpt_path=tmp_path / "parts" / "last.ckpt")
    assert first + resumed == pytest.approx(used)


def test_the_warm_up_wrapper_keeps_the_scheduler_mark_so_torch_does_not_warn():
    """``LinearWarmup`` wraps ``optimizer.step`` after Lightning built the scheduler, which had wrapped
    it first: torch warns at the scheduler's first step ("optimizer.step() has been overridden")
    unless the new wrapper carries the scheduler's mark; it does, and the scheduler's own wrapper
    still runs inside it."""
    import warnings
    from types import SimpleNamespace

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    warmup = LinearWarmup(steps=4)
    warmup.on_train_start(SimpleNamespace(optimizers=[optimizer], global_step=0), None)  # type: ignore[arg-type]
    weight.grad = torch.ones(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
        scheduler.step()
    assert optimizer._opt_called  # type: ignore[attr-defined]  # the scheduler's wrapper ran
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
