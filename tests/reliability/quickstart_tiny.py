"""The tiny quickstart command line that test_run_folder.py and test_checkpoint_monitor.py run in this
process (one or two training steps on 4 generated images, no sanity check)."""

from __future__ import annotations

from pathlib import Path

from helpers import samflow_in_process

TINY = [
    "--experiment",
    "quickstart",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "1",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_test_batches",
    "1",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.enable_progress_bar",
    "false",
    "--data.init_args.batch_size",
    "4",
    "--data.init_args.quickstart.n_train",
    "4",
    "--data.init_args.quickstart.n_val",
    "4",
]


def samflow(command: str, *args: str, data: Path) -> int:
    """``samflow COMMAND`` on the tiny quickstart in this process, as the console script runs it; one
    W&B run per command, as in a process of its own. Returns the exit status."""
    return samflow_in_process([command, *TINY, "--data.init_args.quickstart.root", str(data), *args])
