"""Bad files: an image or mask file that cannot be read, found before any sample is read.

``check_file`` checks one file fast (header, PNG chunk checksums, JPEG end marker) and gives its size
or why it cannot be used; ``BadFile`` records one such file of a sample. ``MaskFolderDataset.check_files``
runs it over a dataset; ``check_set_files`` is ``SegmentationDataModule``'s run of it over a freshly
built set (a progress bar on process 0 above 500 files); ``SkippedFiles`` keeps what
``on_bad_sample: skip`` left out, and its ``report`` warns with those files and logs their count.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from samflow.data.errors import DataError
from samflow.data.listing import Sample
from samflow.data.reading import TURNS, orientation, several_frames
from samflow.paths import broken_link, link_gone

if TYPE_CHECKING:
    from samflow.data.folder import MaskFolderDataset

OnBadSample = Literal["error", "skip"]
_JPEG_TAIL = 1024  # bytes at the end of a JPEG searched for its end-of-image marker
CHECK_THREADS = 8  # files checked at once (I/O bound; Pillow's decoders release the GIL)


@dataclass(frozen=True)
class BadFile:
    """A file of ``sample`` that cannot be used, and why (one line)."""

    sample: Sample
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, OSError) else f"{type(exc).__name__}: {text}"


def _readable(path: Path) -> bool:
    """Whether the file decodes in full, as a sample read (``_open``) would decode it."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception:  # noqa: BLE001 - whatever a decoder raises, the file cannot be read
        return False
    return True


def _jpeg_ends(path: Path) -> bool:
    """Whether the JPEG has its end-of-image marker (FF D9) in its last bytes: a truncated file has not."""
    with open(path, "rb") as handle:
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - _JPEG_TAIL))
        return b"\xff\xd9" in handle.read()


class FileHeader(NamedTuple):
    """A file's (width, height) upright, as it is read (its EXIF orientation applied), and the orientation."""

    size: tuple[int, int]
    orientation: int


def check_file(path: Path) -> FileHeader | str:
    """The size and orientation of an image file that reads, else why it does not (one line).

    Fast: the header is parsed; a PNG is walked chunk by chunk with its checksums (Pillow's ``verify``,
    no decompression); a JPEG must end with its end-of-image marker, and one without is decoded at 1/8
    scale (``draft``), as a JPEG with bytes after the marker reads fine; other formats are decoded. A
    failed PNG walk is confirmed by decoding (a PNG without its end chunk still reads). What this does
    not find (a PNG or JPEG whose compressed data are corrupt but complete) fails when the sample is read.
    A file of several frames is refused as a read refuses it (``reading.several_frames``).
    """
    if broken_link(path):
        return link_gone(path)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            turn = orientation(img)
            size = img.size[::-1] if turn in (5, 6, 7, 8) else img.size
            refused = several_frames(img)
            if refused:
                return refused
            if img.format == "PNG":
                try:
                    img.verify()
                except Exception:  # confirmed (or not) by a full read below
                    if not _readable(path):
                        raise
            elif img.format in ("JPEG", "MPO"):
                if not _jpeg_ends(path):
                    img.draft(img.mode, (1, 1))  # libjpeg's 1/8 scale: every byte read, 1/64 of the pixels
                    img.load()
            else:
                img.load()
    except UnidentifiedImageError:
        return "not an image file Pillow can read"
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises, the file cannot be read
        return f"truncated or corrupt: {_one_line(exc)}"
    return FileHeader(size, turn)


def size_mismatch(image: Path, mask_wh: tuple[int, int], image_wh: tuple[int, int], turn: int = 1) -> str:
    """Why a mask does not fit its image (of EXIF orientation ``turn``, read upright at ``image_wh``);
    the words of the pre-check and of a sample read."""
    text = f"{mask_wh[0]}x{mask_wh[1]} (WxH) but its image {image} is {image_wh[0]}x{image_wh[1]}"
    if turn in (5, 6, 7, 8) and mask_wh == image_wh[::-1]:
        text += (
            f" as read: its EXIF orientation {turn} has it {TURNS[turn]}, as viewers show it, and the mask "
            "fits the stored pixels. Turn the mask upright too, or remove the orientation tag from the "
            "image file (it is then read as stored)"
        )
    return text


_PROGRESS_ABOVE = 500  # files: a dataset with more gets a progress bar while they are checked


def check_set_files(
    dataset: MaskFolderDataset,
    config_key: str,
    on_bad_sample: OnBadSample,
    rank: int | Callable[[], int],
) -> list[BadFile]:
    """Check the files of a freshly built set, named ``config_key`` (``data.val``), on process ``rank``
    (``check_files``: a progress bar on process 0, in a terminal, above 500 files); the bad files
    ``skip`` left out (none left is an error). ``rank`` may be a function: it is called only for a set
    that large."""
    total = len(dataset)
    files = sum(1 + (s.mask is not None) for s in dataset.samples)
    large = files > _PROGRESS_ABOVE and (rank() if callable(rank) else rank) == 0
    console = Console(stderr=True)
    if large and console.is_terminal:  # a bar on process 0, in a terminal (not in a log file)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(f"Checking the files of {config_key}", total=files)
            bad = dataset.check_files(on_bad_sample, progress=lambda n: bar.advance(task, n))
    else:
        bad = dataset.check_files(on_bad_sample)
    if large:
        rank_zero_info(f"{config_key}: checked {files} files in {dataset.check_seconds or 0:.1f} s.")
    if bad and not dataset.samples:
        raise DataError(
            f"every one of the {total} samples has a bad file, so none is left to skip to; the first: "
            f"{bad[0]}."
        )
    return bad


class SkippedFiles(dict[str, list[BadFile]]):
    """The bad files ``on_bad_sample: skip`` left out, by set (``SegmentationDataModule.datasets`` key);
    ``report`` warns with those not reported yet."""

    def __init__(self) -> None:
        super().__init__()
        self._notes: dict[str, tuple[str, int]] = {}  # key -> (config key, samples before)
        self._reported: set[str] = set()

    def record(self, key: str, config_key: str, total: int, bad: list[BadFile]) -> None:
        """Keep the bad files of set ``key`` (``config_key`` in messages, ``total`` samples before); none:
        nothing to keep."""
        if bad:
            self[key] = bad
            self._notes[key] = (config_key, total)
            self._reported.discard(key)

    def report(self) -> None:
        """Warn with every file left out since the last report, and log the counts."""
        new = [key for key in self if key not in self._reported]
        if not new:
            return
        self._reported.update(new)
        lines, counts = [], []
        for key in new:
            config_key, total = self._notes[key]
            samples = len({b.sample for b in self[key]})
            counts.append(f"{config_key}: {samples} of {total} samples skipped")
            lines += [f"  {config_key}: {b}" for b in self[key]]
        rank_zero_warn(
            "data.on_bad_sample: skip left out the samples (image and mask together) of these "
            f"{len(lines)} bad file(s):\n" + "\n".join(lines)
        )
        rank_zero_info("Bad files (data.on_bad_sample: skip): " + "; ".join(counts) + ".")
