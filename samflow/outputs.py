"""Output files: written whole or not at all, and names that are one file on a case-insensitive disk.

``write_whole(path, write)`` has ``write`` fill a temporary file beside ``path`` and renames it over
``path`` (``os.replace``, atomic within one file system): a reader, or the next run, finds the earlier
file or the new one, never half of one. ``whole_files(paths)`` does the same for files that appear
together (a slide's mask, GeoJSON and Dice). The temporary name is ``partial`` with ``{name}`` the
file's name: hidden ``.{name}.partial`` by default, ``{name}.partial`` where a command removes a
killed run's leftovers by that name (``MaskWriter``).

``case_clash(named)`` finds two outputs whose names differ only in case (``a.png`` and ``A.png``: one
file on macOS and Windows, where the second would silently replace the first), or are equal.

``record_differences(earlier, now)`` compares two records of what made a folder's outputs (``samflow
predict``'s ``samflow_predict.json``, ``predict --prompts``' ``samflow_prompts.json``): a file by its
SHA-256 (``{"path": ..., "sha256": ...}``; a moved file with the same bytes is no change), and
``record_problem`` says, in one line, why a run may not continue beside an earlier run's files. A
record names a file with ``file_record`` (its path and SHA-256, ``file_sha256``) and the device with
``device_kind`` (the GPU model or the CPU: another one computes other last bits).

``PREDICT_LOCK``: the lock file every predict command (``samflow predict``, ``predict --prompts``,
``predict-slide``) holds in its output folder while it writes there, so that a second run into the
same folder at the same moment is refused in one line (``samflow.callbacks.run_folder.hold_folder``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

#: held by the predict command writing into the folder; gone when it ends (a killed one's holds nothing)
PREDICT_LOCK = ".predict.lock"
HIDDEN_PARTIAL = ".{name}.partial"  # the default temporary name: ``.x.png.partial`` for ``x.png``

T = TypeVar("T")


def partial_path(path: Path, partial: str = HIDDEN_PARTIAL) -> Path:
    """The temporary file ``write_whole`` writes ``path`` under: ``partial`` with ``{name}`` the file's
    name, in the same folder (so the rename never crosses a file system)."""
    return path.with_name(partial.format(name=path.name))


def final_path(temp: Path, partial: str = HIDDEN_PARTIAL) -> Path | None:
    """The file ``temp`` is the temporary of (``partial_path``'s inverse), or None when it is not one."""
    prefix, suffix = partial.split("{name}")
    name = temp.name
    if len(name) > len(prefix) + len(suffix) and name.startswith(prefix) and name.endswith(suffix):
        return temp.with_name(name[len(prefix) : len(name) - len(suffix)])
    return None


@contextlib.contextmanager
def whole_files(paths: Sequence[Path], partial: str = HIDDEN_PARTIAL) -> Iterator[list[Path]]:
    """Files that appear together: the block gets their temporary paths (``partial_path``) and writes
    the ones it makes. When it ends without an error, each temporary it wrote is renamed over its path,
    in order; on any error (``KeyboardInterrupt`` too) every temporary is removed and no path is touched.

    A leftover at a temporary name (a killed run's, or a link) is removed first, so nothing is written
    through it.
    """
    temps = [partial_path(Path(p), partial) for p in paths]
    try:
        for temp in temps:
            temp.unlink(missing_ok=True)
        yield temps
        for temp, path in zip(temps, paths, strict=True):
            if os.path.lexists(temp):
                os.replace(temp, path)
    finally:
        for temp in temps:
            with contextlib.suppress(OSError):  # never hide the error that got here
                temp.unlink(missing_ok=True)


def write_whole(path: Path, write: Callable[[Path], object], partial: str = HIDDEN_PARTIAL) -> Path:
    """``write(temporary)`` then rename the temporary over ``path``: ``path`` holds the earlier file or
    the whole new one, never part of one. On any error in ``write`` (``KeyboardInterrupt`` too) the
    temporary is removed and a file already at ``path`` is left as it was. Returns ``path``.

    ``write`` must make the temporary file (a ``FileNotFoundError`` naming it otherwise); it is named
    ``partial_path(path, partial)``, so give a file format explicitly (``image.save(tmp, format="PNG")``).
    """
    with whole_files([path], partial) as (temp,):
        write(temp)
        if not os.path.lexists(temp):
            raise FileNotFoundError(f"{write!r} wrote no file {temp} (to be renamed to {path}).")
    return path


@dataclass(frozen=True)
class NameClash(Generic[T]):
    """Two outputs that are one file on a case-insensitive disk: their names and what writes each."""

    first_name: str
    first: T
    second_name: str
    second: T

    def message(self, inputs: str, remedy: str, show: Callable[[T], str] = str) -> str:
        """One line naming both: ``<inputs> A and B would write the same x.png; <remedy>``, or ``...
        would write X.png and x.png, one file on a case-insensitive disk; <remedy>`` (``inputs``: what
        they are, ``"the slides"``)."""
        what = (
            f"the same {self.first_name}"
            if self.first_name == self.second_name
            else f"{self.first_name} and {self.second_name}, one file on a case-insensitive disk"
        )
        return f"{inputs} {show(self.first)} and {show(self.second)} would write {what}; {remedy}"


def case_clash(named: Iterable[tuple[str, T]]) -> NameClash[T] | None:
    """The first name of ``named`` (``(output name, what writes it)`` pairs) that equals an earlier one
    ignoring case, with that earlier name's writer; None when all differ.

    A pair given twice (one input planned twice) is a clash too: leave out repeats that are fine.
    """
    first: dict[str, tuple[str, T]] = {}
    for name, holder in named:
        key = name.casefold()
        if key in first:
            return NameClash(first[key][0], first[key][1], name, holder)
        first[key] = (name, holder)
    return None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | Path | None) -> dict[str, Any] | None:
    """``{"path", "sha256"}`` of a file, or of a folder's files (their names and bytes, in name order);
    ``sha256`` None when it is not there (reading it fails later); None for None."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.iterdir() if p.is_file()):
            digest.update(f"{child.name}\0{file_sha256(child)}\n".encode())
        sha256: str | None = digest.hexdigest()
    else:
        sha256 = file_sha256(path) if path.is_file() else None
    return {"path": str(path.resolve()), "sha256": sha256}


def device_kind(device: Any) -> str:
    """What computes on ``device`` (a ``torch.device``), for a record: the GPU's model, else the type."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device.type)


def record_differences(earlier: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: earlier -> now`` for each setting of two records that differs (nested settings as
    ``key.inner``; a file, ``{"path", "sha256"}``, by its SHA-256, shown as ``path (SHA-256 <12 digits>)``,
    its absence as ``none``)."""
    out = []
    for key in sorted(set(earlier) | set(now)):
        old, new = earlier.get(key), now.get(key)
        if _is_file(old) or _is_file(new):
            if _digest(old) != _digest(new):
                out.append(f"{key}: {_show_file(old)} -> {_show_file(new)}")
        elif isinstance(old, Mapping) and isinstance(new, Mapping):
            out += [f"{key}.{d}" for d in record_differences(old, new)]
        elif old != new:
            out.append(f"{key}: {json.dumps(old)} -> {json.dumps(new)}")
    return out


def _is_file(value: Any) -> bool:
    return isinstance(value, Mapping) and "sha256" in value


def _digest(value: Any) -> Any:
    return value["sha256"] if _is_file(value) else value


def _show_file(value: Any) -> str:
    if not _is_file(value):
        return "none" if value is None else json.dumps(value)
    return f"{value.get('path')} (SHA-256 {str(value['sha256'])[:12]})"


def record_problem(path: Path, record: Mapping[str, Any], held: str | None, redo: str) -> str | None:
    """Why the run ``record`` describes may not continue beside the files an earlier run left in the
    folder of ``path`` (the folder's record), in one line, or None. ``held`` tells those files ("3 of
    the 5 files this run would write"); None when there are none: nothing to mix with, the run starts
    (and its record replaces an earlier one). Refused: files without a record (what made them is
    unknown), a record that cannot be read, and a record whose settings differ (each named, as
    ``record_differences``); ``redo`` says how to start again ("pass --overwrite to predict them
    again, or choose another --out")."""
    if held is None:
        return None
    if not os.path.lexists(path):
        return f"{path.parent} holds {held} but no {path.name}, so what made them is unknown: {redo}."
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        earlier = err
    if not isinstance(earlier, Mapping):
        why = earlier if isinstance(earlier, Exception) else f"a JSON {type(earlier).__name__}, not an object"
        return f"{path} is not a readable record of a run ({why}): {redo}."
    differ = record_differences(earlier, record)
    if differ:
        return (
            f"the files in {path.parent} were made with other settings ({'; '.join(differ)}); a continued "
            f"run would mix them. Continue with the same settings, or {redo}."
        )
    return None
