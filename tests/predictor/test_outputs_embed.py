"""``samflow embed``'s store folder: ``--overwrite`` replaces a store and nothing else, and a folder
that is a file or holds the data is refused in one line.

| case                                                        | result                                   |
|---|---|
| ``--out`` a data folder, then ``--overwrite`` (was: the whole folder deleted) | refused, the data kept |
| ``--overwrite`` of a store for other inputs, other files beside it | the store replaced, the others kept |
| ``--out`` an existing file                                  | one line (was: NotADirectoryError)       |
| a store stopped before its manifest was written             | says ``--overwrite`` starts it again     |
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from samflow.data import SegmentationDataModule
from samflow.data.quickstart import make_quickstart_data
from samflow.embed import EmbeddingStoreError
from samflow.embed.store import MANIFEST
from samflow.embed.writer import write_store
from samflow.module import SamflowModule, SamSpec


def _module(seed: int = 0) -> SamflowModule:
    torch.manual_seed(0)
    return SamflowModule(sam=SamSpec(variant="tiny", seed=seed), plugins={})


def _data(root: Path) -> SegmentationDataModule:
    data = SegmentationDataModule(
        train=str(root / "train"), val=str(root / "val"), img_size=128, batch_size=2
    )
    data.setup("fit")
    return data


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_quickstart_data(tmp_path_factory.mktemp("data"), n_train=2, n_val=1, seed=3)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("inside", [".", "train"])
def test_a_store_in_a_data_folder_is_refused_even_with_overwrite(data_root, inside):
    """Once written into the data folder, a second ``--overwrite`` (another SAM) deleted the dataset."""
    before = _files(data_root)
    for seed in (0, 1):
        with pytest.raises(EmbeddingStoreError, match=r"holds the image .* choose a folder outside"):
            write_store(data_root / inside, _module(seed), _data(data_root), overwrite=True)
    assert _files(data_root) == before


def test_overwrite_replaces_the_store_files_only(data_root, tmp_path):
    store = tmp_path / "store"
    write_store(store, _module(0), _data(data_root), shard_size=1)  # 3 shards of one image
    (store / "notes.txt").write_text("mine")
    shards = {p.name for p in store.glob("embedding-*.npy")}
    assert len(shards) == 3
    write_store(store, _module(1), _data(data_root), shard_size=2, overwrite=True)  # 2 shards now
    assert (store / "notes.txt").read_text() == "mine"
    assert {p.name for p in store.glob("embedding-*.npy")} == {"embedding-00000.npy", "embedding-00001.npy"}


def test_an_out_that_is_a_file_is_refused(data_root, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(EmbeddingStoreError, match=r"is a file, not a folder"):
        write_store(taken, _module(), _data(data_root))
    assert taken.read_text() == "a file"


def test_a_store_stopped_before_its_manifest_says_to_overwrite(data_root, tmp_path):
    store = tmp_path / "store"
    write_store(store, _module(), _data(data_root))
    (store / MANIFEST).unlink()  # as if killed while the files were created
    with pytest.raises(EmbeddingStoreError, match=r"unfinished store .* pass --overwrite"):
        write_store(store, _module(), _data(data_root))
    manifest, written = write_store(store, _module(), _data(data_root), overwrite=True)
    assert written == manifest.rows == 3
