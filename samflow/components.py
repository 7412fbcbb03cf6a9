"""Components chosen by ``class_path``: the one way samflow picks plugins, prompts, losses, metrics and
augmentation.

A *class_path spec* is what jsonargparse and LightningCLI read everywhere::

    {"class_path": "my_pkg.prompts.CenterPoint", "init_args": {"radius": 3}}

``class_path`` is a full import path, or the bare class name of a subclass of the expected base that
is already imported (samflow's own classes, and every working plugin package, which the CLI imports
first). ``init_args`` is checked against the class's signature. The short names of the built-in
components (``box``, ``bce``, ``iou``) are aliases of their classes.

:func:`instantiate` builds one spec with jsonargparse itself, so a spec inside a free-form option (a
``losses`` mapping, a ``metrics`` list) gets the same resolution and the same errors as a typed option.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from jsonargparse import Namespace


def is_class_path_spec(value: object) -> bool:
    """Whether ``value`` is a mapping with a ``class_path`` key (a jsonargparse subclass spec)."""
    return isinstance(value, Mapping) and "class_path" in value


def instantiate(spec: str | Mapping[str, Any], base: type, key: str) -> Any:
    """Build a ``base`` instance from a class_path spec or a class (path or name), with jsonargparse.

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}``, or a class path / class name alone.
        base: the type the class must be a subclass of; bare class names resolve among its imported
            subclasses.
        key: the config key the spec came from, for the error message (e.g. ``model.losses.edge``).

    Raises:
        ValueError: naming ``key``, when the class cannot be imported, is not a ``base``, refuses its
            ``init_args`` or its constructor raises ``ValueError`` / ``TypeError``.
    """
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--spec", type=base, required=True)
    value: Any = dict(spec) if isinstance(spec, Mapping) else spec
    try:
        return parser.instantiate(parser.parse_object({"spec": value})).spec
    except (
        ArgumentError,
        ValueError,
        TypeError,
        ImportError,
        AttributeError,
    ) as err:  # parser or constructor
        message = " ".join(re.sub(r'^Parser key "spec":', "", str(err).strip()).split())
        # ``from None``: the CLI reports the innermost cause, and this message already holds it, with the key.
        raise ValueError(
            f"{key}: cannot build a {base.__name__} from {value!r}: {message} (class_path is a full import "
            f"path or the name of an imported {base.__name__} subclass; init_args go to its constructor)"
        ) from None


def snake_case(name: str) -> str:
    """``BinaryF1Score`` -> ``binary_f1_score``: the default log name of a component given by class."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def plain_config(value: Any) -> Any:
    """A config value with jsonargparse's Namespaces turned into dicts (recursively)."""
    if isinstance(value, Namespace):
        return {key: plain_config(item) for key, item in value.as_dict().items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(item) for item in value]
    if isinstance(value, dict):
        return {key: plain_config(item) for key, item in value.items()}
    return value
