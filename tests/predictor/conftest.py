"""A trained run folder as ``samflow fit`` writes it, made fast: one Lightning training step on the tiny SAM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from samflow.module import SamflowModule, SamSpec
from samflow.sam import build_sam
from samflow.testing import random_batch

PLUGINS = {
    "decoder": {
        "class_path": "samflow_plugins.decoder_tuning.DecoderTuning",
        "init_args": {"parts": ["mask_decoder"]},
    },
    "tokens": {
        "class_path": "samflow_plugins.tokens.ExtraTokens",
        "init_args": {"num_tokens": 1, "predict": True},
    },
}


def make_run(root: Path, plugins: dict, *, steps: int = 2, lr: float = 0.05) -> Path:
    """``root/runs/demo/version_0`` with ``config.yaml`` and ``checkpoints/last.ckpt`` after ``steps``
    optimizer steps of a real ``Trainer.fit``; the SAM comes from a checkpoint file (``root/sam_tiny.pth``)."""
    from jsonargparse import ArgumentParser

    from samflow.plugins import SamPlugin
    from samflow.plugins.registry import discover

    sam_file = root / "sam_tiny.pth"
    torch.save(build_sam("tiny", seed=0).state_dict(), sam_file)
    run = root / "runs" / "demo" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    discover()
    parser = ArgumentParser()
    parser.add_argument("--plugins", type=dict[str, SamPlugin])
    built = parser.instantiate_classes(parser.parse_object({"plugins": plugins})).plugins
    sam = {"variant": "tiny", "checkpoint": str(sam_file), "img_size": None, "seed": 0}
    module = SamflowModule(
        sam=SamSpec(**sam), plugins=built, optimizer=lambda p: torch.optim.SGD(p, lr=lr), losses={"bce": 1.0}
    )
    batches = [random_batch(2, seed=s) for s in range(steps)]
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    config = {
        "seed_everything": 0,
        "model": {"sam": sam, "plugins": plugins, "losses": {"bce": 1.0}, "threshold": 0.5},
        "data": {
            "class_path": "samflow.data.SegmentationDataModule",
            "init_args": {"img_size": 128, "resize_mode": "longest", "image_resize": "sam"},
        },
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run


@pytest.fixture(scope="package")
def trained_run(tmp_path_factory) -> Path:
    """Decoder tuning + an extra token that chooses the prediction (plugin hooks, tensors of its own)."""
    return make_run(tmp_path_factory.mktemp("run"), PLUGINS)


@pytest.fixture(scope="package")
def decoder_run(tmp_path_factory) -> Path:
    """Decoder tuning alone: it changes SAM's own weights only, so it can be merged."""
    return make_run(tmp_path_factory.mktemp("decoder_run"), {"decoder": PLUGINS["decoder"]})


@pytest.fixture(scope="package")
def pa_sam_run(tmp_path_factory) -> Path:
    """PA-SAM alone: its decoder side (Gumbel top-k point mining) does not declare onnx_exportable."""
    plugins = {"pa": {"class_path": "samflow_plugins.pa_sam.PASam"}}
    return make_run(tmp_path_factory.mktemp("pa_sam_run"), plugins, steps=1)
