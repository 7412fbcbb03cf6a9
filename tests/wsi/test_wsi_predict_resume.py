"""``samflow predict-slide --resume``: a run killed part way, continued, predicts only the slides whose
files are not all there and ends with the folder of an uninterrupted run, byte for byte; a continued
run with other settings, a folder of these slides' files without a record, and ``--resume`` with
``--overwrite`` are refused in one line."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("tiffslide")

from synthetic_slide import level0, write_geojson, write_pyramid, write_slide

from samflow import wsi_tiles
from samflow.cli import main
from samflow.data.wsi.slide import Slide
from samflow.wsi_record import RECORD

TINY = ["--experiment", "wsi_sam_camelyon16", "--model.sam.variant", "tiny", "--model.sam.checkpoint", "null"]
SIZES = ["--tile", "128", "--overlap", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("slides")
    a, _ = write_slide(folder)  # slide.tif
    b = folder / "other.tif"
    write_pyramid(b, level0()[::-1].copy())  # another slide: the tissue upside down
    return {"a": a, "b": b, "geojson": write_geojson(folder)}


def command(inputs: dict[str, Path], out: Path, *more: str) -> list[str]:
    slides = [str(inputs["a"]), str(inputs["b"])]
    truth = [str(inputs["geojson"])] * 2
    return ["predict-slide", *slides, *TINY, *SIZES, "--annotations", *truth, "--out", str(out), *more]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def whole(inputs, tmp_path_factory) -> Path:
    """The folder of an uninterrupted run over both slides."""
    out = tmp_path_factory.mktemp("whole") / "out"
    assert main(command(inputs, out)) == 0
    return out


@pytest.fixture
def cut(whole, tmp_path) -> Path:
    """The folder of the run killed while it predicted the second slide: the first slide's files and
    the record, and the leftovers of a process killed mid-slide (a scratch array, a hidden temporary)."""
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    for name in ("other_mask.tif", "other.geojson", "other.json"):
        (out / name).unlink()
    (out / ".other_mask.u8").write_bytes(b"\0" * 64)
    (out / ".other_mask.tif.partial").write_bytes(b"half a TIFF")
    return out


@pytest.fixture
def tiles_run(monkeypatch) -> list[tuple[str, tuple[int, int]]]:
    """(slide stem, tile origin) of every tile that goes through the model."""
    ran: list[tuple[str, tuple[int, int]]] = []
    real = wsi_tiles.tile_probabilities

    def spy(module, slide, origins, **kwargs):
        ran.extend((Path(slide.path).stem, tuple(o)) for o in origins)
        return real(module, slide, origins, **kwargs)

    monkeypatch.setattr(wsi_tiles, "tile_probabilities", spy)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    return ran


def tissue_tiles(path: Path) -> list[tuple[int, int]]:
    """The slide's tissue tile origins, found anew (1 um/px, 128 px tiles overlapping by 32)."""
    _, _, chunks = wsi_tiles.tile_chunks(
        Slide(path), mpp=1.0, tile=128, overlap=32, batch_size=2, tissue_mpp=16.0
    )
    return [tuple(o) for _, chunk in chunks for o in chunk]


def test_a_killed_run_continued_ends_as_an_uninterrupted_one(inputs, whole, cut, tiles_run, capsys):
    assert (whole / RECORD).is_file()
    assert main(command(inputs, cut, "--resume")) == 0
    # only the slide whose files were missing ran, every one of its tissue tiles once
    expected = tissue_tiles(inputs["b"])
    assert sorted(tiles_run) == sorted(("other", o) for o in expected) and expected
    assert "1 of 2 slides left" in capsys.readouterr().out
    assert files(cut) == files(whole)  # the record, masks, GeoJSON and Dice: byte for byte, no leftovers
    tiles_run.clear()
    assert main(command(inputs, cut, "--resume")) == 0  # nothing left: no tile runs, nothing changes
    assert tiles_run == [] and files(cut) == files(whole)


def test_resume_in_an_empty_folder_is_a_whole_run(inputs, whole, tmp_path, tiles_run):
    assert main(command(inputs, tmp_path / "out", "--resume")) == 0
    assert files(tmp_path / "out") == files(whole)


@pytest.mark.parametrize(
    ("more", "differs"),
    [
        (["--threshold", "0.25"], "threshold: 0.5 -> 0.25"),
        (["--batch-size", "3"], "batch_size: 2 -> 3"),
        (["--overlap", "16"], "overlap: 32 -> 16"),
        (["--model.sam.seed", "1"], "overrides: "),
    ],
)
def test_a_continued_run_with_other_settings_is_refused(inputs, cut, tiles_run, capsys, more, differs):
    before = files(cut)
    assert main([*command(inputs, cut, "--resume"), *more]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made with other settings" in err and differs in err, err
    assert tiles_run == [] and files(cut) == before


def test_a_changed_checkpoint_is_refused_by_its_bytes(inputs, cut, tiles_run, capsys, tmp_path):
    """The record holds ``--ckpt`` by SHA-256: a run without it (the untrained plugins) is another model."""
    import json

    record = json.loads((cut / RECORD).read_text())
    assert record["ckpt"] is None and record["experiment"]["sha256"]
    record["ckpt"] = {"path": str(tmp_path / "model.ckpt"), "sha256": "0" * 64}
    (cut / RECORD).write_text(json.dumps(record))
    assert main(command(inputs, cut, "--resume")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"ckpt: {tmp_path / 'model.ckpt'} (SHA-256 000000000000) -> none" in err


def test_files_without_a_record_are_refused(inputs, cut, tiles_run, capsys):
    (cut / RECORD).unlink()
    assert main(command(inputs, cut, "--resume")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no {RECORD}, so what made them is unknown" in err, err
    assert tiles_run == [] and not (cut / "other_mask.tif").exists()


def test_resume_with_overwrite_is_refused_and_existing_files_name_resume(inputs, cut, tiles_run, capsys):
    before = files(cut)
    assert main(command(inputs, cut, "--resume", "--overwrite")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite: not allowed with argument --resume" in err, err
    assert main(command(inputs, cut)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume to continue the run that wrote them" in err, err
    assert tiles_run == [] and files(cut) == before


def test_torchrun_processes_continue_the_same_slides(inputs, tmp_path):
    """Under ``torchrun`` process 0 decides the slides left and every process runs those (two gloo
    processes write one process's bytes); a refusal stops every process before any tile runs."""
    from helpers import run_torchrun, samflow_here

    whole = samflow_here(command(inputs, tmp_path / "whole"), tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert whole.returncode == 0, whole.stderr[-3000:]
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    for name in ("other_mask.tif", "other.geojson", "other.json"):
        (tmp_path / "cut" / name).unlink()
    before = files(tmp_path / "cut")
    refused = run_torchrun(
        ["-m", "samflow", *command(inputs, tmp_path / "cut", "--resume", "--threshold", "0.25")], tmp_path
    )
    assert refused.returncode != 0 and "threshold: 0.5 -> 0.25" in refused.stderr, refused.stderr[-3000:]
    assert files(tmp_path / "cut") == before
    done = run_torchrun(["-m", "samflow", *command(inputs, tmp_path / "cut", "--resume")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "tiles ->" in line]
    assert len(lines) == 1 and "other.tif" in lines[0] and "(2 processes)" in lines[0], done.stdout
    assert files(tmp_path / "cut") == files(tmp_path / "whole")
