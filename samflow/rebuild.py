"""Rebuilding a trained model from a run's config and weights (``Predictor.from_run`` /
``from_checkpoint``, ``samflow.export``, ``samflow predict-slide``, ``samflow pseudo-masks``).

``run_files`` finds a run's checkpoint and ``config.yaml``; ``read_run_config`` reads the model section
and the predictor options; ``build_model`` rebuilds SAM and the plugins; ``load_trained_checkpoint`` (``read_checkpoint_state``
and ``load_trained_state``) loads the trained weights, strictly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from samflow.module import SAM_PREFIX, SamSpec
from samflow.paths import where_looked
from samflow.plugins import PluginStack, SamPlugin
from samflow.plugins.registry import discover
from samflow.predictor_types import PredictorError
from samflow.sam import CheckpointError, HookedSam, build_sam
from samflow.sam_spec import BuiltOn, check_trained_on

__all__ = [
    "build_model",
    "load_trained_checkpoint",
    "load_trained_state",
    "read_checkpoint_state",
    "read_run_config",
    "run_files",
]


def run_files(source: str | Path, checkpoint: str | Path | None = None) -> tuple[Path, Path]:
    """(checkpoint, config.yaml) of a run folder or of a checkpoint file.

    A run folder gives ``checkpoint`` (a file name in its ``checkpoints/`` or a path), else
    ``checkpoints/last.ckpt``, else the only checkpoint there; a checkpoint file gives its run's
    ``config.yaml`` (``../config.yaml`` when it lies in ``checkpoints/``).
    """
    path = Path(source).expanduser()
    if path.is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return path, run / "config.yaml"
    if not (path / "config.yaml").is_file():
        raise PredictorError(
            f"{path} is not a samflow run folder (no config.yaml) nor a checkpoint file; pass "
            "runs/<experiment>/version_N or a .ckpt file."
        )
    folder = path / "checkpoints"
    if checkpoint is not None:
        given = Path(checkpoint).expanduser()
        # a name in the run's checkpoints/ is that file, also when the working directory holds one so named
        inside = folder / given
        chosen = given if given.is_absolute() or (given.exists() and not inside.is_file()) else inside
        return chosen, path / "config.yaml"
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt", path / "config.yaml"
    found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if len(found) != 1:
        raise PredictorError(
            f"{folder}: {'no checkpoint' if not found else f'{len(found)} checkpoints'} and no last.ckpt; "
            "pass the checkpoint (a file name there or a path)."
        )
    return found[0], path / "config.yaml"


def read_run_config(path: str | Path) -> dict[str, Any]:
    """A run's resolved ``config.yaml`` -> ``{"model": model section, "predictor": Predictor options}``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PredictorError(
            f"Run config {str(path)!r} does not exist; pass config= (the config.yaml samflow fit wrote in the run folder)."
        )
    config = yaml.safe_load(path.read_text()) or {}
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise PredictorError(f"{path} has no model section; pass the config.yaml samflow fit wrote.")
    data = config.get("data") or {}
    data = data.get("init_args", data) if isinstance(data, dict) else {}
    options: dict[str, Any] = {
        "resize_mode": data.get("resize_mode") or "longest",
        "image_resize": data.get("image_resize") or "sam",
    }
    threshold = model.get("threshold")
    if threshold is not None and 0 <= float(threshold) < 1:  # p > t as a logit: p > 0 is every finite logit
        t = float(threshold)
        options["mask_threshold"] = -math.inf if t == 0 else math.log(t / (1 - t))
    return {"model": model, "predictor": options, "config": config}


SAM_CHECKPOINT_FLAG = "sam_checkpoint= (--sam-checkpoint)"  # how a rebuilt model's user gives the SAM file


def build_model(model: Mapping[str, Any], *, sam_checkpoint: str | Path | None = None) -> HookedSam:
    """SAM and the plugins of a run's ``model`` section (``sam``, ``plugins``), SAM's weights loaded."""
    from jsonargparse import ArgumentParser

    spec = SamSpec(
        **{
            f.name: (model.get("sam") or {})[f.name]
            for f in fields(SamSpec)
            if f.name in (model.get("sam") or {})
        }
    )
    if sam_checkpoint is not None:
        spec.checkpoint = str(sam_checkpoint)
    elif spec.checkpoint and not Path(spec.checkpoint).expanduser().is_file():
        # the run's own path, e.g. from another machine, which the user did not type here
        raise PredictorError(
            f"SAM checkpoint {spec.checkpoint!r} (model.sam.checkpoint of the run's config) does not exist"
            f"{where_looked(spec.checkpoint)}; "
            f"pass the SAM file the run was trained on with {SAM_CHECKPOINT_FLAG}."
        )
    discover()  # plugins named by their short class name resolve, broken ones are known
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--plugins", type=dict[str, SamPlugin] | None, default=None)
    try:
        plugins = parser.instantiate_classes(parser.parse_object({"plugins": model.get("plugins")})).plugins
    except Exception as err:  # jsonargparse reports bad specs in several types
        raise PredictorError(f"model.plugins of the run cannot be built: {err}") from err
    # the variant is the run's: a file of another one is refused naming the file and the flag
    sam = build_sam(
        spec.variant,
        spec.checkpoint,
        spec.img_size,
        seed=spec.seed,
        flag=SAM_CHECKPOINT_FLAG,
        variant_flag=None,
    )
    hooked = HookedSam(sam, PluginStack(plugins or {}), spec.multimask_output)
    hooked.built_on = BuiltOn.of(
        spec, flag=SAM_CHECKPOINT_FLAG, variant_flag="the run's model.sam.variant (its config.yaml)"
    )
    return hooked


def read_checkpoint_state(path: Path) -> tuple[dict[str, Tensor], Any]:
    """The state dict of a Lightning checkpoint, loaded with ``weights_only=True``, keys of ``HookedSam``,
    and its ``samflow`` entry (the frozen SAM it was trained on; None in a checkpoint without one)."""
    try:
        # a module built in Python keeps its SamSpec: allowed by samflow.sam_spec for the process
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(
            f"Cannot read checkpoint {str(path)!r} with weights_only=True ({type(err).__name__}); pass a "
            "checkpoint samflow fit wrote (runs/<experiment>/version_N/checkpoints/*.ckpt)."
        ) from err
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state_dict; pass a checkpoint samflow fit wrote.")
    prefix = SAM_PREFIX.split(".")[0] + "."  # "model."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, checkpoint.get("samflow")


def load_trained_checkpoint(model: HookedSam, path: Path | str) -> None:
    """Load the trained weights of the Lightning checkpoint at ``path`` into ``model``, strictly
    (``load_trained_state``), after checking that it was trained on the model's frozen SAM
    (``check_trained_on``: the variant, the SAM file's SHA-256 or the random seed)."""
    state, recorded = read_checkpoint_state(Path(path))
    if isinstance(model.built_on, BuiltOn):
        check_trained_on(recorded, model.built_on, source=str(path))
    load_trained_state(model, state, str(path))


def load_trained_state(model: HookedSam, state: Mapping[str, Tensor], source: str) -> None:
    """Load plugin weights and trained SAM parts into ``model``; its frozen SAM weights stay.

    Strict: every key the model trains or holds outside the frozen SAM must be in ``state``, and
    ``state`` may hold nothing the model lacks; otherwise one error names the keys and ``source``.
    """
    stack = model.plugins
    frozen = {f"sam.{k}" for k in getattr(stack, "frozen_sam_keys", set())}
    expected = model.state_dict()
    needed = set(expected) - frozen
    missing = sorted(needed - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the run's model: missing {len(missing)} keys ({', '.join(missing[:4])}), "
            f"unexpected {len(unexpected)} ({', '.join(unexpected[:4])}); pass the config.yaml of the run "
            "that wrote it."
        )
    full = {**expected, **state}
    model.load_state_dict(full, strict=True)
