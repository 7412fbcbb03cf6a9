"""Frozen weights cast to the autocast dtype once, not at every forward.

Under ``torch.autocast`` every matrix product casts its float32 weight and bias to the autocast
dtype. Autocast keeps such a copy only within one autocast region, and only for leaves that require
a gradient, so a frozen weight is cast anew in every forward. In SAM's mask decoder those casts are
about 100 of the 240 operators of one decode, and on a GPU each is a kernel launch of its own. The
decoder side is bound by kernel launches there, not by arithmetic (``benchmarks/README.md``, "On a
GPU").

``frozen_copies`` keeps the cast copies of a module's frozen parameters beside the module. They are
computed again when a parameter is replaced, given new storage (``.to(device)``, ``.half()``, an
assignment to ``.data``: each is seen even when the new storage lands at the freed one's address) or
changed in place through autograd-visible operations (``load_state_dict``, ``copy_`` under
``no_grad``: each bumps the tensor's version counter); ``stamp`` / ``unchanged`` are that rule. An
in-place write into ``.data`` bumps no counter and is not seen; samflow never writes frozen weights
that way. A parameter that requires a gradient is never cached: autocast
casts it, and its gradient reaches the float32 weight as usual.

The cast is the same rounding autocast applies, so results are bit-equal to autocast's own.
``cache_frozen_casts`` gives a module's ``nn.Linear`` and ``nn.ConvTranspose2d`` layers this forward
in place (same object, parameters and state-dict keys); ``build_sam`` does it for SAM's mask decoder.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

_KEPT: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""owner -> {key: (the parameters' ``stamp``, the copies)}."""


def compiling() -> bool:
    """Under ``torch.compile`` or tracing nothing is kept: the compiled graph owns its casts."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts matrix products to on ``device``; None outside autocast (and on a
    device autocast does not know, such as ``meta``)."""
    if not torch.amp.is_autocast_available(device.type) or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def frozen_copies(
    owner: object,
    key: object,
    params: Sequence[Tensor | None],
    build: Callable[..., tuple[Tensor | None, ...]],
) -> tuple[Tensor | None, ...] | None:
    """``build(*params)``, kept for ``owner`` (a module or tensor) under ``key`` while ``params`` are the
    same unchanged tensors.

    None when any of ``params`` requires a gradient or is an inference tensor (which has no version
    counter), and under ``torch.compile`` or tracing: compute it directly then. ``build`` runs
    without gradient and outside inference mode, so its tensors may be used in a later training step;
    they are shared, so no caller may write into them. One entry per ``owner`` and ``key``. The copies
    live in a table beside ``owner`` (weakly keyed: they go with it), so copying, pickling or saving a
    module never carries them.
    """
    if compiling() or any(p is not None and (p.requires_grad or p.is_inference()) for p in params):
        return None
    store = _KEPT.get(owner)
    if store is None:
        store = _KEPT[owner] = {}
    hit = store.get(key)
    if hit is not None and unchanged(hit[0], params):
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():
        copies = build(*params)
    store[key] = (stamp(params), copies)
    return copies


def kept_copies(owner: object) -> dict:
    """What ``frozen_copies`` keeps for ``owner``: key -> (the parameters' ``stamp``, copies); {} if nothing."""
    return _KEPT.get(owner, {})


def cast_once(
    owner: nn.Module,
    key: str,
    params: Sequence[Tensor],
    dtype: torch.dtype,
    combine: Callable[..., Tensor] | None = None,
) -> Tensor:
    """``combine(*params).to(dtype)`` (default: the one parameter), kept on ``owner`` while ``params``
    are frozen and unchanged (``frozen_copies``), computed in every call otherwise."""

    def build(*ps: Tensor) -> tuple[Tensor]:
        return ((ps[0] if combine is None else combine(*ps)).to(dtype),)

    kept = frozen_copies(owner, (key, dtype), params, build)
    return kept[0] if kept is not None else build(*params)[0]  # type: ignore[return-value]


def stamp(tensors: Sequence[Tensor | None]) -> tuple:
    """What ``unchanged`` compares ``tensors`` with later: each tensor and its storage (weakly: a stamp
    keeps neither alive), where its data starts, its device and its version counter.

    The storage is what tells new storage at a freed one's address apart (``module.half().float()``
    frees the float32 storage and may get the same address back, with the same parameter object and
    version counter)."""
    return tuple(
        None if t is None else (weakref.ref(t), _storage_ref(t), t.data_ptr(), t.device, t._version)
        for t in tensors
    )


def unchanged(stamps: tuple, tensors: Sequence[Tensor | None]) -> bool:
    """Whether ``tensors`` are the very tensors ``stamps`` (``stamp``) were taken of, on the same
    storage, unwritten since (as far as their version counters tell)."""
    if len(stamps) != len(tensors):
        return False
    for s, t in zip(stamps, tensors):
        if s is None or t is None:
            if s is not t:
                return False
            continue
        tensor, storage, *where = s
        if tensor() is not t or where != [t.data_ptr(), t.device, t._version]:
            return False
        if storage is not None and storage() is not _storage_of(t):
            return False
    return True


def _storage_of(t: Tensor) -> object | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor without storage of its own (some subclasses)
        return None


def _storage_ref(t: Tensor) -> weakref.ref | None:
    storage = _storage_of(t)
    return None if storage is None else weakref.ref(storage)


def _cast(dtype: torch.dtype) -> Callable[..., tuple[Tensor | None, ...]]:
    return lambda *ps: tuple(None if p is None else p.detach().to(dtype) for p in ps)


class CastOnceLinear(nn.Linear):
    """``nn.Linear`` whose frozen weight and bias are cast to the autocast dtype once (``frozen_copies``)."""

    def forward(self, input: Tensor) -> Tensor:
        dtype = autocast_dtype(input.device)
        copies = None if dtype is None else frozen_copies(self, dtype, (self.weight, self.bias), _cast(dtype))
        if copies is None:
            return super().forward(input)
        weight, bias = copies
        return F.linear(input, weight, bias)  # type: ignore[arg-type]


class CastOnceConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose frozen weight and bias are cast to the autocast dtype once."""

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        dtype = autocast_dtype(input.device)
        copies = None
        if dtype is not None and output_size is None and self.padding_mode == "zeros":
            copies = frozen_copies(self, dtype, (self.weight, self.bias), _cast(dtype))
        if copies is None:
            return super().forward(input, output_size)
        weight, bias = copies
        return F.conv_transpose2d(
            input,
            weight,  # type: ignore[arg-type]
            bias,
            self.stride,
            self.padding,  # type: ignore[arg-type]
            self.output_padding,
            self.groups,
            self.dilation,
        )


_SWAPS: dict[type, type] = {nn.Linear: CastOnceLinear, nn.ConvTranspose2d: CastOnceConvTranspose2d}


def cache_frozen_casts(module: nn.Module) -> nn.Module:
    """Give every plain ``nn.Linear`` and ``nn.ConvTranspose2d`` in ``module`` the cast-once forward, in
    place (the class becomes the subclass above; subclasses of their own are left alone)."""
    for sub in module.modules():
        swap = _SWAPS.get(type(sub))
        if swap is not None:
            sub.__class__ = swap
    return module
