"""``DataError``: a dataset folder, file or annotation is missing, unreadable or inconsistent.

Raised by the folder and COCO data (and the commands that read them) with a message that names the
folder, file, key or annotation and says what to do.
"""

from __future__ import annotations


class DataError(ValueError):
    """A dataset folder or file is missing, unreadable or inconsistent; the message names it."""
