"""``SameExperiment``: a resumed fit refuses an experiment changed in a way that changes its training.

``--resume`` (or ``--ckpt_path``) continues a run from its checkpoint with the experiment and flags of
the new command. Some changes cannot continue the run exactly, and none of them failed before: another
``data.init_args.batch_size`` made the loader skip another number of images of the resumed epoch,
another plugin option or loss trained on differently, another optimizer or scheduler setting was
overwritten by the checkpoint's state without a word. The fit records its training settings in every
checkpoint; a resume compares them with its own and refuses a change in one that defines the training,
naming the key and both values. A change a user may mean (more epochs, other devices, another
validation set or data folder, other metrics) is allowed, the last ones with a warning that names it.
A run whose ``seed_everything`` was ``true`` (a random seed) resumes with the seed it drew.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from samflow.components import plain_config

__all__ = [
    "ResumeError",
    "SameExperiment",
    "check_fit_config",
    "check_resume",
    "saved_settings",
    "training_settings",
]


class ResumeError(ValueError):
    """A resume that cannot continue its run exactly (a changed training setting, gradients of another
    accumulation); one ``samflow: error:`` line naming the key and what to do."""


#: trainer options that change the training itself (others, max_epochs included, may change)
TRAINER_REFUSED = (
    "accumulate_grad_batches",
    "precision",
    "limit_train_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
)
TRAINER_WARNED = ("devices", "num_nodes", "callbacks")
#: model options that do not change the numbers (files and the speed of the encoder)
MODEL_FREE = (
    "sam.checkpoint",
    "sam.embedding_store",
    "sam.encoder_cache",
    "sam.encoder_cache_stages",
    "sam.checkpoint_blocks",
)
MODEL_WARNED = ("metrics", "threshold")
#: data options that do not change the numbers, and those that name data a user may have moved
DATA_FREE = ("num_workers", "pin_memory", "persistent_workers", "test", "predict")
DATA_WARNED = ("train", "val", "val_sets", "root")


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def _rule(key: str) -> str:
    """``refuse``, ``warn`` or ``free`` for a change of ``key``."""
    section, _, rest = key.partition(".")
    parts = rest.split(".")
    if section == "seed_everything":
        return "refuse"
    if section == "trainer":
        return "refuse" if rest in TRAINER_REFUSED else "warn" if parts[0] in TRAINER_WARNED else "free"
    if section == "model":
        if any(rest == k or rest.startswith(k + ".") for k in MODEL_FREE):
            return "free"
        return "warn" if parts[0] in MODEL_WARNED else "refuse"
    if section == "data":
        if any(p in DATA_FREE for p in parts):
            return "free"
        return "warn" if any(p in DATA_WARNED for p in parts) else "refuse"
    return "free"


def training_settings(config: Any) -> dict[str, str]:
    """The settings of a fit config that a resume compares, as ``{dotted key: JSON value}``."""
    plain = plain_config(config) or {}
    flat: dict[str, Any] = {"seed_everything": plain.get("seed_everything")}
    for section in ("model", "data", "trainer"):
        flat.update(_flat(plain.get(section), section))
    return {
        key: json.dumps(value, sort_keys=True, default=str)
        for key, value in flat.items()
        if _rule(key) != "free"
    }


def saved_settings(ckpt_path: str | Path) -> dict[str, str] | None:
    """The training settings a checkpoint recorded (None: written without ``SameExperiment``).

    The file is memory-mapped: only the small entry read is loaded, not the weights. A file that cannot
    be read so gives None too: Lightning's own loading reports it.
    """
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file: Lightning loads it next and says why
        return None
    state = checkpoint.get("callbacks", {}).get(SameExperiment.STATE_KEY)
    return None if state is None else dict(state.get("settings") or {})


def check_fit_config(config: Any, random_seed: bool = False) -> bool:
    """Before a ``samflow fit`` with a checkpoint builds anything: refuse a changed training setting
    (``check_resume``) and, when the seed was drawn at random, seed with the run's. True when checked."""
    ckpt = config.get("ckpt_path")
    if not ckpt or not Path(ckpt).is_file():
        return False
    saved = saved_settings(ckpt)
    if saved is None:
        return False
    settings = check_resume(saved, training_settings(config), random_seed)
    seed = json.loads(settings["seed_everything"])
    if seed != config.get("seed_everything"):
        config["seed_everything"] = seed
        seed_everything(seed, workers=True)
        rank_zero_info(f"samflow: resuming with the run's seed {seed} (seed_everything: true).")
    return True


def check_resume(
    saved: dict[str, str],
    settings: dict[str, str],
    random_seed: bool = False,
    restart: str = "start a new run without --resume / --ckpt_path",
) -> dict[str, str]:
    """Refuse a change of a setting that defines the training; warn about one a user may mean.

    Returns ``settings``, with the run's seed when the command's ``seed_everything`` was ``true``
    (``random_seed``); the caller seeds with it. ``restart``: the refusal's other way out.
    """
    settings, seed = dict(settings), "seed_everything"
    if random_seed and saved.get(seed, "null") not in ("null", "true", "false"):
        settings[seed] = saved[seed]
    absent = json.dumps(None)
    changed = [
        (key, saved.get(key, absent), settings.get(key, absent))
        for key in sorted(saved.keys() | settings.keys())
        if saved.get(key, absent) != settings.get(key, absent)
    ]
    refused = [c for c in changed if _rule(c[0]) == "refuse"]
    if refused:
        listed = "; ".join(f"{key}: run {old}, now {new}" for key, old, new in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise ResumeError(
            f"the resumed run was trained with other settings ({listed}{more}): an exact resume needs "
            "the run's values (the checkpoint's optimizer and scheduler state would also override new "
            f"ones). Resume with them, or {restart}."
        )
    for key, old, new in changed:
        rank_zero_warn(f"samflow: resuming with {key} {new} (the run had {old}).")
    return settings


class SameExperiment(Callback):
    """Record the fit's training settings in its checkpoints; refuse a resume that changed one of them.

    Args:
        settings: ``training_settings`` of the command's config.
        random_seed: the command's ``seed_everything`` was ``true``: a resume takes the run's seed.
        checked: the resume was checked already (``samflow fit`` checks before building anything).
    """

    STATE_KEY = "SameExperiment"

    def __init__(self, settings: dict[str, str], random_seed: bool = False, checked: bool = False) -> None:
        self.settings, self.random_seed, self.checked = dict(settings), random_seed, checked

    @property
    @override
    def state_key(self) -> str:
        return self.STATE_KEY

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.checked:
            return
        settings = check_resume(dict(state_dict.get("settings") or {}), self.settings, self.random_seed)
        seed = settings.get("seed_everything")
        if seed is not None and seed != self.settings.get("seed_everything"):
            seed_everything(int(json.loads(seed)), workers=True)  # before the loaders are built
            rank_zero_info(f"samflow: resuming with the run's seed {seed} (seed_everything: true).")
        self.settings = settings
