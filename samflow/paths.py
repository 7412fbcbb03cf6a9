"""How a path the user gave was read, for the error that says it is missing.

Paths in config values and on the command line are read as given, ``~`` expanded: a relative one from
the working directory (never from the config file's folder), ``$VARS`` not expanded. ``where_looked``
says which of those applied to a missing path, so that every "does not exist" names it alike: the data
roots, COCO annotations, slides, SAM files.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["broken_link", "link_gone", "where_looked"]


def broken_link(path: Path) -> bool:
    """Whether ``path`` is a symbolic link whose target does not exist (a pool on a share not mounted)."""
    return path.is_symlink() and not path.exists()


def link_gone(path: Path) -> str:
    """Why a broken link (``broken_link``) does not read: its target, which does not exist."""
    return f"a link to {os.readlink(path)}, which does not exist: is the share it points into mounted?"


def where_looked(path: str | Path) -> str:
    """What a missing ``path`` (as given, ``~`` expanded) was read as, to append to its error: a broken
    link's target, that ``$VARS`` are not expanded, the working directory for a relative path; empty for
    a plain absolute path."""
    text = str(path)
    if broken_link(Path(text)):
        return f" ({link_gone(Path(text))})"
    if "$" in text:
        return " (environment variables such as $HOME are not expanded in config values: write the path out)"
    if not Path(text).is_absolute():
        return (
            f" (relative paths, also those in config files, are read from the working directory {Path.cwd()})"
        )
    return ""
