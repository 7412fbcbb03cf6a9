"""Shared fixtures: a tiny random SAM, W&B disabled, deterministic seeds."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import torch

from samflow.sam import build_sam


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Give zero-initialised tables (position embeddings, rel-pos) random values so comparisons bite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std * 10)
    return module


@pytest.fixture
def tiny_sam():
    """A frozen tiny SAM (128 px) with non-zero position tables."""
    return randomize(build_sam("tiny", seed=0))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
