"""README: proposals read from an fp16 embedding store moved no box against the float32 encoder's on the
tiny SAM (``test_proposals_store.py`` measures the scores and masks but does not assert the boxes)."""

from __future__ import annotations

from test_proposals_store import _annotations, _data, _embed, _module

from samflow.proposals import write_proposals


def test_no_box_changed_against_the_fp32_encoder(tmp_path):
    from tiny_coco import make_tiny_coco

    coco, _ = make_tiny_coco(tmp_path / "coco")
    module, dm = _module(), _data(coco)
    sam, dataset = module.model.sam, dm.dataset("train", proposals=False)
    root = _embed(tmp_path / "emb", module, dm)
    options = {"batch_size": 2, "shard_size": 2}
    live = _annotations(write_proposals(tmp_path / "live", sam, dataset, **options))
    stored = _annotations(write_proposals(tmp_path / "stored", sam, dataset, embedding_store=root, **options))
    assert len(stored) == len(live) == 18
    assert [a["bbox"] for a in stored] == [a["bbox"] for a in live]
