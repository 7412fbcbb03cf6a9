"""Helpers of the tests that compare samflow with the official code of a method, loaded at test time
from a checkout (an environment variable names it; README "Checked against the official code")."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from samflow.sam.build import SamVariant


def import_modules(
    monkeypatch: pytest.MonkeyPatch, package: str, folder: Path, names: tuple[str, ...]
) -> Iterator:
    """Import ``folder/<name>.py`` as ``package.<name>`` (without the package around the folder, whose
    ``__init__`` may need what is not installed); yields the last module, and removes them after."""
    stand_in = types.ModuleType(package)
    stand_in.__path__ = [str(folder)]
    monkeypatch.setitem(sys.modules, package, stand_in)
    for name in names:
        monkeypatch.delitem(sys.modules, f"{package}.{name}", raising=False)
    yield importlib.import_module(f"{package}.{names[-1]}")
    for name in names:
        sys.modules.pop(f"{package}.{name}", None)


def image_encoder(cls: type[nn.Module], spec: SamVariant, **changes: Any) -> nn.Module:
    """An official ``ImageEncoderViT`` class built with the shape of samflow's variant ``spec`` (and
    ``changes``: a fork's own arguments, another ``img_size``)."""
    arguments = {
        "depth": spec.depth,
        "embed_dim": spec.embed_dim,
        "img_size": spec.img_size,
        "mlp_ratio": 4,
        "norm_layer": partial(torch.nn.LayerNorm, eps=1e-6),
        "num_heads": spec.num_heads,
        "patch_size": spec.patch_size,
        "qkv_bias": True,
        "use_rel_pos": True,
        "global_attn_indexes": spec.global_attn_indexes,
        "window_size": spec.window_size,
        "out_chans": spec.prompt_dim,
    }
    return cls(**(arguments | changes))


def prompt_encoder(cls: type[nn.Module], spec: SamVariant) -> nn.Module:
    """An official ``PromptEncoder`` class built with the shape of samflow's variant ``spec``."""
    grid = spec.img_size // spec.patch_size
    return cls(
        embed_dim=spec.prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(spec.img_size, spec.img_size),
        mask_in_chans=spec.mask_in_chans,
    )


def randomize_all(module: nn.Module, seed: int) -> None:
    """Random values for every float parameter and buffer (norm weights near 1, variances positive)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen, dtype=t.dtype))
            elif t.ndim == 1 and name.endswith("weight"):
                t.copy_(1 + 0.1 * noise)
            else:
                t.copy_(0.05 * noise)
