"""Checkpoints as users move them: to another configuration, another SAM file, a CPU-only machine, another
precision, and the plugins' released checkpoints given as the SAM file.

A samflow checkpoint holds the plugins and the SAM parts they train, not the frozen SAM: it loads on top of
the SAM the command builds, which must be the one it was trained on (the checkpoint records its variant and
the file's SHA-256, or the seed of random weights). Every mismatch is one ``CheckpointError`` line naming
what differs and what to pass; nothing loads partially.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from samflow import Predictor
from samflow.callbacks.resume_config import SameExperiment, saved_settings
from samflow.module import SamflowModule
from samflow.sam import CheckpointError, build_sam
from samflow.sam_spec import SamSpec
from samflow.student_command import _checkpoint_entry
from samflow.testing import random_batch
from samflow_plugins.lora import LoRA
from samflow_plugins.tokens import ExtraTokens

TOKENS = {"tokens": {"class_path": "samflow_plugins.tokens.ExtraTokens", "init_args": {"num_tokens": 1}}}


def _module(sam_file: Path | None = None, seed: int = 0, **plugins) -> SamflowModule:
    spec = SamSpec(variant="tiny", checkpoint=str(sam_file) if sam_file else None, seed=seed)
    return SamflowModule(sam=spec, plugins=plugins or {"tokens": ExtraTokens(num_tokens=1)})


def _checkpoint(module: SamflowModule) -> dict:
    """What ``Trainer.save_checkpoint`` writes of the module (its ``on_save_checkpoint`` applied)."""
    with torch.no_grad():  # trained weights: not the fresh module's
        for param in module.plugins.parameters():
            param.add_(0.5)
    checkpoint = {
        "state_dict": module.state_dict(),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 1,
    }
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def _load(module: SamflowModule, checkpoint: dict) -> None:
    """As Lightning restores a ``--ckpt_path``: ``on_load_checkpoint``, then the state dict."""
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])


def _sam_file(path: Path, seed: int) -> Path:
    torch.save(build_sam("tiny", seed=seed).state_dict(), path)
    return path


def _validate(module: SamflowModule, ckpt: Path) -> None:
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, dataloaders=DataLoader([random_batch(1)], batch_size=None), ckpt_path=ckpt)


# ---- another configuration ----
@pytest.mark.parametrize(
    ("trained", "loaded"),
    [({"blocks": [0, 1]}, {"blocks": [0]}), ({"targets": ["qkv", "proj"]}, {"targets": ["qkv"]})],
    ids=["lora_on_more_blocks", "lora_on_more_targets"],
)
def test_a_checkpoint_holding_weights_the_experiment_lacks_is_one_line(trained, loaded):
    """Was: torch's ``Error(s) in loading state_dict ... Unexpected key(s)`` (a RuntimeError, a traceback)."""
    checkpoint = _checkpoint(_module(lora=LoRA(**trained)))
    with pytest.raises(CheckpointError) as err:
        _load(_module(lora=LoRA(**loaded)), checkpoint)
    line = str(err.value)
    assert "\n" not in line and "holds weights this experiment lacks" in line, line
    assert ".lora_A." in line and "--experiment <run>/config.yaml" in line, line


# ---- another frozen SAM ----
@pytest.mark.parametrize("other", ["another_file", "no_file", "another_seed", "another_variant"])
def test_a_checkpoint_is_refused_on_another_frozen_sam_naming_both(tmp_path, other):
    """Was: loaded silently on the other SAM's frozen weights (the plugins trained for another model)."""
    sam_a = _sam_file(tmp_path / "sam_a.pth", seed=0)
    if other == "another_seed":  # random weights (no file), as the tiny quickstart trains
        checkpoint, module = _checkpoint(_module(seed=0)), _module(seed=1)
        named = ("random weights (seed 0", "random weights (seed 1", "model.sam.seed")
    else:
        checkpoint = _checkpoint(_module(sam_a))
        if other == "another_variant":  # as a vit_b run's checkpoint given to the tiny experiment
            checkpoint["samflow"]["trained_on"]["variant"] = "vit_b"
            module, named = _module(sam_a), ("'vit_b'", "'tiny'", "--model.sam.variant")
        elif other == "another_file":
            module = _module(_sam_file(tmp_path / "sam_b.pth", seed=1))
            named = ("sam_a.pth (SHA-256", "sam_b.pth (SHA-256")
        else:
            module, named = _module(None), ("sam_a.pth", "random weights (seed 0")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        _load(module, checkpoint)
    line = str(err.value)
    assert "\n" not in line and all(word in line for word in named) and "model.sam." in line, line
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())  # nothing loaded


def test_the_same_sam_file_elsewhere_loads_exactly(tmp_path):
    """A SAM file copied to another path (another machine) has the same bytes: the checkpoint loads, and
    the model equals the one that wrote it."""
    sam_a = _sam_file(tmp_path / "sam_a.pth", seed=0)
    trained = _module(sam_a)
    checkpoint = _checkpoint(trained)
    moved = tmp_path / "elsewhere" / "renamed.pth"
    moved.parent.mkdir()
    shutil.copyfile(sam_a, moved)
    module = _module(moved)
    _load(module, checkpoint)
    assert module.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in trained.state_dict().items())


def test_lightning_ckpt_path_refuses_another_sam_before_loading(tmp_path):
    """``samflow validate/test/predict --ckpt_path`` (Lightning's restore) runs the check too."""
    sam_a, sam_b = _sam_file(tmp_path / "sam_a.pth", 0), _sam_file(tmp_path / "sam_b.pth", 1)
    ckpt = tmp_path / "last.ckpt"
    torch.save(_checkpoint(_module(sam_a)), ckpt)
    with pytest.raises(CheckpointError, match=r"sam_a\.pth .*sam_b\.pth"):
        _validate(_module(sam_b), ckpt)


def _run_folder(tmp_path: Path, sam_file: Path) -> Path:
    run = tmp_path / "runs" / "demo" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(_checkpoint(_module(sam_file)), run / "checkpoints" / "last.ckpt")
    sam = {"variant": "tiny", "checkpoint": str(sam_file), "seed": 0}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"sam": sam, "plugins": TOKENS}}))
    return run


def test_predictor_and_export_refuse_another_sam_checkpoint(tmp_path):
    """``Predictor.from_run`` / ``from_checkpoint``, ``samflow export``, ``predict-slide`` and ``pseudo-masks``
    (``rebuild.load_trained_state``) with ``sam_checkpoint=`` (``--sam-checkpoint``) of another file."""
    from samflow.export import export

    sam_a, sam_b = _sam_file(tmp_path / "sam_a.pth", 0), _sam_file(tmp_path / "sam_b.pth", 1)
    run = _run_folder(tmp_path, sam_a)
    with pytest.raises(CheckpointError, match=r"sam_a\.pth .*sam_b\.pth.*--sam-checkpoint"):
        Predictor.from_run(run, sam_checkpoint=sam_b, device="cpu")
    with pytest.raises(CheckpointError, match=r"sam_a\.pth .*sam_b\.pth"):
        export(run, tmp_path / "export", sam_checkpoint=sam_b)
    assert not (tmp_path / "export").exists()
    copy = tmp_path / "copy.pth"
    shutil.copyfile(sam_a, copy)
    assert Predictor.from_run(run, sam_checkpoint=copy, device="cpu") is not None


# ---- a GPU's checkpoint on a CPU-only machine, and another precision ----
def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu_everywhere(tmp_path, monkeypatch):
    """A checkpoint written on CUDA holds storages tagged ``cuda:0``; every samflow path that reads one maps
    them to the CPU: Lightning's ``--ckpt_path`` restore, ``rebuild`` (Predictor, export, predict-slide,
    pseudo-masks), ``--resume``'s settings check and the student's checkpoint entries."""
    sam_a = _sam_file(tmp_path / "sam_a.pth", 0)
    run = _run_folder(tmp_path, sam_a)
    ckpt = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["callbacks"] = {SameExperiment.STATE_KEY: {"settings": {"model.plugins": "tokens"}}}
    with monkeypatch.context() as patch:  # torch.save tags each storage with its device, here cuda:0
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(checkpoint, ckpt)
    if not torch.cuda.is_available():  # the tag is real: loading without map_location fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(ckpt, weights_only=True)
    _validate(_module(sam_a), ckpt)
    assert Predictor.from_checkpoint(ckpt, device="cpu") is not None
    assert saved_settings(ckpt) == {"model.plugins": "tokens"}
    assert _checkpoint_entry(ckpt, "global_step") == 1


def test_a_bf16_mixed_checkpoint_loads_exactly_in_fp32(tmp_path):
    """bf16-mixed trains fp32 weights under autocast: its checkpoint holds fp32 tensors, which a 32-true
    validate (or a bf16-mixed one from a 32-true checkpoint) loads bit for bit."""
    sam_a = _sam_file(tmp_path / "sam_a.pth", 0)
    module = _module(sam_a)
    module.optimizer = lambda params: torch.optim.SGD(params, lr=0.1)
    trainer = Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader([random_batch(2)], batch_size=None))
    ckpt = tmp_path / "bf16.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    loaded = _module(sam_a)
    _validate(loaded, ckpt)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in module.state_dict().items())


# ---- the plugins' released checkpoints as the SAM file ----
def test_an_hq_sam_release_as_the_sam_checkpoint_is_named_and_says_what_to_pass(tmp_path):
    """HQ-SAM's sam_hq_vit_b.pth holds SAM's weights and HQ-SAM's decoder tensors. Was: "does not match
    variant 'tiny'; the file looks like tiny" with the HQ keys as unexpected ones."""
    state = build_sam("tiny", seed=0).state_dict()
    for key, shape in {
        "hf_token.weight": (1, 64),
        "hf_mlp.layers.0.weight": (64, 64),
        "compress_vit_feat.0.weight": (64, 32, 2, 2),
        "embedding_encoder.0.weight": (32, 64, 2, 2),
        "embedding_maskfeature.0.weight": (32, 32, 3, 3),
    }.items():
        state[f"mask_decoder.{key}"] = torch.zeros(shape)
    path = tmp_path / "sam_hq_vit_tiny.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        build_sam("tiny", path)
    line = str(err.value)
    assert "\n" not in line and "HQ-SAM release" in line and "--model.sam.checkpoint" in line, line
