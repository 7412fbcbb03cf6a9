"""The parser of samflow's argparse commands (``samflow export``, ``embed``, ``student``, ...): a usage
error is one line, exit 1, like every other samflow error, not argparse's usage dump and exit 2.

It sits at the bottom of samflow's layers (argparse only), so every command module can use it.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn, Self

__all__ = ["CommandParser", "PositiveInt", "UsageError"]


class UsageError(ValueError):
    """A command line a command's parser refuses (a missing or unknown argument, a bad value)."""


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
