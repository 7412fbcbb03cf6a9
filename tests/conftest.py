"""Shared fixtures: a tiny random SAM, W&B disabled, deterministic seeds."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import torch
from helpers import randomize

from samflow.sam import build_sam


@pytest.fixture
def tiny_sam():
    """A frozen tiny SAM (128 px) with non-zero position tables."""
    return randomize(build_sam("tiny", seed=0))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
