"""``DataError``: a dataset folder, file or annotation is missing, unreadable or inconsistent.

Raised by the folder and COCO data (and the commands that read them) with a message that names the
folder, file, key or annotation and says what to do.
"""

from __future__ import annotations


class DataError(ValueError):
    """A dataset folder or file is missing, unreadable or inconsistent; the message names it."""


def check_loader_counts(prefix: str, counts: dict[str, int], num_workers: int) -> None:
    """Refuse counts below 1 (batch sizes, patch sizes, ...) and a negative ``num_workers``, naming the
    option (``prefix`` + name), when a data module is built: else the first data loader refuses them
    with a traceback, or a run samples nothing."""
    for name, count in counts.items():
        if count < 1:
            raise ValueError(f"{prefix}{name} must be at least 1, got {count}.")
    if num_workers < 0:
        raise ValueError(
            f"{prefix}num_workers must be 0 (load in the main process) or more, got {num_workers}."
        )
