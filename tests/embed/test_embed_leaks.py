"""The embedding store over many reads: each shard file it maps holds a file descriptor (mmap
duplicates it), so a reader keeps at most ``MAX_MAPPED`` maps, the most recently read, and nothing
grows with the number of reads or of shard files. Its writer (``samflow embed``) keeps only the shard files
of the chunk it writes mapped: a store of a large data set has thousands of shard files, and ``ulimit -n``
is often 1024.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

import samflow.embed.store as store_module
from samflow.data import SegmentationDataModule
from samflow.data.quickstart import make_quickstart_data
from samflow.embed.store import EmbeddingStore, read_manifest
from samflow.embed.writer import write_store
from samflow.module import SamflowModule, SamSpec
from samflow.plugins.registry import create_plugin

if not Path("/proc/self/fd").is_dir():
    pytest.skip("counting descriptors and maps needs /proc/self", allow_module_level=True)


def _descriptors_on(folder: Path) -> int:
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += str(fd.readlink()).startswith(str(folder))
        except OSError:
            pass
    return count


def _maps_of(folder: Path) -> set[str]:
    return {
        line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, list[Path]]:
    data = make_quickstart_data(tmp_path_factory.mktemp("data"), n_train=4, n_val=1, seed=1)
    torch.manual_seed(0)
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"hq": create_plugin("hq_sam")})
    dm = SegmentationDataModule(train=str(data / "train"), val=str(data / "val"), img_size=128, batch_size=2)
    dm.setup("fit")
    root = tmp_path_factory.mktemp("store") / "store"
    write_store(root, module, dm, batch_size=2, shard_size=2)
    return root, sorted((data / "train" / "images").glob("*.png")) + sorted(
        (data / "val" / "images").glob("*.png")
    )


@pytest.mark.parametrize("reads", [1, 40])
def test_reads_keep_a_bounded_number_of_shards_mapped(store, reads, monkeypatch):
    """Shards of 2 images, 5 images, 2 parts (embedding, one block): 6 shard files; at most 2 mapped.
    The values equal those of a reader that maps every file."""
    root, images = store
    key = read_manifest(root).key
    blocks = list(key.blocks)
    everything = EmbeddingStore(root, key)
    monkeypatch.setattr(store_module, "MAX_MAPPED", 2, raising=False)
    reader = EmbeddingStore(root, key)
    for i in range(reads):
        paths = [images[i % len(images)], images[(i + 3) % len(images)]]
        got = reader.encoded(paths, blocks, torch.device("cpu"), torch.float32)
        expected = everything.encoded(paths, blocks, torch.device("cpu"), torch.float32)
        assert torch.equal(got[0], expected[0])
        assert all(torch.equal(got[1][b], expected[1][b]) for b in blocks)
        assert len(reader._arrays) <= 2
    del everything
    gc.collect()
    assert _descriptors_on(root) <= 2
    assert len(_maps_of(root)) <= 2
    del reader
    gc.collect()
    assert _descriptors_on(root) == 0


def test_writing_a_store_keeps_a_bounded_number_of_shards_mapped(tmp_path):
    """6 images in shards of 1, 2 parts (embedding, HQ-SAM's block): 12 shard files, written one image
    a chunk. Open at any time: the ``done`` flags and the 2 shard files of the chunk, not every shard
    written so far (13 descriptors at the end before); none once written."""
    data = make_quickstart_data(tmp_path / "data", n_train=5, n_val=1, seed=1)
    torch.manual_seed(0)
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"hq": create_plugin("hq_sam")})
    dm = SegmentationDataModule(train=str(data / "train"), val=str(data / "val"), img_size=128, batch_size=2)
    dm.setup("fit")
    root = tmp_path / "store"
    open_after_chunk: list[int] = []
    manifest, written = write_store(
        root,
        module,
        dm,
        batch_size=1,
        shard_size=1,
        progress=lambda total: lambda done: open_after_chunk.append(_descriptors_on(root)),
    )
    assert (manifest.rows, written, manifest.shards) == (6, 6, 6)
    assert len(open_after_chunk) == 1 + 6  # the rows done before, then one call per chunk
    assert max(open_after_chunk) <= 1 + 2
    assert _descriptors_on(root) == 0
