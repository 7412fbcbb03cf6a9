"""README, "An embedding store for decoder-side training": "The store is valid for one SAM image encoder
(a checksum of its weights, so another checkpoint, seed or `img_size` does not match), one
`data.img_size`": a run at another `img_size` (SAM's and the data's, as a run must have them equal) is
refused in one error that names `img_size` (H4 audit; test_embedding_store.py covers another seed, the
resize rules and a changed image)."""

from __future__ import annotations

from pathlib import Path

import pytest

from samflow.data import SegmentationDataModule
from samflow.data.quickstart import make_quickstart_data
from samflow.embed import EmbeddingStoreError
from samflow.embed.check import open_for_run
from samflow.embed.writer import write_store
from samflow.module import SamflowModule, SamSpec
from samflow_plugins.decoder_tuning import DecoderTuning


def _module(img_size: int, store: Path | None = None) -> SamflowModule:
    spec = SamSpec(variant="tiny", img_size=img_size, embedding_store=str(store) if store else None)
    return SamflowModule(sam=spec, plugins={"decoder": DecoderTuning()})


def _data(root: Path, img_size: int) -> SegmentationDataModule:
    dm = SegmentationDataModule(train=str(root / "train"), img_size=img_size, batch_size=2)
    dm.setup("fit")
    return dm


def test_a_store_written_at_one_img_size_is_refused_at_another(tmp_path):
    root = make_quickstart_data(tmp_path / "data", n_train=2, n_val=1, seed=5)
    store = tmp_path / "store"
    write_store(store, _module(128), _data(root, 128), batch_size=2)
    assert open_for_run(_module(128, store), _data(root, 128), "fit") is not None  # the same size reads
    with pytest.raises(EmbeddingStoreError, match=r"img_size: 128 in the store, 64 in this run"):
        open_for_run(_module(64, store), _data(root, 64), "fit")
