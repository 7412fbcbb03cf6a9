"""Training on 2 ranks equals training on one process: DDP splits the batch, not the result.

4 quickstart images, flipped and rotated at random, trained for one optimizer step at batch 4 in one
process, and at batch 2 on each of 2 CPU ranks, give the same weights: the ranks' training shards are
the one process's batch (the order comes from (seed, epoch)), each sample's prompt and transform come
from (seed, epoch, index) whatever process draws them, and DDP averages the ranks' gradients of their
mean losses, the mean over all 4 rows. Gradient accumulation (2 steps of batch 2) is the same step once
more. (Before, the transforms came from the process's generator, one draw per batch: the ranks, which
share its state, rotated their i-th images alike, and the step differed from one process's.)

The step is plain SGD, whose update is linear in the gradient. Under AdamW (the quickstart's) the
first update is about ``lr * sign(g)`` per element, so gradients that are zero up to rounding (an
attention key's bias: softmax cancels it) move by up to ``lr`` whichever way the rounding fell, and
the runs differ there by a few 1e-6 although the gradients agree to 1e-9.
"""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import run_samflow_commands
from test_ddp_exact_metrics import DDP, ONE, data_args

STEP = [
    "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
    "--model.optimizer.class_path", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.5",
    "--data.init_args.augment", "{hflip: 0.5, rotation: 30}",
]  # fmt: skip


def trained(work: Path, data: list[str], flags: dict[str, list[str]]) -> dict[str, dict[str, torch.Tensor]]:
    """One ``STEP`` of the quickstart on ``data`` for each entry of ``flags`` (name -> its flags), each
    fit in ``work/<name>``, all in one Python process (the imports paid once): name -> saved weights."""
    fit = ["fit", "--experiment", "quickstart", *data, *STEP]
    run_samflow_commands(work, {name: [*fit, *more] for name, more in flags.items()})
    ckpt = Path("runs", "quickstart", "version_0", "checkpoints", "last.ckpt")
    return {
        name: torch.load(work / name / ckpt, map_location="cpu", weights_only=True)["state_dict"]
        for name in flags
    }


def test_one_step_on_two_ranks_equals_one_process_and_accumulation(tmp_path):
    data = data_args(tmp_path / "data", 1)
    weights = trained(
        tmp_path,
        data,
        {
            "one": [*ONE, "--data.init_args.batch_size", "4"],
            "two": [*DDP, "--data.init_args.batch_size", "2"],
            "acc": [*ONE, "--data.init_args.batch_size", "2", "--trainer.accumulate_grad_batches", "2"],
            "more": [*ONE, "--data.init_args.batch_size", "4", "--trainer.max_steps", "2"],
        },
    )
    one, two, accumulated, further = (weights[name] for name in ("one", "two", "acc", "more"))
    assert one.keys() == two.keys() == accumulated.keys()
    moved = [k for k in one if one[k].is_floating_point() and (one[k] - further[k]).abs().max() > 1e-4]
    assert len(moved) > 20, "the steps hardly move the weights: the comparison below would prove little"
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(accumulated[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
