"""A corrupt file is found when the datasets are built (``setup``), before any training step.

Bad-input matrix, files of a split (``data.on_bad_sample``, default ``error``; ``data.check_files``):

| file                                      | error (default)                       | skip                          |
|---|---|---|
| truncated PNG image                       | one DataError line naming it, setup   | sample left out, listed       |
| truncated JPEG image                      | same                                  | same                          |
| zero-byte image                           | same ("empty file")                   | same                          |
| a text file named .png                    | same ("not an image file")            | same                          |
| corrupt (truncated) mask                  | same, the mask named                  | image and mask left out       |
| mask of another size than its image       | same, the words of the read-time check | same                         |
| all of them at once                       | one line, each file and the count     | the good samples remain       |
| a JPEG with bytes after its end marker,   | accepted (they read fine)             | accepted                      |
| a PNG without its end chunk               |                                       |                               |
| `samflow fit` with a truncated JPEG       | exit 1, one line, before step 0: no checkpoint, no metrics rows |     |
| `check_files: false`                      | no check: the file fails when read    | refused (skip needs the check) |
"""

from __future__ import annotations

import csv
import io
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import samflow_here
from PIL import Image

from samflow.data import DataError, SegmentationDataModule, bad_files
from samflow.data.folder import MaskFolderDataset

SIZE = (40, 30)  # W, H


def _image(size: tuple[int, int] = SIZE, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _mask(size: tuple[int, int] = SIZE) -> Image.Image:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[5:20, 5:25] = 255
    return Image.fromarray(mask)


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


def good_root(
    root: Path, stems: tuple[str, ...] = ("a", "b", "c", "d"), size: tuple[int, int] = SIZE
) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, stem in enumerate(stems):
        _image(size, i).save(root / "images" / f"{stem}.png")
        _mask(size).save(root / "masks" / f"{stem}.png")
    return root


def _truncated_png(path: Path) -> None:
    data = _encoded(_image(seed=7), "PNG")
    path.write_bytes(data[: len(data) // 2])


def _truncated_jpeg(path: Path) -> None:
    data = _encoded(_image(seed=8), "JPEG")
    path.write_bytes(data[: len(data) // 2])


def _truncated_mask(path: Path) -> None:
    data = _encoded(_mask(), "PNG")
    path.write_bytes(data[: len(data) - 30])  # into the IDAT chunk


# name -> (the file it writes, relative to the root; how; the reason words in the message)
CASES = {
    "truncated_png": ("images/bad.png", _truncated_png, "truncated or corrupt"),
    "truncated_jpeg": ("images/bad.jpg", _truncated_jpeg, "truncated or corrupt: image file is truncated"),
    "zero_byte": ("images/bad.png", lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "text_as_png": ("images/bad.png", lambda p: p.write_text("id,label\n1,cat\n"), "not an image file"),
    "corrupt_mask": ("masks/bad.png", _truncated_mask, "truncated or corrupt"),
}


def add_bad(root: Path, case: str, stem: str = "bad") -> Path:
    """Add the pair ``stem`` whose image or mask is broken as ``case`` says; the broken file's path."""
    rel, write, _ = CASES[case]
    folder, name = rel.split("/")
    suffix = Path(name).suffix
    bad = root / folder / f"{stem}{suffix}"
    write(bad)
    if folder == "images":
        _mask().save(root / "masks" / f"{stem}.png")
    else:
        _image().save(root / "images" / f"{stem}.png")
    return bad


def add_mismatch(root: Path, stem: str = "small") -> Path:
    _image().save(root / "images" / f"{stem}.png")
    _mask((SIZE[0], SIZE[1] - 4)).save(root / "masks" / f"{stem}.png")
    return root / "masks" / f"{stem}.png"


def setup_error(dm: SegmentationDataModule, stage: str = "fit") -> str:
    with pytest.raises(DataError) as info:
        dm.setup(stage)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_file_stops_setup_with_one_line_naming_it(tmp_path, case):
    root = good_root(tmp_path / "train")
    bad = add_bad(root, case)
    dm = SegmentationDataModule(train=str(root), val=str(good_root(tmp_path / "val")), img_size=32)
    message = setup_error(dm)
    assert message.startswith("data.train: 1 of 10 files cannot be used (1 of 5 samples;"), message
    assert f"{bad} ({CASES[case][2]}" in message, message
    assert "data.on_bad_sample: skip" in message


def test_a_mask_of_another_size_is_reported_by_the_check_in_the_words_of_the_read(tmp_path):
    root = good_root(tmp_path / "train")
    mask = add_mismatch(root)
    image = root / "images" / "small.png"
    # The read-time check (kept for check_files: false) ...
    dataset = MaskFolderDataset(root, img_size=32)
    with pytest.raises(DataError) as read:
        dataset[[s.id for s in dataset.samples].index("small")]
    words = f"is 40x26 (WxH) but its image {image} is 40x30"
    assert f"{mask} {words}" in str(read.value)
    # ... and the pre-check say the same, listed as one bad file.
    message = setup_error(SegmentationDataModule(train=str(root), img_size=32))
    assert message.startswith("data.train: 1 of 10 files cannot be used"), message
    assert f"{mask} (mask {words}: a mask must have its image's size)" in message, message


def all_bad(root: Path) -> list[Path]:
    bad = [add_bad(root, case, stem=f"bad_{case}") for case in sorted(CASES)]
    return [*bad, add_mismatch(root)]


def test_every_bad_file_is_named_in_one_line_with_the_count(tmp_path):
    root = good_root(tmp_path / "train")
    bad = all_bad(root)
    message = setup_error(SegmentationDataModule(train=str(root), img_size=32))
    assert message.startswith("data.train: 6 of 20 files cannot be used (6 of 10 samples;"), message
    for path in bad:
        assert f"{path} (" in message, path


def test_skip_keeps_the_good_samples_and_lists_the_skipped_files(tmp_path, monkeypatch):
    root = good_root(tmp_path / "train")
    bad = all_bad(root)
    val = good_root(tmp_path / "val")
    add_bad(val, "zero_byte")
    infos: list[str] = []
    monkeypatch.setattr(bad_files, "rank_zero_info", infos.append)
    dm = SegmentationDataModule(train=str(root), val=str(val), img_size=32, on_bad_sample="skip")
    with pytest.warns(UserWarning, match="data.on_bad_sample: skip left out") as record:
        dm.setup("fit")
    assert [s.id for s in dm.datasets["train"].samples] == ["a", "b", "c", "d"]
    assert [s.id for s in dm.datasets["val"].samples] == ["a", "b", "c", "d"]
    for dataset in dm.datasets.values():
        assert len([dataset[i] for i in range(len(dataset))]) == 4  # every kept sample reads
    warning = "\n".join(str(w.message) for w in record if "left out" in str(w.message))
    for path in [*bad, val / "images" / "bad.png"]:
        assert f"{path} (" in warning, path
    assert "7 bad file(s)" in warning
    counts = "data.train: 6 of 10 samples skipped; data.val: 1 of 5 samples skipped."
    assert infos == [f"Bad files (data.on_bad_sample: skip): {counts}"]
    assert {k: len(v) for k, v in dm.skipped.items()} == {"train": 6, "val": 1}
    # A second setup (Lightning calls it per stage) reports nothing new.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.setup("fit")


def test_skip_with_nothing_left_is_an_error(tmp_path):
    root = tmp_path / "train"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    bad = add_bad(root, "truncated_jpeg")
    dm = SegmentationDataModule(train=str(root), img_size=32, on_bad_sample="skip")
    message = setup_error(dm)
    assert message.startswith("data.train: every one of the 1 samples has a bad file"), message
    assert str(bad) in message


def test_named_sets_and_predict_are_checked_too(tmp_path):
    good = good_root(tmp_path / "good")
    odd = good_root(tmp_path / "odd")
    bad = add_bad(odd, "text_as_png")
    dm = SegmentationDataModule(test_sets={"GOOD": str(good), "ODD": str(odd)}, img_size=32)
    assert setup_error(dm, "test").startswith("data.test_sets.ODD: 1 of 10 files"), bad
    plain = tmp_path / "plain"
    plain.mkdir()
    _image().save(plain / "x.png")
    (plain / "y.jpg").write_bytes(b"")
    message = setup_error(SegmentationDataModule(predict=str(plain), img_size=32), "predict")
    assert message.startswith("data.predict: 1 of 2 files cannot be used"), message
    assert f"{plain / 'y.jpg'} (empty file (0 bytes))" in message


def test_files_that_read_fine_are_not_reported(tmp_path):
    """A JPEG with bytes after its end marker and a PNG without its end chunk read fine: accepted."""
    root = good_root(tmp_path / "train")
    (root / "images" / "tail.jpg").write_bytes(_encoded(_image(seed=3), "JPEG") + b"\0TRAILER" * 300)
    _mask().save(root / "masks" / "tail.png")
    (root / "images" / "noend.png").write_bytes(_encoded(_image(seed=4), "PNG")[:-12])
    _mask().save(root / "masks" / "noend.png")
    dm = SegmentationDataModule(train=str(root), img_size=32, check_files=True)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    assert len(dataset) == 6
    assert all(dataset[i]["image"].shape == (3, 32, 32) for i in range(6))


def test_check_files_false_leaves_bad_files_to_the_read(tmp_path):
    root = good_root(tmp_path / "train")
    bad = add_bad(root, "zero_byte")
    dm = SegmentationDataModule(train=str(root), img_size=32, check_files=False)
    dm.setup("fit")  # no check
    dataset = dm.datasets["train"]
    with pytest.raises(DataError, match="cannot read the file"):
        dataset[[s.image for s in dataset.samples].index(bad)]
    with pytest.raises(ValueError, match="on_bad_sample: skip needs data.check_files: true"):
        SegmentationDataModule(train=str(root), on_bad_sample="skip", check_files=False)
    with pytest.raises(ValueError, match="must be 'error' or 'skip'"):
        SegmentationDataModule(train=str(root), on_bad_sample="ignore")  # type: ignore[arg-type]


def test_large_sets_are_checked_fast_with_progress_on_rank_zero_only(tmp_path, monkeypatch):
    """1,000 pairs (2,000 files) of small PNG masks and JPEG images: checked in well under a few seconds
    (about 0.5 s on 2 CPU cores); above 500 files process 0 shows a progress bar and logs the time."""
    root = tmp_path / "big"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image, mask = _encoded(_image((64, 48)), "JPEG"), _encoded(_mask((64, 48)), "PNG")
    for i in range(1000):
        (root / "images" / f"{i:04d}.jpg").write_bytes(image)
        (root / "masks" / f"{i:04d}.png").write_bytes(mask)
    infos: list[str] = []
    monkeypatch.setattr(bad_files, "rank_zero_info", infos.append)
    dm = SegmentationDataModule(train=str(root), img_size=32)
    start = time.perf_counter()
    dm.setup("fit")
    seconds = time.perf_counter() - start
    assert len(dm.datasets["train"]) == 1000
    assert seconds < 5, seconds
    assert len(infos) == 1 and infos[0].startswith("data.train: checked 2000 files in"), infos
    monkeypatch.setattr(SegmentationDataModule, "_rank", lambda self: 1)
    SegmentationDataModule(train=str(root), img_size=32).setup("fit")
    assert len(infos) == 1  # no progress bar, no log on other processes


def test_cli_fit_with_a_truncated_image_stops_before_step_zero(tmp_path):
    """Exit 1 and one line naming the file, from setup: no checkpoint and no metrics rows are written.

    The training set has 8 samples, shuffled and read one per step: a run that finds the file only
    when it reads it (today's code, or ``check_files: false``) trains and logs 4 steps first (seed 0).
    """
    root = good_root(tmp_path / "train", stems=tuple("abcdefg"), size=(64, 48))
    bad = root / "images" / "z.jpg"
    data = _encoded(_image((64, 48), 9), "JPEG")
    bad.write_bytes(data[: len(data) // 2])
    _mask((64, 48)).save(root / "masks" / "z.png")
    val = good_root(tmp_path / "val", size=(64, 48))
    args = [
        "fit", "--experiment", "quickstart",
        "--data.init_args.quickstart", "false",
        "--data.init_args.train", str(root),
        "--data.init_args.val", str(val),
        "--data.init_args.batch_size", "1",
        "--trainer.max_epochs", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.log_every_n_steps", "1",
    ]  # fmt: skip
    proc = samflow_here(args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("samflow: error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    assert errors[0].startswith("samflow: error: data.train: 1 of 16 files cannot be used"), errors[0]
    assert f"{bad} (truncated or corrupt: image file is truncated" in errors[0]
    runs = tmp_path / "runs"
    assert not list(runs.rglob("*.ckpt")) if runs.exists() else True
    for metrics in runs.rglob("metrics.csv") if runs.exists() else []:
        with metrics.open() as handle:
            assert list(csv.DictReader(handle)) == [], metrics
