"""Helpers of the tests that compare samflow with the official code of a method, loaded at test time
from a checkout (an environment variable names it; README "Checked against the official code")."""

from __future__ import annotations

import ast
import hashlib
import importlib
import math
import os
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

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


def official_function(path: Path, name: str, cls: str | None = None, **namespace: Any) -> Any:
    """The function ``name`` (top level, or a method of class ``cls``) cut out of the official file
    ``path`` with ``ast`` and run alone, its globals ``torch`` and ``namespace`` (stand-ins for what
    the official file imports but cannot be installed); nothing else of the file is executed."""
    tree: ast.AST = ast.parse(path.read_text())
    if cls is not None:
        tree = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    scope: dict[str, Any] = {"torch": torch, **namespace}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)  # noqa: S102  (official code, opted into by its env var)
    return scope[name]


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


RECORDINGS = Path(__file__).parent / "reference_outputs"
RECORD_ENV = "SAMFLOW_RECORD_REFERENCE"


def fingerprint(*values: Any) -> str:
    """What went into a computation: tensors (their dtype, shape and values), modules (their state
    dicts), and nested dicts, lists, tuples and plain numbers or strings of them.

    The SHA-256 of everything but the values of floating-point tensors, then, after ``|``, each such
    tensor's sum and sum of absolute values (``same_inputs`` compares them with a relative tolerance).
    Their bytes are not hashed: a random draw or a convolution gives other last bits on another CPU
    (AVX2 or AVX-512 kernels), and the recorded outputs still answer for inputs that close; other
    random weights or a changed test move the sums far more."""
    digest = hashlib.sha256()
    sums: list[tuple[float, float]] = []

    def add(value: Any) -> None:
        if isinstance(value, nn.Module):
            add(value.state_dict())
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.is_floating_point():
                values = t.double()
                sums.append((float(values.sum()), float(values.abs().sum())))
            elif t.numel():
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                add(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                add(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    for value in values:
        add(value)
    return digest.hexdigest() + "|" + ",".join(f"{total!r}:{size!r}" for total, size in sums)


#: how far the sums of a floating-point input may move (relative to its sum of absolute values) and
#: still be the recorded input: last bits of another CPU, not another draw
SUM_TOLERANCE = 1e-5


def same_inputs(recorded: str, now: str) -> bool:
    """Whether two ``fingerprint``s are of the same inputs: the same hash, and each floating-point
    tensor's sums within ``SUM_TOLERANCE`` of its sum of absolute values."""
    (old_hash, _, old_sums), (new_hash, _, new_sums) = recorded.partition("|"), now.partition("|")
    if old_hash != new_hash:
        return False
    old, new = (
        [p.split(":") for p in old_sums.split(",") if p],
        [p.split(":") for p in new_sums.split(",") if p],
    )
    if len(old) != len(new):
        return False
    for (total, size), (total_now, size_now) in zip(old, new, strict=True):
        scale = max(float(size), float(size_now)) * SUM_TOLERANCE + 1e-300
        if abs(float(total) - float(total_now)) > scale or abs(float(size) - float(size_now)) > scale:
            return False
    return True


def _cpu(value: Any) -> Any:
    """``value`` with every tensor detached, on the CPU (what ``torch.save`` keeps of an output)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


SKETCH = 4096  # elements recorded of a larger tensor


def _positions(shape: tuple[int, ...], where: str) -> Tensor:
    """``SKETCH`` distinct flat positions of a ``shape`` tensor, drawn from a seed made of ``where``."""
    numel = math.prod(shape)
    seed = int.from_bytes(hashlib.sha256(where.encode()).digest()[:8], "little") % 2**62
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:SKETCH].sort().values


@dataclass(frozen=True)
class Sketch:
    """What a recording keeps of an official tensor over ``SKETCH`` elements: its shape and dtype, its
    values at ``SKETCH`` positions drawn at random (seeded by the case and the tensor's place in the
    outputs), its sum, and its marginals (the sums over every axis but one, for each axis). An error
    confined to 1 % of the elements is missed by the positions with probability 0.99 ** 4096 < 1e-17,
    a large error in fewer elements shows in a marginal; the full tensors are compared whenever the
    checkout is given."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    values: Tensor
    total: Tensor
    where: str
    marginals: tuple[Tensor, ...] = ()

    def same_places(self, actual: Tensor) -> Tensor:
        """``actual``'s values at the sketch's positions."""
        return actual.detach().reshape(-1)[_positions(self.shape, self.where)]


def _marginals(t: Tensor) -> list[Tensor]:
    """For each axis of ``t`` (of 2 or more) with at most ``SKETCH`` entries, the sums over every other
    axis (float64); an empty placeholder for a longer axis."""
    wide = t.detach().double()
    if t.dim() < 2:
        return []
    return [
        wide.sum(dim=[d for d in range(t.dim()) if d != axis])
        if t.shape[axis] <= SKETCH
        else wide.new_empty(0)
        for axis in range(t.dim())
    ]


def _sketched(value: Any, where: str) -> Any:
    """``value`` with every tensor of over ``SKETCH`` elements replaced by the dict a ``Sketch`` keeps."""
    if isinstance(value, Tensor) and value.numel() > SKETCH:
        values = value.reshape(-1)[_positions(tuple(value.shape), where)]
        return {
            "sketch": list(value.shape),
            "dtype": str(value.dtype),
            "values": values,
            "total": value.double().sum(),
            "marginals": _marginals(value),
        }
    if isinstance(value, dict):
        return {k: _sketched(v, f"{where}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_sketched(v, f"{where}/{i}") for i, v in enumerate(value))
    return value


def _unsketched(value: Any, where: str) -> Any:
    """The recorded outputs with each sketch dict as a ``Sketch``."""
    if isinstance(value, dict) and "sketch" in value and "values" in value:
        dtype = getattr(torch, value["dtype"].removeprefix("torch."))
        marginals = tuple(value.get("marginals", ()))
        return Sketch(tuple(value["sketch"]), dtype, value["values"], value["total"], where, marginals)
    if isinstance(value, dict):
        return {k: _unsketched(v, f"{where}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_unsketched(v, f"{where}/{i}") for i, v in enumerate(value))
    return value


def known(official: Tensor | Sketch) -> Tensor:
    """An official output's values that are known: all of them live (or recorded whole), else the
    recorded ``Sketch``'s; so its ``abs().amax()`` is the official one or a lower bound of it."""
    return official.values if isinstance(official, Sketch) else official


def at_known_places(ours: Tensor, official: Tensor | Sketch) -> Tensor:
    """``ours`` where ``known(official)`` is: everywhere, or at the recorded ``Sketch``'s positions."""
    return official.same_places(ours) if isinstance(official, Sketch) else ours


def largest_difference(ours: Tensor, official: Tensor | Sketch) -> float:
    """``max |ours - official|`` live, or a lower bound of it (over a recorded ``Sketch``'s positions):
    a check that the two differ by more than something stays sound from a recording."""
    return float((at_known_places(ours, official) - known(official)).abs().max())


def assert_close(actual: Tensor, expected: Tensor | Sketch, **tolerance: Any) -> None:
    """``torch.testing.assert_close(actual, expected, **tolerance)`` for an official output, live or
    recorded: a recorded ``Sketch`` is compared at its positions (same tolerance) and by its sum (the
    tolerance summed over the elements)."""
    if not isinstance(expected, Sketch):
        torch.testing.assert_close(actual, expected, **tolerance)
        return
    assert tuple(actual.shape) == expected.shape, f"shape {tuple(actual.shape)}, recorded {expected.shape}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype}, recorded {expected.dtype}"
    torch.testing.assert_close(expected.same_places(actual), expected.values, **tolerance)
    atol, rtol = tolerance.get("atol", 0.0), tolerance.get("rtol", 0.0)
    numel = math.prod(expected.shape)
    mean = float(expected.values.double().abs().mean())
    slack = atol * numel + rtol * mean * numel
    torch.testing.assert_close(actual.detach().double().sum(), expected.total, atol=slack, rtol=1e-12)
    for axis, (mine, recorded) in enumerate(zip(_marginals(actual), expected.marginals, strict=False)):
        if not recorded.numel():
            continue  # an axis too long to keep
        count = numel // expected.shape[axis]  # elements summed into each entry
        torch.testing.assert_close(
            mine,
            recorded,
            atol=(atol + rtol * mean) * count,
            rtol=1e-12,
            msg=lambda m, a=axis: f"marginal over axis {a}: {m}",
        )


class ReferenceOutputs:
    """What a method's official code returned, recorded, so its comparison runs without the checkout.

    With the checkout (``env`` names it) ``get`` runs the official code; with ``SAMFLOW_RECORD_REFERENCE=1``
    as well it writes the outputs to ``tests/reference_outputs/<name>.pt``, under the case's key, with
    the fingerprint of what went in (weights, inputs, seeds); a tensor of over ``SKETCH`` elements is
    kept as a ``Sketch``, so the recordings stay small. Without the checkout ``get`` returns the
    recorded outputs (large tensors as ``Sketch``es: compare them with ``assert_close`` of this
    module), after checking that this run's inputs have the recorded fingerprint: the test then
    compares samflow with the official code's own outputs on the same inputs, in every test run.
    A fingerprint that differs (another PyTorch drawing other random weights, a changed test) fails
    the test, naming the command that records the outputs again.
    """

    def __init__(self, name: str, env: str) -> None:
        self.name, self.env = name, env
        self.src = os.environ.get(env)
        self.path = RECORDINGS / f"{name}.pt"

    @property
    def available(self) -> bool:
        """Whether ``get`` can answer: a checkout, or a recording."""
        return bool(self.src) or self.path.is_file()

    def skip_reason(self) -> str:
        return f"{self.env} (a checkout of the official code) is not set and {self.path.name} is not recorded"

    def _load(self) -> dict[str, Any]:
        return torch.load(self.path, weights_only=True) if self.path.is_file() else {}

    def get(self, key: str, inputs: str, compute: Callable[[], Any]) -> Any:
        """The official outputs of case ``key``, whose inputs have the fingerprint ``inputs``: computed by
        ``compute`` (which runs the official code) when the checkout is given, else recorded."""
        if self.src:
            out = _cpu(compute())
            if os.environ.get(RECORD_ENV) == "1":
                recorded = self._load()
                recorded[key] = {"inputs": inputs, "outputs": _sketched(out, key)}
                RECORDINGS.mkdir(exist_ok=True)
                torch.save(recorded, self.path)
            return out
        recorded = self._load()
        if key not in recorded:
            pytest.fail(f"{self.path} has no case {key!r}; {self._again()}")
        if not same_inputs(recorded[key]["inputs"], inputs):
            pytest.fail(
                f"case {key!r} of {self.path} was recorded for other inputs (fingerprint "
                f"{recorded[key]['inputs'][:12]}, this run {inputs[:12]}: other random weights or a changed "
                f"test); {self._again()}"
            )
        return _unsketched(recorded[key]["outputs"], key)

    def _again(self) -> str:
        return (
            f"record the official outputs again: {RECORD_ENV}=1 {self.env}=path/to/checkout "
            "python -m pytest <this test file> (README: Checked against the official code)"
        )


def config_value(node: ast.AST, names: dict[str, Any]) -> Any:
    """A config expression: literals, ``dict(...)``, lists, tuples, names bound earlier, arithmetic."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return {kw.arg: config_value(kw.value, names) for kw in node.keywords}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [config_value(e, names) for e in node.elts]
    if isinstance(node, ast.Name):
        return names[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return config_value(node.left, names) / config_value(node.right, names)
    return ast.literal_eval(node)
