"""``samflow export``: a trained model as a small folder to share, or as a plain SAM checkpoint.

    samflow export RUN_OR_CKPT --out DIR [--merged] [--onnx [--single-mask]] [--sam-checkpoint PATH]
                   [--overwrite]

The folder holds:

- ``adapter.safetensors``: only the tensors training produced: every plugin's parameters and buffers,
  the SAM parts plugins train and the modules they put into SAM (the frozen SAM is left out, as in the
  slim checkpoint);
- ``config.yaml``: the run's resolved config (``model`` rebuilds SAM and the plugins, ``data`` gives
  the input geometry);
- ``samflow.json``: samflow's version, each plugin's class, distribution and version, the SAM
  variant, input size, and the SHA-256 of the SAM checkpoint the adapter was trained on (None for a
  random SAM), plus the adapter's tensor count and bytes.

``load_export`` (``Predictor.from_export``) reads it without pickle (safetensors, YAML, JSON) on top
of a SAM checkpoint, and refuses one whose SHA-256 differs from the recorded one unless forced.

``--merged`` writes ``sam_merged.pth`` instead: a full segment-anything state dict that
``sam_model_registry[variant](checkpoint=...)`` loads as is. Only plugins that change SAM's own
weights and nothing else can be merged: decoder tuning (trained SAM parts) and LoRA (its deltas
folded in by the plugin's ``merged_sam_state_dict``). A plugin with hooks, tokens or tensors of its
own is refused, by name.

``--onnx`` adds ``decoder.onnx``: SAM's prompt encoder and mask decoder with the plugins, on fixed
image embeddings, in segment-anything's ONNX form (``samflow.onnx_export``); plugins that do not
declare ``SamPlugin.onnx_exportable`` are refused by name. With onnxruntime installed the graph is
checked against PyTorch on random inputs, and the largest difference is recorded in ``samflow.json``.

``--overwrite`` removes the earlier export first; each file is written whole (beside its name, then
renamed), ``samflow.json`` last, so an interrupted export never loads as a finished one.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from samflow.outputs import file_sha256, write_whole
from samflow.plugins import PluginStack, SamPlugin
from samflow.plugins.registry import discover
from samflow.plugins.stack import HOOKS
from samflow.predictor_types import PredictorError
from samflow.rebuild import (
    build_model,
    load_trained_checkpoint,
    load_trained_state,
    read_run_config,
    run_files,
)
from samflow.sam import VARIANTS, HookedSam, build_sam
from samflow.usage import CommandParser

__all__ = [
    "ADAPTER",
    "ExportError",
    "export",
    "file_sha256",
    "load_export",
    "main",
    "merged_sam_state_dict",
    "trained_state",
]

ADAPTER = "adapter.safetensors"
CONFIG = "config.yaml"
MANIFEST = "samflow.json"
MERGED = "sam_merged.pth"
FORMAT = 1
#: The method a plugin that injects modules into SAM offers to fold them into SAM's weights
#: (``sam -> state dict with segment-anything's keys``; LoRA has it).
FOLD = "merged_sam_state_dict"

#: Hooks through which a plugin adds computation of its own (a SAM checkpoint cannot hold them);
#: ``losses`` only trains and ``sample_panels`` only draws validation pictures.
_FORWARD_HOOKS = tuple(h for h in HOOKS if h not in ("losses", "sample_panels"))


class ExportError(ValueError):
    """An export cannot be written or loaded as asked; the message names the file or plugin."""


def trained_state(model: HookedSam) -> dict[str, Tensor]:
    """What an adapter holds: ``model``'s state without the frozen SAM weights (``frozen_sam_keys``)."""
    frozen = {f"sam.{k}" for k in getattr(model.plugins, "frozen_sam_keys", set())}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


# ---- writing ----
def _plugin_record(plugin: SamPlugin) -> dict[str, str]:
    cls = type(plugin)
    record = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "distribution": "", "version": ""}
    for info in discover().values():
        if info.cls is cls:
            record.update(name=info.name, distribution=info.distribution, version=info.version)
            return record
    top = cls.__module__.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top) or []
    if dists:
        record.update(distribution=dists[0], version=importlib.metadata.version(dists[0]))
    return record


def export(
    source: str | Path,
    out: str | Path,
    *,
    merged: bool = False,
    sam_checkpoint: str | Path | None = None,
    overwrite: bool = False,
    onnx: bool = False,
    multimask_output: bool = True,
) -> list[Path]:
    """Export a run folder or checkpoint to ``out``; returns the files written.

    Args:
        source: ``runs/<experiment>/version_N`` (its ``checkpoints/last.ckpt``) or a ``.ckpt`` file.
        out: the folder to write (created; files already there are refused unless ``overwrite``).
        merged: write a full segment-anything checkpoint (``sam_merged.pth``) instead of an adapter.
        sam_checkpoint: the SAM file the run was trained on, when the config's path is not valid here.
        overwrite: replace an earlier export in ``out`` (all its files; refused otherwise).
        onnx: also write ``decoder.onnx``, the decoder side with the plugins (``samflow.onnx_export``).
        multimask_output: the ONNX graph's masks: SAM's tokens 1..3 (True) or token 0 (False).
    """
    ckpt, config_path = run_files(source)
    settings = read_run_config(config_path)
    model = build_model(settings["model"], sam_checkpoint=sam_checkpoint)
    load_trained_checkpoint(model, ckpt)
    from samflow.onnx_export import ONNX_FILE, check_onnx_exportable

    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"--out {str(folder)!r} is a file; pass a folder to write the export into.")
    if (folder / CONFIG).resolve() == config_path.resolve():
        raise ExportError(f"--out {str(folder)!r} is the run folder itself; pass another folder.")
    names = [MERGED] if merged else [ADAPTER, CONFIG, MANIFEST]
    if onnx and merged:
        raise ExportError(
            "--onnx and --merged exclude each other: --onnx exports the adapter's decoder side; a merged "
            "checkpoint is plain SAM, which segment-anything's scripts/export_onnx_model.py exports."
        )
    if onnx:
        check_onnx_exportable(model)  # refused before anything is written
        names.append(ONNX_FILE)
    state = merged_sam_state_dict(model) if merged else None  # refused before anything is written
    # an earlier export, of either kind: replaced as a whole, none of its files left beside the new one
    existing = [folder / n for n in (ADAPTER, CONFIG, MANIFEST, ONNX_FILE, MERGED) if (folder / n).exists()]
    if existing and not overwrite:
        raise ExportError(
            f"{', '.join(map(str, existing))} exist already; pass --overwrite to replace the earlier export, "
            "or another --out."
        )
    # every file of the earlier export goes first (its samflow.json with it), and samflow.json is written
    # last: an interrupted export is never a folder that loads as a finished one
    for stale in existing:
        stale.unlink()
    onnx_record = (
        _write_onnx(model, folder, multimask_output, settings["predictor"]["resize_mode"]) if onnx else None
    )
    if state is not None:
        folder.mkdir(parents=True, exist_ok=True)
        write_whole(folder / MERGED, lambda tmp: torch.save(state, tmp))
        return [folder / MERGED]
    sam_spec = settings["model"].get("sam") or {}
    sam_file = sam_checkpoint if sam_checkpoint is not None else sam_spec.get("checkpoint")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in trained_state(model).items()}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "samflow_version": importlib.metadata.version("samflow"),
        "plugins": {key: _plugin_record(p) for key, p in _stack(model).items()},
        "sam": {
            "variant": sam_spec.get("variant", "vit_b"),
            "img_size": model.img_size,
            "checkpoint_name": Path(sam_file).name if sam_file else None,
            "checkpoint_sha256": file_sha256(Path(sam_file).expanduser()) if sam_file else None,
            "seed": sam_spec.get("seed", 0),
        },
        "adapter": {"tensors": len(tensors), "values": sum(t.numel() for t in tensors.values())},
        "source": str(ckpt),
    }
    if onnx_record is not None:
        manifest["onnx"] = onnx_record
    folder.mkdir(parents=True, exist_ok=True)
    write_whole(
        folder / ADAPTER, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "samflow-adapter"})
    )
    write_whole(folder / CONFIG, lambda tmp: shutil.copyfile(config_path, tmp))
    write_whole(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return [folder / n for n in names]


def _write_onnx(model: HookedSam, folder: Path, multimask_output: bool, resize_mode: str) -> dict[str, Any]:
    """``decoder.onnx`` in ``folder``, checked with onnxruntime when it is installed -> its manifest entry."""
    from samflow.onnx_export import ONNX_FILE, OPSET, OUTPUTS, DecoderGraph, check_onnx, write_graph

    graph = DecoderGraph(model.eval(), multimask_output=multimask_output, resize_mode=resize_mode)
    path = write_whole(folder / ONNX_FILE, lambda tmp: write_graph(graph, tmp))
    record: dict[str, Any] = {
        "file": ONNX_FILE,
        "opset": OPSET,
        "inputs": graph.input_names,
        "outputs": list(OUTPUTS),
        "multimask_output": multimask_output,
        "resize_mode": resize_mode,
    }
    try:
        record["max_abs_difference"] = check_onnx(graph, path)
    except ImportError:
        record["max_abs_difference"] = None  # onnxruntime not installed: not checked
    return record


def _stack(model: HookedSam) -> PluginStack:
    return model.plugins if isinstance(model.plugins, PluginStack) else PluginStack()


def merged_sam_state_dict(model: HookedSam) -> dict[str, Tensor]:
    """``model``'s SAM as a plain segment-anything state dict (trained parts and folded deltas in).

    Raises ``ExportError`` naming the plugin when one adds computation (hooks, tokens) or tensors of
    its own, when injected modules cannot be folded, or when the SAM's input size is not its variant's
    (segment-anything builds the variant's size only).
    """
    stack = _stack(model)
    for key, plugin in stack.items():
        hooks = [h for h in _FORWARD_HOOKS if getattr(type(plugin), h) is not getattr(SamPlugin, h)]
        own = list(plugin.state_dict())
        if hooks or own:
            what = f"hooks {', '.join(hooks)}" if hooks else f"tensors of its own ({', '.join(own[:3])})"
            raise ExportError(
                f"Plugin {key!r} ({type(plugin).__name__}) cannot be merged into a SAM checkpoint: it adds "
                f"{what}. Export the adapter (without --merged) and load it with Predictor.from_export."
            )
    mergers = [(k, fold) for k, p in stack.items() if callable(fold := getattr(p, FOLD, None))]
    if len(mergers) > 1:
        raise ExportError(
            f"Plugins {[k for k, _ in mergers]} each fold weights into SAM; merge one at a time."
        )
    sam = model.sam
    state = dict(mergers[0][1](sam)) if mergers else dict(sam.state_dict())
    proj = getattr(getattr(sam.image_encoder, "patch_embed", None), "proj", None)
    blocks = getattr(sam.image_encoder, "blocks", ())
    variant = next(
        (
            n
            for n, v in VARIANTS.items()
            if getattr(proj, "out_channels", None) == v.embed_dim and len(blocks) == v.depth
        ),
        None,
    )
    if variant is None:
        raise ExportError("This SAM is not one of the variants segment-anything builds; it cannot be merged.")
    if model.img_size != VARIANTS[variant].img_size:
        raise ExportError(
            f"The SAM takes {model.img_size} px inputs; segment-anything's {variant} takes "
            f"{VARIANTS[variant].img_size}, so a merged checkpoint would not load. Export the adapter instead."
        )
    with torch.device("meta"):
        plain = set(build_sam(variant, seed=None).state_dict())
    extra, missing = sorted(set(state) - plain), sorted(plain - set(state))
    if extra or missing:
        owners = sorted({stack.owner_of(f"sam.{k}") or "?" for k in extra})
        raise ExportError(
            f"Plugins {owners} put modules into SAM that cannot be folded into its weights (keys {extra[:3]}, "
            f"missing {missing[:3]}); export the adapter instead."
        )
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


# ---- reading ----
def load_export(
    folder: str | Path, *, sam_checkpoint: str | Path | None = None, force: bool = False
) -> tuple[HookedSam, dict[str, Any]]:
    """Rebuild the model of an export folder: (``HookedSam`` with the adapter loaded, Predictor options).

    Nothing is unpickled: the adapter is safetensors, the config YAML, the manifest JSON. The SAM is
    ``sam_checkpoint`` or the config's ``model.sam.checkpoint``; its SHA-256 must be the one recorded
    (a random SAM has none: then no SAM file may be given), unless ``force`` (then it warns).
    """
    root = Path(folder).expanduser()
    for name in (ADAPTER, CONFIG, MANIFEST):
        if not (root / name).is_file():
            raise ExportError(
                f"{root} is not a samflow export: {name} is missing (write one with samflow export)."
            )
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ExportError(
            f"{root / MANIFEST}: export format {manifest.get('format')!r}, this samflow reads {FORMAT}."
        )
    settings = read_run_config(root / CONFIG)
    sam_file = (
        sam_checkpoint
        if sam_checkpoint is not None
        else (settings["model"].get("sam") or {}).get("checkpoint")
    )
    expected = manifest["sam"].get("checkpoint_sha256")
    if sam_file is not None and not Path(sam_file).expanduser().is_file():
        raise FileNotFoundError(
            f"SAM checkpoint {str(sam_file)!r} does not exist; pass sam_checkpoint= (--sam-checkpoint), "
            f"the file the adapter was trained on ({manifest['sam'].get('checkpoint_name')})."
        )
    actual = file_sha256(Path(sam_file).expanduser()) if sam_file is not None else None
    if actual != expected:
        what = (
            f"SAM checkpoint {str(sam_file)!r} has SHA-256 {actual[:12]}..."
            if actual
            else "no SAM checkpoint was given"
        )
        trained = (
            f"{manifest['sam'].get('checkpoint_name')} ({expected[:12]}...)"
            if expected
            else "a random SAM (no file)"
        )
        message = f"{root}: the adapter was trained on {trained}, but {what}."
        if not force:
            raise ExportError(
                message + " Pass the SAM checkpoint it was trained on, or force=True (Predictor.from_export)."
            )
        warnings.warn(message + " Loading anyway (forced).", stacklevel=2)
    model = build_model(settings["model"], sam_checkpoint=sam_file)
    load_trained_state(model, load_file(str(root / ADAPTER)), str(root / ADAPTER))
    return model, settings["predictor"]


# ---- the command ----
def main(argv: list[str]) -> int:
    """``samflow export RUN_OR_CKPT --out DIR [--merged] [--sam-checkpoint PATH] [--overwrite]``."""
    parser = CommandParser(
        prog="samflow export",
        description="Export a trained run: adapter.safetensors + config.yaml + samflow.json, or with "
        "--merged a full segment-anything checkpoint.",
    )
    parser.add_argument("source", help="run folder (runs/<experiment>/version_N) or checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="folder to write the export into")
    parser.add_argument(
        "--merged",
        action="store_true",
        help="write sam_merged.pth, a plain segment-anything checkpoint (decoder tuning, LoRA)",
    )
    parser.add_argument(
        "--sam-checkpoint", help="the SAM file the run was trained on, if not at the config's path"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace export files already in --out")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write decoder.onnx: prompt encoder + mask decoder with the plugins, on image embeddings",
    )
    parser.add_argument(
        "--single-mask",
        action="store_true",
        help="with --onnx: the graph returns SAM's single-mask output (token 0) instead of tokens 1..3",
    )
    args = parser.parse_args(argv)
    if args.single_mask and not args.onnx:
        parser.error("--single-mask applies to --onnx only")
    try:
        written = export(
            args.source,
            args.out,
            merged=args.merged,
            sam_checkpoint=args.sam_checkpoint,
            overwrite=args.overwrite,
            onnx=args.onnx,
            multimask_output=not args.single_mask,
        )
    except PredictorError as err:
        raise ExportError(str(err)) from err
    for path in written:
        print(f"{path}  ({path.stat().st_size:,d} bytes)")
    if args.onnx:
        manifest = Path(args.out).expanduser() / MANIFEST
        difference = json.loads(manifest.read_text())["onnx"]["max_abs_difference"]
        if difference is None:
            print("decoder.onnx not checked: pip install 'samflow[onnx]' for onnxruntime")
        else:
            print(f"decoder.onnx checked with onnxruntime: max |onnx - torch| = {difference:.2e}")
    return 0
