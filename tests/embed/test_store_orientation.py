"""An image with an EXIF orientation is read upright (samflow.data.reading), so its store row is the upright
image's embedding, and a store written when such files were read as stored has no row for them.

The row key is the SHA-256 of the file's bytes; for an oriented file the orientation is hashed too. A
store written by an earlier samflow (rows keyed by the bytes alone, holding the stored layout's
embedding) therefore reports the file as missing instead of serving the embedding of a turned image.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from samflow.data import SegmentationDataModule
from samflow.data.quickstart import make_quickstart_data
from samflow.embed.check import store_key_of
from samflow.embed.store import MANIFEST, ContentHasher, EmbeddingStore, read_manifest
from samflow.embed.writer import write_store
from samflow.module import SamflowModule, SamSpec


def _turned_copy(train: Path, name: str) -> Path:
    """A copy of the training pair ``name`` whose image is stored turned 180 degrees and tagged with EXIF
    orientation 3, so that it is shown (and read) as the original."""
    source = train / "images" / name
    exif = Image.Exif()
    exif[0x0112] = 3
    target = train / "images" / f"turned_{name}"
    with Image.open(source) as img:
        img.rotate(180).save(target, exif=exif)
    shutil.copy(train / "masks" / name, train / "masks" / f"turned_{name}")
    return target


def _row(store: Path, path: Path) -> np.ndarray:
    manifest = read_manifest(store)
    row = manifest.hashes.index(ContentHasher()(path))
    shard = np.load(store / "embedding-00000.npy", mmap_mode="r")
    return np.asarray(shard[row], dtype=np.float32)


def test_an_oriented_file_has_its_own_row_with_the_upright_images_embedding(tmp_path):
    root = make_quickstart_data(tmp_path / "data", n_train=2, n_val=0, seed=5)
    train = root / "train"
    original = sorted((train / "images").iterdir())[0]
    turned = _turned_copy(train, original.name)
    stored_bytes = hashlib.sha256(turned.read_bytes()).hexdigest()
    assert ContentHasher()(turned) != stored_bytes  # the orientation is part of the key
    assert ContentHasher()(original) == hashlib.sha256(original.read_bytes()).hexdigest()

    torch.manual_seed(0)
    model = SamflowModule(sam=SamSpec(variant="tiny", seed=0))
    dm = SegmentationDataModule(train=str(train), img_size=128, batch_size=2)
    dm.setup("fit")
    store = tmp_path / "store"
    write_store(store, model, dm, batch_size=2)
    assert (store / "embedding-00000.npy").is_file()
    upright, plain = _row(store, turned), _row(store, original)
    np.testing.assert_allclose(upright, plain, atol=2e-3, rtol=0)  # the same pixels reached the encoder
    other = _row(store, sorted((train / "images").iterdir())[1])
    assert np.abs(other - plain).max() > 0.05  # (the rows are images' own, not all alike)

    # A store written before files were read upright: the turned file's row keyed by its bytes alone.
    data = json.loads((store / MANIFEST).read_text())
    data["hashes"] = [stored_bytes if h == ContentHasher()(turned) else h for h in data["hashes"]]
    (store / MANIFEST).write_text(json.dumps(data))
    old = EmbeddingStore(store, store_key_of(model, dm))
    assert old.missing([original, turned]) == [str(turned)]
