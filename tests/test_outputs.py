"""samflow.outputs: a file written whole or not at all, files that appear together, and output names
that are one file on a case-insensitive disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from samflow.outputs import case_clash, final_path, partial_path, whole_files, write_whole

EARLIER = b"the earlier file, whole\n" * 50


def half_then(error: BaseException):
    """A ``write`` that writes half of a new file, then raises ``error`` (a full disk, Ctrl-C)."""

    def write(temp: Path) -> None:
        temp.write_bytes(b"new, but only half of it")
        raise error

    return write


def test_success_replaces_the_earlier_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    path.write_bytes(EARLIER)
    assert write_whole(path, lambda temp: temp.write_text('{"new": 1}')) == path
    assert path.read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_an_error_in_write_leaves_the_earlier_file_byte_equal_and_no_temporary(tmp_path, error):
    path = tmp_path / "mask.png"
    path.write_bytes(EARLIER)
    with pytest.raises(type(error)):
        write_whole(path, half_then(error))
    assert path.read_bytes() == EARLIER
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]
    # without an earlier file, nothing at all
    with pytest.raises(type(error)):
        write_whole(tmp_path / "new.png", half_then(error), partial="{name}.partial")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]


def test_a_write_that_makes_no_file_is_an_error_naming_the_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(EARLIER)
    with pytest.raises(FileNotFoundError, match=r"\.a\.txt\.partial"):
        write_whole(path, lambda temp: None)
    assert path.read_bytes() == EARLIER


def test_a_leftover_or_a_link_at_the_temporary_name_is_never_written_through(tmp_path):
    """A killed run's temporary (or a link someone put there) is removed before ``write`` runs: the
    file the link points to keeps its bytes, and the new file is whole."""
    path, victim = tmp_path / "a.png", tmp_path / "victim.bin"
    victim.write_bytes(EARLIER)
    partial_path(path).symlink_to(victim)
    write_whole(path, lambda temp: temp.write_bytes(b"new"))
    assert victim.read_bytes() == EARLIER and path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "victim.bin"]


def test_the_temporary_names_and_their_inverse(tmp_path):
    path = tmp_path / "x.png"
    assert partial_path(path) == tmp_path / ".x.png.partial"  # hidden by default
    assert partial_path(path, "{name}.partial") == tmp_path / "x.png.partial"  # MaskWriter's
    for partial in (".{name}.partial", "{name}.partial", "{name}.tmp"):
        assert final_path(partial_path(path, partial), partial) == path
    assert final_path(tmp_path / "x.png") is None
    assert final_path(tmp_path / "..partial") is None  # no name inside
    assert final_path(tmp_path / "x.png.partial") is None  # not hidden: not the default's


def test_files_that_appear_together_appear_all_or_none(tmp_path):
    mask, geojson, dice = (tmp_path / n for n in ("s_mask.tif", "s.geojson", "s.json"))
    mask.write_bytes(EARLIER)
    with pytest.raises(RuntimeError, match="stopped"), whole_files([mask, geojson, dice]) as temps:
        temps[0].write_bytes(b"new mask")
        temps[1].write_bytes(b"new polygons")
        raise RuntimeError("stopped before the Dice")
    assert mask.read_bytes() == EARLIER and not geojson.exists() and not dice.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_mask.tif"]
    # a file the block does not write (no annotations: no Dice) is left out, the others renamed
    with whole_files([mask, geojson, dice]) as (mask_temp, geojson_temp, _):
        mask_temp.write_bytes(b"new mask")
        geojson_temp.write_bytes(b"new polygons")
        assert mask.read_bytes() == EARLIER  # nothing renamed before the block ends
    assert mask.read_bytes() == b"new mask" and geojson.read_bytes() == b"new polygons"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.geojson", "s_mask.tif"]


def test_case_clash_finds_the_first_holder_of_a_name_equal_but_for_case():
    named = [("a.png", "in/a.png"), ("b.png", "in/b.jpg"), ("B.png", "other/B.png"), ("c.png", "c")]
    clash = case_clash(named)
    assert clash is not None
    assert (clash.first_name, clash.first, clash.second_name, clash.second) == (
        "b.png",
        "in/b.jpg",
        "B.png",
        "other/B.png",
    )
    assert clash.message("the images", "rename one.") == (
        "the images in/b.jpg and other/B.png would write b.png and B.png, one file on a case-insensitive "
        "disk; rename one."
    )
    same = case_clash([("x.png", "a/x.png"), ("x.png", "b/x.png")])
    assert same is not None
    assert same.message("Two images", "rename one.", show=repr) == (
        "Two images 'a/x.png' and 'b/x.png' would write the same x.png; rename one."
    )
    # a pair given twice is a clash (the caller leaves out repeats that are fine); no clash: None
    assert case_clash([("x.png", "a"), ("x.png", "a")]) is not None
    assert case_clash([("x.png", "a"), ("xx.png", "b"), ("x.jpg", "c")]) is None
    assert case_clash([]) is None


def test_record_differences_compare_files_by_their_bytes_and_name_nested_keys():
    from samflow.outputs import record_differences

    ckpt = {"path": "/runs/a/last.ckpt", "sha256": "ab" * 32}
    moved = {"path": "/elsewhere/last.ckpt", "sha256": "ab" * 32}
    other = {"path": "/runs/a/last.ckpt", "sha256": "cd" * 32}
    earlier = {"checkpoint": ckpt, "threshold": 0.5, "data": {"img_size": 1024, "seed": 0}}
    assert record_differences(earlier, {**earlier, "checkpoint": moved}) == []  # the same bytes elsewhere
    assert record_differences(earlier, {**earlier, "checkpoint": other}) == [
        f"checkpoint: /runs/a/last.ckpt (SHA-256 {'ab' * 6}) -> /runs/a/last.ckpt (SHA-256 {'cd' * 6})"
    ]
    assert record_differences(earlier, {**earlier, "checkpoint": None}) == [
        f"checkpoint: /runs/a/last.ckpt (SHA-256 {'ab' * 6}) -> none"
    ]
    changed = {**earlier, "threshold": 0.6, "data": {"img_size": 512, "seed": 0}, "new": True}
    assert record_differences(earlier, changed) == [
        "data.img_size: 1024 -> 512",
        "new: null -> true",
        "threshold: 0.5 -> 0.6",
    ]
