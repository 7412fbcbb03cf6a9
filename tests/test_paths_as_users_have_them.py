"""Data and runs at the paths researchers have them: spaces and accents in folder names, ``~``, relative
paths in an experiment run from the project's folder and from elsewhere, read-only data, symlinked
dataset folders (links to a shared pool, some broken when the share is not mounted) and a ``runs``
folder that is a link.

Found in session 36 (helper H4): a broken link among a split's images was left out of the set without
a word, a broken mask link was reported as a missing mask ("Add the masks"), an images folder linked
to an unmounted share as "contains no folders"; a relative path that did not exist never said that it
was read from the working directory (not the experiment file's folder), a ``$VAR`` path never said
that it is not expanded; ``~`` was not expanded in a slide or annotation path.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import samflow_in_process, short_run
from PIL import Image

from samflow.data import DataError, SegmentationDataModule, find_samples


def make_split(root: Path, stems: tuple[str, ...] = ("a", "b", "c")) -> Path:
    """``root/images/<stem>.png`` and ``root/masks/<stem>.png`` (a square of 255 on 0)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, stem in enumerate(stems):
        Image.fromarray(np.full((32, 32, 3), 60 + 20 * i, np.uint8)).save(root / "images" / f"{stem}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[4:20, 6:22] = 255
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root


def linked_split(tmp_path: Path) -> tuple[Path, Path]:
    """(pool, split): a split whose every image and mask is a link into a shared pool."""
    pool = make_split(tmp_path / "pool")
    split = tmp_path / "linked"
    for sub in ("images", "masks"):
        (split / sub).mkdir(parents=True)
        for file in sorted((pool / sub).iterdir()):
            (split / sub / file.name).symlink_to(file)
    return pool, split


def setup_error(dm: SegmentationDataModule) -> str:
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    return str(info.value)


def test_links_into_a_pool_and_a_linked_images_folder_are_read(tmp_path: Path) -> None:
    pool, split = linked_split(tmp_path)
    assert [s.id for s in find_samples(split)] == ["a", "b", "c"]
    folder = tmp_path / "folder_link"
    folder.mkdir()
    (folder / "images").symlink_to(pool / "images", target_is_directory=True)
    (folder / "masks").symlink_to(pool / "masks", target_is_directory=True)
    dm = SegmentationDataModule(train=str(folder), img_size=32)
    dm.setup("fit")
    assert [s.id for s in dm.datasets["train"].samples] == ["a", "b", "c"]


def test_a_broken_image_link_is_named_not_left_out_of_the_set(tmp_path: Path) -> None:
    """An image whose link points at a file that is gone (a share not mounted) stops the run naming the
    link and its target; it was silently left out (the set one image short, no word said)."""
    pool, split = linked_split(tmp_path)
    (pool / "images" / "b.png").unlink()
    message = setup_error(SegmentationDataModule(train=str(split), img_size=32))
    assert message.startswith("data.train: "), message
    assert (
        f"{split / 'images' / 'b.png'} (a link to {pool / 'images' / 'b.png'}, which does not exist"
        in message
    )
    assert "is the share it points into mounted?" in message
    dm = SegmentationDataModule(train=str(split), img_size=32, on_bad_sample="skip")
    with pytest.warns(UserWarning, match="left out"):
        dm.setup("fit")
    assert [s.id for s in dm.datasets["train"].samples] == ["a", "c"]


def test_a_broken_mask_link_is_named_as_one_not_as_a_missing_mask(tmp_path: Path) -> None:
    pool, split = linked_split(tmp_path)
    (pool / "masks" / "a.png").unlink()
    message = setup_error(SegmentationDataModule(train=str(split), img_size=32))
    assert (
        f"{split / 'masks' / 'a.png'} (a link to {pool / 'masks' / 'a.png'}, which does not exist" in message
    )
    assert "Add the masks" not in message and "have no mask" not in message


def test_every_image_link_broken_names_the_links_not_an_empty_folder(tmp_path: Path) -> None:
    pool, split = linked_split(tmp_path)
    for file in (pool / "images").iterdir():
        file.unlink()
    message = setup_error(SegmentationDataModule(train=str(split), img_size=32))
    assert "has no image files" not in message
    assert f"{split / 'images' / 'a.png'} (a link to" in message


def test_an_images_folder_linked_to_a_missing_folder_names_the_link_target(tmp_path: Path) -> None:
    """``images -> /mnt/share/isic/images`` with the share not mounted: the error names the link's target,
    not "contains no folders; set images= to the right one"."""
    root = tmp_path / "data"
    root.mkdir()
    gone = tmp_path / "share" / "images"
    (root / "images").symlink_to(gone, target_is_directory=True)
    (root / "masks").mkdir()
    message = setup_error(SegmentationDataModule(train=str(root), img_size=32))
    assert f"{root / 'images'} does not exist (a link to {gone}, which does not exist" in message
    assert "contains no folders" not in message
    linked_root = tmp_path / "linked_root"
    linked_root.symlink_to(tmp_path / "share", target_is_directory=True)
    message = setup_error(SegmentationDataModule(train=str(linked_root), img_size=32))
    assert message.startswith(
        f"data.train: Dataset root {linked_root} does not exist or is not a folder (a link to "
    )


def test_a_missing_relative_root_names_the_working_directory_it_was_read_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths are read from the working directory: one that is there works from there, and one
    that is not says where it was looked for (an experiment in ``exps/`` naming ``../data/train`` as
    relative to itself fails when run from the project's folder)."""
    make_split(tmp_path / "proj" / "My Project" / "données" / "train")
    monkeypatch.chdir(tmp_path / "proj")
    dm = SegmentationDataModule(train="My Project/données/train", img_size=32)
    dm.setup("fit")
    assert len(dm.datasets["train"].samples) == 3
    message = setup_error(SegmentationDataModule(train="../My Project/données/train", img_size=32))
    assert message == (
        "data.train: Dataset root ../My Project/données/train does not exist or is not a folder (relative "
        f"paths, also those in config files, are read from the working directory {tmp_path / 'proj'}); "
        "check the path."
    )


def test_tilde_is_expanded_and_an_environment_variable_is_named_as_not_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_split(tmp_path / "datasets" / "kvasir")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATA", str(tmp_path / "datasets"))
    dm = SegmentationDataModule(train="~/datasets/kvasir", img_size=32)
    dm.setup("fit")
    assert len(dm.datasets["train"].samples) == 3
    message = setup_error(SegmentationDataModule(train="$DATA/kvasir", img_size=32))
    assert "Dataset root $DATA/kvasir does not exist" in message
    assert (
        "environment variables such as $HOME are not expanded in config values: write the path out" in message
    )


def test_a_missing_relative_sam_checkpoint_names_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from samflow.sam import build_sam

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        build_sam("tiny", checkpoint="ckpt/sam tiny.pth")
    assert (
        f"(relative paths, also those in config files, are read from the working directory {tmp_path})"
        in str(info.value)
    )
    with pytest.raises(
        FileNotFoundError, match=r"\(environment variables such as \$HOME are not expanded in config"
    ):
        build_sam("tiny", checkpoint="$CKPT/sam.pth")


def test_tilde_in_slide_and_annotation_paths_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tiffslide")
    pytest.importorskip("shapely")
    from samflow.data.wsi import Slide, SlideError
    from samflow.data.wsi.annotations import load_annotations
    from samflow.testing import write_disc_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    write_disc_slide(slides / "s.tif", 256, 256)
    (slides / "s.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    monkeypatch.setenv("HOME", str(tmp_path))
    slide = Slide("~/slides/s.tif")
    assert slide.dimensions == (256, 256)
    slide.close()
    assert load_annotations("~/slides/s.geojson").is_empty
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SlideError, match=r"^slides/t.geojson: no such annotation file \(relative paths"):
        load_annotations("slides/t.geojson")


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_fit_from_the_project_folder_with_the_paths_researchers_have(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An experiment in ``exps/`` naming data and the SAM file relative to the project's folder, under
    folder names with spaces and accents, run from the project's folder: it trains, writes nothing
    beside the read-only data, and writes the run through ``runs``, a link to a scratch disk. Its
    ``config.yaml`` given from another working directory says, in one line, where the relative
    paths were read from."""
    from samflow.sam import build_sam

    monkeypatch.setenv("WANDB_MODE", "disabled")
    proj = tmp_path / "proj"
    data = proj / "My Project" / "ISIC 2018"
    make_split(data / "train")
    make_split(data / "données val")
    (proj / "sam ckpt").mkdir()
    torch.save(build_sam("tiny", seed=1).state_dict(), proj / "sam ckpt" / "sam tiny.pth")
    (proj / "exps").mkdir()
    (proj / "exps" / "my.yaml").write_text(
        "model:\n  sam: {variant: tiny, checkpoint: sam ckpt/sam tiny.pth}\n"
        "  plugins: {decoder: {class_path: DecoderTuning}}\n  losses: {bce: 1.0}\n  metrics: [iou]\n"
        "data:\n  class_path: samflow.data.SegmentationDataModule\n  init_args:\n"
        "    train: My Project/ISIC 2018/train\n    val: My Project/ISIC 2018/données val\n"
        "    img_size: 128\n    prompt: box\n"
        "trainer: {accelerator: cpu, devices: 1, enable_progress_bar: false}\n"
    )
    scratch = tmp_path / "scratch" / "runs"
    scratch.mkdir(parents=True)
    (proj / "runs").symlink_to(scratch, target_is_directory=True)
    before = _tree(data)
    modes = {p: p.stat().st_mode for p in [data, *data.rglob("*")]}
    for p in modes:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    monkeypatch.chdir(proj)
    try:
        assert samflow_in_process(["fit", "--experiment", "exps/my.yaml", *short_run(batch_size=2)]) == 0
        assert (scratch / "my" / "version_0" / "checkpoints" / "last.ckpt").is_file()
        assert _tree(data) == before
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    config = os.path.relpath(proj / "runs" / "my" / "version_0" / "config.yaml", elsewhere)
    assert samflow_in_process(["fit", "--experiment", config, "--trainer.max_epochs", "0"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    # the data's folders are listed before SAM is built (``check_before_build``): its relative root first
    root = "My Project/ISIC 2018/train"
    assert error.startswith(f"samflow: error: data.train: Dataset root {root} does not exist"), error
    assert f"read from the working directory {elsewhere})" in error, error


def test_a_rebuilt_runs_missing_relative_sam_checkpoint_names_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Predictor.from_run`` / export / predict-slide rebuild a run whose config.yaml keeps a relative
    SAM file: read from another folder, the error said only that it does not exist."""
    from samflow.predictor_types import PredictorError
    from samflow.rebuild import build_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(PredictorError) as info:
        build_model({"sam": {"variant": "tiny", "checkpoint": "ckpt/sam.pth"}})
    assert "(model.sam.checkpoint of the run's config) does not exist (relative paths" in str(info.value)
    assert f"read from the working directory {tmp_path})" in str(info.value)
