"""Bad files: an image or mask file that cannot be read, found before any sample is read.

``check_file`` checks one file fast (header, PNG chunk checksums, JPEG end marker) and gives its size
or why it cannot be used; ``BadFile`` records one such file of a sample. ``MaskFolderDataset.check_files``
runs it over a dataset; ``check_set_files`` is ``SegmentationDataModule``'s run of it over a freshly
built set (a progress bar on process 0 above 500 files, what ``on_bad_sample: skip`` left out recorded)
and ``report_skipped`` warns with those files and logs their count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from samflow.data.errors import DataError
from samflow.data.listing import Sample

if TYPE_CHECKING:
    from samflow.data.datamodule import SegmentationDataModule
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


def check_file(path: Path) -> tuple[int, int] | str:
    """The (width, height) of an image file that reads, else why it does not (one line).

    Fast: the header is parsed; a PNG is walked chunk by chunk with its checksums (Pillow's ``verify``,
    no decompression); a JPEG must end with its end-of-image marker, and one without is decoded at 1/8
    scale (``draft``), as a JPEG with bytes after the marker reads fine; other formats are decoded. A
    failed PNG walk is confirmed by decoding (a PNG without its end chunk still reads). What this does
    not find (a PNG or JPEG whose compressed data are corrupt but complete) fails when the sample is read.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            size = img.size
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
    return size


def size_mismatch(image: Path, mask_wh: tuple[int, int], image_wh: tuple[int, int]) -> str:
    """Why a mask does not fit its image; the words of the pre-check and of a sample read."""
    return f"{mask_wh[0]}x{mask_wh[1]} (WxH) but its image {image} is {image_wh[0]}x{image_wh[1]}"


_PROGRESS_ABOVE = 500  # files: a dataset with more gets a progress bar while they are checked


def check_set_files(
    datamodule: SegmentationDataModule, dataset: MaskFolderDataset, split: str, name: str
) -> None:
    """Check the files of a freshly built set (``check_files``); record what ``skip`` left out."""
    total = len(dataset)
    files = sum(1 + (s.mask is not None) for s in dataset.samples)
    config_key = datamodule._config_key(split, name)
    large = files > _PROGRESS_ABOVE and datamodule._rank() == 0
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
            bad = dataset.check_files(datamodule.on_bad_sample, progress=lambda n: bar.advance(task, n))
    else:
        bad = dataset.check_files(datamodule.on_bad_sample)
    if large:
        rank_zero_info(f"{config_key}: checked {files} files in {dataset.check_seconds or 0:.1f} s.")
    if not bad:
        return
    if not dataset.samples:
        raise DataError(
            f"every one of the {total} samples has a bad file, so none is left to skip to; the first: "
            f"{bad[0]}."
        )
    key = datamodule._key(split, name)
    datamodule.skipped[key] = bad
    datamodule._skip_notes[key] = (config_key, total)
    datamodule._reported.discard(key)


def report_skipped(datamodule: SegmentationDataModule) -> None:
    """Warn with every file ``on_bad_sample: skip`` left out since the last report, and log the counts."""
    new = [key for key in datamodule.skipped if key not in datamodule._reported]
    if not new:
        return
    datamodule._reported.update(new)
    lines, counts = [], []
    for key in new:
        config_key, total = datamodule._skip_notes[key]
        samples = len({b.sample for b in datamodule.skipped[key]})
        counts.append(f"{config_key}: {samples} of {total} samples skipped")
        lines += [f"  {config_key}: {b}" for b in datamodule.skipped[key]]
    rank_zero_warn(
        "data.on_bad_sample: skip left out the samples (image and mask together) of these "
        f"{len(lines)} bad file(s):\n" + "\n".join(lines)
    )
    rank_zero_info("Bad files (data.on_bad_sample: skip): " + "; ".join(counts) + ".")
