"""W&B's side of sweeps: the flags ``wandb agent`` passes, the run folder of each agent run, and
``samflow sweep --backend wandb``.

``wandb agent`` starts every run with the sweep file's ``command``, ``${args}`` becoming
``--key=value`` with Python's spelling of the value: ``--a=None``, ``--a=True``, ``--a=[1, 2]``,
``--a=1e-05``. ``agent_values`` rewrites each ``--key=value`` whose value is a Python literal into
JSON (``null``, ``true``, ``[1, 2]``), which jsonargparse reads as YAML; other values pass unchanged.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any

from samflow.experiment_files import ExperimentError

WANDB_COMMAND = ["${env}", "samflow", "fit", "--experiment", "EXPERIMENT", "${args}"]


def agent_values(args: list[str]) -> list[str]:
    """``--key=<Python literal>`` as ``--key=<JSON>``: ``None`` -> ``null``, ``True`` -> ``true``, ``[1, 'a']``
    -> ``[1, "a"]``, ``{'a': None}`` -> ``{"a": null}``; numbers and other values are kept as written."""
    out = []
    for arg in args:
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            try:
                literal = ast.literal_eval(value)
                if not isinstance(literal, (int, float)) or isinstance(literal, bool):
                    value = json.dumps(literal)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                pass  # not a Python literal: a path, a name, a YAML value
            arg = f"{key}={value}"
        out.append(arg)
    return out


def run_folder_args(
    folder: Path,
    group: str,
    *,
    wandb_id: str | None = None,
    project: str | None = None,
    entity: str | None = None,
) -> list[str]:
    """Flags that put a run into ``folder`` (CSV metrics, checkpoints, config) and its W&B run into ``group``
    (of ``project`` and ``entity``, W&B's default entity when None)."""
    wandb: dict[str, Any] = {
        "project": project or "samflow",
        "name": f"{group}/{folder.name}",
        "save_dir": "runs",
    }
    wandb["group"] = group
    if entity:
        wandb["entity"] = entity
    if wandb_id:
        wandb["id"] = wandb_id
    loggers = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(folder.parent), "name": "", "version": folder.name},
        },
        {"class_path": "samflow.callbacks.wandb_run.SamflowWandbLogger", "init_args": wandb},
    ]
    return [f"--trainer.default_root_dir={folder}", f"--trainer.logger={json.dumps(loggers)}"]


def agent_args(args: list[str], experiment: str | None) -> list[str]:
    """``samflow`` arguments as W&B's agent gives them, made to parse and to run in a folder of their own.

    Under ``wandb agent`` (``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID`` set) a ``fit`` without its own
    ``--trainer.logger`` / ``--trainer.default_root_dir`` writes to
    ``runs/<experiment>/sweeps/<sweep id>/<run id>`` and logs to the agent's W&B run, grouped by the sweep.
    """
    args = agent_values(args)
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    own = any(a.split("=", 1)[0] in ("--trainer.logger", "--trainer.default_root_dir") for a in args)
    if not (sweep and run and experiment and args and args[0] == "fit") or own:
        return args
    folder = Path("runs") / experiment / "sweeps" / sweep / run
    return [*args, *run_folder_args(folder, sweep, wandb_id=run, project=os.environ.get("WANDB_PROJECT"))]


# ---- --backend wandb ----
def wandb_sweep_config(spec: Any) -> dict[str, Any]:
    """The W&B sweep config of a sweep file: its keys, parameters as dotted samflow options (W&B's agent
    passes a nested group as one dict flag), and ``command`` running ``samflow fit`` on the experiment."""
    config = {k: v for k, v in spec.raw.items() if k not in ("parameters", "command", "program")}
    config["parameters"] = {key: _wandb_param(spec, key) for key in spec.params}
    config["command"] = [spec.experiment if w == "EXPERIMENT" else w for w in WANDB_COMMAND]
    config["command"][-1:-1] = spec.args
    config.setdefault("name", spec.name)
    return config


def _wandb_param(spec: Any, key: str) -> dict[str, Any]:
    """The parameter's spec as written (nested groups flattened to its dotted key)."""
    node: Any = spec.raw["parameters"]
    if key in node:
        return dict(node[key])
    parts = key.split(".")
    for i, part in enumerate(parts):  # W&B's nested form, possibly mixed with dotted keys
        rest = ".".join(parts[i:])
        if rest in node and not (isinstance(node[rest], dict) and "parameters" in node[rest]):
            return dict(node[rest])
        node = node[part]["parameters"]
    raise KeyError(key)


def has_wandb_account() -> bool:
    """Whether W&B can reach an account: a mode that is online and an API key (``WANDB_API_KEY``, or the
    netrc entry ``wandb login`` writes for the W&B host), as ``samflow.cli.configure_wandb`` decides."""
    from samflow.cli import wandb_credentials

    if os.environ.get("WANDB_MODE") in ("disabled", "offline", "dryrun"):
        return False
    return wandb_credentials()


def run_wandb(spec: Any, trials: int | None) -> int:
    """Create the sweep through W&B's API and run W&B's agent here for ``trials`` runs (all, when None).

    The agent starts ``samflow fit --experiment X --key=value ...`` per run, in its own process and
    folder (``agent_args``); more agents on other machines join with ``wandb agent ENTITY/PROJECT/ID``.
    """
    if not has_wandb_account():
        mode = os.environ.get("WANDB_MODE")
        why = (
            f"WANDB_MODE is {mode!r}"
            if mode in ("disabled", "offline", "dryrun")
            else "no W&B API key is set"
        )
        raise ExperimentError(
            f"--backend wandb needs a W&B account ({why}): run `wandb login` (or set WANDB_API_KEY) and "
            "unset WANDB_MODE, or use the default --backend optuna, which needs no server."
        )
    import wandb

    from samflow.sweep.check import check_sweep, experiment_path

    check_sweep(spec, experiment_path(spec))  # before W&B creates the sweep
    config = wandb_sweep_config(spec)
    sweep_id = wandb.sweep(
        config, project=spec.raw.get("project") or "samflow", entity=spec.raw.get("entity")
    )
    print(
        f"samflow: W&B sweep {sweep_id}; add agents elsewhere with `wandb agent <entity>/<project>/{sweep_id}`"
    )
    wandb.agent(
        sweep_id, count=trials, project=spec.raw.get("project") or "samflow", entity=spec.raw.get("entity")
    )
    return 0
