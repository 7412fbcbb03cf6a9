"""``check_set_files`` and ``SkippedFiles``: the file check of one set and the record of what
``on_bad_sample: skip`` left out, used by ``SegmentationDataModule`` through their public arguments
(no module of ``samflow.data`` reads another object's private attributes)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import samflow.data
from samflow.data import DataError, MaskFolderDataset
from samflow.data.bad_files import SkippedFiles, check_set_files


def test_a_set_is_checked_and_skip_leaves_its_bad_samples_out(pair_root: Path) -> None:
    (pair_root / "images" / "b.png").write_bytes(b"")
    dataset = MaskFolderDataset(pair_root, img_size=16)
    bad = check_set_files(dataset, "data.val_sets.kvasir", "skip", rank=1)
    assert [(b.path.name, b.reason) for b in bad] == [("b.png", "empty file (0 bytes)")]
    assert [s.id for s in dataset.samples] == ["a", "c"]
    with pytest.raises(DataError, match=r"1 of 6 files cannot be used .*b.png \(empty file"):
        check_set_files(MaskFolderDataset(pair_root, img_size=16), "data.val_sets.kvasir", "error", rank=0)


def test_skipped_files_are_reported_once_per_set(pair_root: Path) -> None:
    (pair_root / "masks" / "c.png").write_bytes(b"not a png")
    dataset = MaskFolderDataset(pair_root, img_size=16)
    skipped = SkippedFiles()
    skipped.record("val", "data.val", 3, check_set_files(dataset, "data.val", "skip", rank=0))
    skipped.record("test", "data.test", 3, [])  # nothing left out: nothing recorded
    assert list(skipped) == ["val"] and [b.path.name for b in skipped["val"]] == ["c.png"]
    with pytest.warns(UserWarning, match=r"these 1 bad file\(s\):\n  data.val: .*masks/c.png"):
        skipped.report()
    skipped.report()  # reported already: no second warning (pytest's filter would turn one into an error)


def _private_reads(path: Path) -> list[str]:
    """``obj._name`` reads in ``path`` where ``obj`` is not ``self`` / ``cls`` (a private attribute of another)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls", "super")):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_data_module_reads_another_objects_private_attributes() -> None:
    root = Path(samflow.data.__file__).parent
    reads = [read for path in sorted(root.rglob("*.py")) for read in _private_reads(path)]
    assert not reads, reads
