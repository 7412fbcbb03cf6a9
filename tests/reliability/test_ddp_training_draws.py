"""Plugins that draw train on 2 ranks as on one process: PA-SAM's Gumbel mining and HQ-SAM's loss
points come from each row's key (``ctx.rand``), not from the process's generator, which DDP ranks share.

The quickstart with PA-SAM (mining from the first step) and HQ-SAM (its point-sampled loss, its mask the
prediction) added, one
SGD step at batch 4 in one process against batch 2 on each of 2 CPU ranks, as
``test_ddp_training.py`` does for the quickstart alone. Had the draws been one per batch from the
process's generator, each rank would mine and sample its i-th row as the other rank does, and the step
would differ from one process's. The in-process half-batch tests (``tests/plugins/test_batch_split.py``,
``test_row_invariance_train.py``) check the same per row; this runs real DDP.
"""

from __future__ import annotations

import torch
from test_ddp_exact_metrics import DDP, ONE, data_args
from test_ddp_training import trained

PLUGINS = [
    "--model.plugins.pa.class_path", "PASam", "--model.plugins.pa.init_args.mining_start_epoch", "-1",
    "--model.plugins.hq.class_path", "HQSam", "--model.plugins.hq.init_args.point_loss", "true",
    "--model.plugins.tokens.init_args.predict", "false",  # HQ-SAM's mask is the prediction
]  # fmt: skip


def test_drawing_plugins_step_on_two_ranks_as_on_one_process(tmp_path):
    data = data_args(tmp_path / "data", 1)
    weights = trained(
        tmp_path,
        data,
        {
            "one": [*ONE, *PLUGINS, "--data.init_args.batch_size", "4"],
            "two": [*DDP, *PLUGINS, "--data.init_args.batch_size", "2"],
        },
    )
    one, two = weights["one"], weights["two"]
    assert one.keys() == two.keys()
    assert any(k.startswith("model.plugins.pa.") for k in one) and any(
        k.startswith("model.plugins.hq.") for k in one
    )
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
