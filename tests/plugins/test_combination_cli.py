"""Two plugins that cannot run together, as a user meets them in ``samflow fit``: one error line, exit 1."""

from __future__ import annotations

from helpers import samflow_here, short_run
from test_plugin_errors_cli import error_line

ONE_STEP = [
    "fit", "--experiment", "quickstart", *short_run(train=1, val=0), "--trainer.limit_val_batches", "0",
]  # fmt: skip


def test_hq_sam_added_to_the_quickstarts_predicting_tokens_is_one_line_when_the_model_is_built(tmp_path):
    args = [*ONE_STEP, "--model.plugins.hq", "{class_path: HQSam, init_args: {num_points: 64}}"]
    line = error_line(samflow_here(args, tmp_path, timeout=300))
    assert "Plugins 'tokens' (ExtraTokens) and 'hq' (HQSam) both give the model's prediction" in line
    assert "model.plugins" in line


def test_two_rates_for_the_mask_decoder_are_one_line_when_the_model_is_built(tmp_path):
    args = [*ONE_STEP, "--model.plugins.adapter", "{class_path: SamAdapter, init_args: {lr: 0.01}}"]
    line = error_line(samflow_here(args, tmp_path, timeout=300))
    assert "'decoder' (DecoderTuning) and 'adapter' (SamAdapter) both train SAM part 'mask_decoder'" in line
