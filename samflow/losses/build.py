"""Loss registry and the weighted sum that training optimises.

A loss spec (``model.losses``) maps term names to terms. A term is chosen by ``class_path``, as every
component, with an optional ``weight`` (default 1); any ``torch.nn.Module`` whose
``forward(logits, target)`` returns a scalar works, a third party's too. The names of ``LOSSES`` are
aliases of the built-in classes: ``name: weight``, or ``name: {weight: w, **init_args}``::

    build_loss({"bce": 1.0, "soft_iou": 1.0})                          # SAM-Adapter, COD
    build_loss({"balanced_bce": 1.0})                                  # SAM-Adapter, shadow
    build_loss({"bce": 1.0, "dice": {"weight": 1.0, "smooth": 1.0}})   # HQ-SAM
    build_loss({"bce": 1.0, "edge": {"class_path": "my_pkg.losses.EdgeLoss",
                                     "init_args": {"width": 3}, "weight": 0.5}})

In YAML::

    losses:
      bce: 1.0
      dice: {weight: 1.0, smooth: 1.0}
      edge: {class_path: my_pkg.losses.EdgeLoss, init_args: {width: 3}, weight: 0.5}
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from samflow.components import instantiate, is_class_path_spec
from samflow.losses.bce import BalancedBCELoss, BCELoss
from samflow.losses.focal import FocalLoss
from samflow.losses.overlap import DiceLoss, SoftIoULoss

LOSSES: dict[str, type[nn.Module]] = {
    "bce": BCELoss,
    "soft_iou": SoftIoULoss,
    "dice": DiceLoss,
    "focal": FocalLoss,
    "balanced_bce": BalancedBCELoss,
}

TOTAL = "total"


class WeightedLoss(nn.Module):
    """``total = Σ_k w_k · L_k(logits, target)`` over named loss terms.

    ``forward`` returns ``{name: w_k · L_k, ..., "total": Σ}`` so every term can be logged;
    optimise ``["total"]``.
    """

    def __init__(self, *, losses: Mapping[str, nn.Module], weights: Mapping[str, float]) -> None:
        super().__init__()
        if set(losses) != set(weights):
            raise ValueError(f"WeightedLoss: losses {sorted(losses)} and weights {sorted(weights)} differ.")
        if TOTAL in losses:
            raise ValueError(f"WeightedLoss: {TOTAL!r} is reserved for the sum and cannot name a term.")
        self.losses = nn.ModuleDict(dict(losses))
        self.weights = {name: float(weights[name]) for name in losses}

    def forward(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        terms = {name: self.weights[name] * loss(logits, target) for name, loss in self.losses.items()}
        terms[TOTAL] = sum(terms.values(), logits.new_zeros((), dtype=torch.float32))
        return terms

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={weight:g}" for name, weight in self.weights.items())


def build_loss(spec: Mapping[str, Any]) -> WeightedLoss:
    """Build a :class:`WeightedLoss` from a loss spec (see the module docstring).

    Each entry ``name: term`` is one of

    - ``weight``: the registered loss ``name`` (``LOSSES``) with its defaults;
    - ``{weight: w, **init_args}``: the registered loss ``name`` with arguments (``weight`` defaults to 1);
    - ``{class_path: ..., init_args: {...}, weight: w}``: any ``torch.nn.Module`` loss, logged as
      ``name`` (a bare class name resolves among the imported subclasses);
    - a built ``nn.Module`` (weight 1).

    An empty spec gives only ``total = 0`` (for plugins that bring their own losses). Raises
    ``ValueError`` on an unknown name (listing the valid ones), a bad weight or a class_path that cannot
    be built, and ``TypeError`` on arguments a registered loss does not take.
    """
    # An empty spec is allowed: a plugin may bring all the loss terms (HQ-SAM's point-sampled loss).
    losses: dict[str, nn.Module] = {}
    weights: dict[str, float] = {}
    for name, entry in spec.items():
        key = f"model.losses.{name}"
        if isinstance(entry, nn.Module):
            losses[name], weights[name] = entry, 1.0
            continue
        if is_class_path_spec(entry):
            class_spec = dict(entry)
            weight = class_spec.pop("weight", 1.0)
            _check_weight(name, weight)
            losses[name] = instantiate(class_spec, nn.Module, key)
            weights[name] = float(weight)
            continue
        if name not in LOSSES:
            raise ValueError(
                f"Unknown loss {name!r} in loss spec; valid names are {sorted(LOSSES)}, or give any loss "
                f"class: {name}: {{class_path: my_pkg.MyLoss, init_args: {{...}}, weight: 1.0}}."
            )
        if isinstance(entry, Mapping):
            kwargs = dict(entry)
            weight = kwargs.pop("weight", 1.0)
        else:
            kwargs, weight = {}, entry
        _check_weight(name, weight)
        try:
            losses[name] = LOSSES[name](**kwargs)
        except TypeError as err:
            cls = LOSSES[name]
            takes = ", ".join(p for p in inspect.signature(cls).parameters if p not in ("args", "kwargs"))
            raise TypeError(
                f"{key}: loss {name!r} ({cls.__name__}): bad arguments {kwargs}: {err}; it takes "
                f"{takes or 'no arguments'} (and weight)."
            ) from err
        weights[name] = float(weight)
    return WeightedLoss(losses=losses, weights=weights)


def _check_weight(name: str, weight: object) -> None:
    if isinstance(weight, bool) or not isinstance(weight, Real) or weight < 0:
        raise ValueError(f"Loss {name!r}: weight must be a number >= 0, got {weight!r}.")
