"""The parser of samflow's argparse commands (``samflow export``, ``embed``, ``student``, ...): a usage
error is one line, exit 1, like every other samflow error, not argparse's usage dump and exit 2.

``require_extra``: a package of one of samflow's optional extras (pyproject.toml), or a
``MissingExtraError`` (a ``UsageError``, so one line too) naming the extra and its pip command. Called
where a command, data module or metric is built, so a missing extra stops a run before any work.

It sits at the bottom of samflow's layers (argparse only), so every command module can use it.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType
from typing import Any, NoReturn, Self

__all__ = ["CommandParser", "MissingExtraError", "PositiveInt", "UsageError", "require_extra"]


class UsageError(ValueError):
    """A command line a command's parser refuses (a missing or unknown argument, a bad value)."""


class MissingExtraError(UsageError, ImportError):
    """A feature needs a package of an optional extra that is not installed; the message names the extra
    and the pip command. An ``ImportError`` too, for code that falls back without the package."""


def require_extra(module: str, extra: str, feature: str) -> ModuleType:
    """``module`` imported, or a ``MissingExtraError``: "``feature`` needs ``module`` (the ``extra``
    extra): pip install 'samflow[extra]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{feature} needs {module.split('.')[0]}, which samflow's `{extra}` extra installs: "
            f"pip install 'samflow[{extra}]'."
        ) from err


class CommandParser(argparse.ArgumentParser):
    """argparse's parser for samflow's commands: a usage error raises ``UsageError`` (one line, exit 1,
    no usage dump) instead of printing the usage and exiting with status 2.

    Args:
        help_command: the command line that shows the help (default: ``prog``).
    """

    def __init__(self, *args: Any, help_command: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help_command = help_command or self.prog

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (`{self.help_command} --help` lists the options)")


class PositiveInt(int):
    """argparse type of a count or size: an integer >= 1 (else a one-line usage error)."""

    def __new__(cls, text: str | int) -> Self:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
        return super().__new__(cls, value)
