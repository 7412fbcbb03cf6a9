"""A DDP fit in a process leaves the process as it found it (``samflow.process_state.restored_process_state``).

Lightning's ``ddp`` launcher makes the process that starts the ranks rank 0: it set ``MASTER_ADDR``,
``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK`` and ``OMP_NUM_THREADS`` (and one torch thread) for the
process and left its process group initialized; ``ddp_spawn`` left ``MASTER_PORT``. A later fit of the
process took itself for a launched rank of the old group: a 1-device fit after a 2-process ``ddp`` fit
waited forever. The fits run in a script of their own (``ddp`` starts rank 1 by running the script that
started rank 0 again, with the fit's arguments).
"""

from __future__ import annotations

import json
import os
import sys

from helpers import run_reaped

# set by a cluster or a launcher; not in the fits' process
LAUNCHED = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "OMP_NUM_THREADS")

SCRIPT = """
import json, os, sys
from samflow.cli import main

if "LOCAL_RANK" in os.environ:  # rank 1 of the ddp fit, started by Lightning with the fit's arguments
    raise SystemExit(main(sys.argv[1:]))


def state():
    import torch
    import torch.distributed as dist

    return {"env": dict(os.environ), "group": dist.is_initialized(), "threads": torch.get_num_threads()}


def changed(before, after):
    env = {k: [before["env"].get(k), after["env"].get(k)] for k in before["env"].keys() | after["env"].keys()}
    diff = {k: v for k, v in env.items() if v[0] != v[1]}
    diff.update({k: [before[k], after[k]] for k in ("group", "threads") if before[k] != after[k]})
    return diff


if __name__ == "__main__":  # not in ddp_spawn's processes, which import this file
    fit = ["fit", "--experiment", "quickstart", *sys.argv[1:]]
    report = {}
    for strategy in ("ddp", "ddp_spawn"):
        before = state()
        code = main([*fit, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", strategy])
        report[strategy] = {"code": code, "changed": changed(before, state())}
        if code or report[strategy]["changed"]:
            break  # what a later fit would run into
    else:
        report["one device"] = {"code": main([*fit, "--trainer.devices", "1"])}
    print("REPORT " + json.dumps(report))
"""

TINY = [
    "--quiet", "--trainer.enable_progress_bar=false", "--data.init_args.img_size=64", "--model.sam.img_size=64",
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
    "--trainer.num_sanity_val_steps", "0", "--data.init_args.batch_size", "2",
    "--data.init_args.quickstart.n_train", "4", "--data.init_args.quickstart.n_val", "4",
]  # fmt: skip


def test_a_ddp_fit_leaves_the_process_as_found_and_a_later_fit_runs(tmp_path):
    script = tmp_path / "fits.py"
    script.write_text(SCRIPT)
    data = ["--data.init_args.quickstart.root", str(tmp_path / "data")]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHED}
    env = {**env, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    # killed after 400 s with every process under it (rank 1 of a ddp fit, Lightning's child)
    proc = run_reaped([sys.executable, str(script), *TINY, *data], tmp_path, env, 400)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    assert report == {
        "ddp": {"code": 0, "changed": {}},
        "ddp_spawn": {"code": 0, "changed": {}},
        "one device": {"code": 0},
    }
