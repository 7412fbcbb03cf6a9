"""`samflow proposals` from an embedding store (`samflow embed` of a COCO experiment): the proposals equal
those of a live run whose embeddings are rounded to fp16 (the store's precision), the image encoder
never runs, and a store for other weights, another input frame or without every image is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_api

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coco"))
from helpers import randomize
from tiny_coco import make_tiny_coco

from samflow.data.coco import CocoDataModule
from samflow.data.coco_batch import collate_coco
from samflow.embed import EmbeddingStoreError, open_for_run
from samflow.embed.store import read_manifest
from samflow.embed.writer import write_store
from samflow.module import SamflowModule, SamSpec
from samflow.proposals import FROM_STORE, ProposalStoreError, write_proposals
from samflow.sam import HookedSam


@pytest.fixture
def coco(tmp_path) -> Path:
    path, _ = make_tiny_coco(tmp_path / "coco")
    return path


def _module(seed: int = 0, store: Path | None = None) -> SamflowModule:
    module = SamflowModule(
        sam=SamSpec(variant="tiny", seed=seed, embedding_store=str(store) if store else None)
    )
    randomize(module.model.sam, seed=seed)  # non-zero position tables, so the comparisons bite
    return module


def _data(coco: Path, **options) -> CocoDataModule:
    options = {"img_size": 128, "points_per_instance": 2, "seed": 3, **options}
    dm = CocoDataModule(train={"annotations": str(coco)}, **options)
    dm.setup("fit")
    return dm


def _embed(root: Path, module: SamflowModule, dm: CocoDataModule) -> Path:
    write_store(root, module, dm, batch_size=2, shard_size=2)
    return root


def _annotations(final: Path | None) -> list[dict]:
    assert final is not None
    return json.loads(final.read_text())["annotations"]


def _mask(rle: dict) -> np.ndarray:
    return mask_api.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_coco_store_rows_are_the_encoder_on_the_coco_input_frame(coco, tmp_path):
    """One row per COCO image file (the empty image 4 is skipped by the data), each the fp16 value of
    the encoder on the image exactly as CocoInstances frames it; the run's open_for_run accepts it."""
    module, dm = _module(), _data(coco)
    root = _embed(tmp_path / "emb", module, dm)
    manifest = read_manifest(root)
    dataset = dm.datasets["train"]
    assert manifest.rows == len(dataset) == 3
    assert (manifest.key.img_size, manifest.key.resize_mode, manifest.key.image_resize) == (
        128,
        "longest",
        "sam",
    )
    assert manifest.paths == [str(coco.parent / f"images/im{i}.png") for i in (1, 2, 3)]
    live = HookedSam(module.model.sam).eval()
    stored = _module(store=root)
    stored.model.embedding_store = open_for_run(stored, dm, "fit")
    for chunk in ([0, 1], [2]):  # the writer's batches of 2: another batching moves fp32 values by ULPs
        batch = collate_coco([dataset[i] for i in chunk])
        with torch.no_grad():
            want = live.encode(live.context(batch)).embeddings
            got = stored.model.encode(stored.model.context(batch)).embeddings
        assert got.dtype == torch.float32 and torch.equal(got, want.half().float())


def test_proposals_from_the_store_equal_the_live_run_on_fp16_embeddings(coco, tmp_path, monkeypatch):
    module, dm = _module(), _data(coco)
    sam, dataset = module.model.sam, dm.dataset("train", proposals=False)
    root = _embed(tmp_path / "emb", module, dm)
    options = {"batch_size": 2, "shard_size": 2}
    live32 = _annotations(write_proposals(tmp_path / "live32", sam, dataset, **options))

    run_encoder = HookedSam.run_encoder

    def rounded(self, x, ctx):  # the live encoder, its outputs rounded to the store's fp16
        embeddings, features = run_encoder(self, x, ctx)
        return embeddings.half().float(), {i: f.half().float() for i, f in features.items()}

    monkeypatch.setattr(HookedSam, "run_encoder", rounded)
    live16 = _annotations(write_proposals(tmp_path / "live16", sam, dataset, **options))

    calls: list[str] = []
    monkeypatch.setattr(HookedSam, "run_encoder", lambda *a: calls.append("run_encoder"))
    hooks = [
        sam.image_encoder.register_forward_pre_hook(lambda *a: calls.append("image_encoder")),
        sam.image_encoder.patch_embed.register_forward_pre_hook(lambda *a: calls.append("patch_embed")),
    ]
    final = write_proposals(tmp_path / "stored", sam, dataset, embedding_store=root, **options)
    for hook in hooks:
        hook.remove()
    assert calls == []  # the image encoder never ran
    stored = _annotations(final)
    assert json.loads(final.read_text())["info"]["samflow_key"]["embeddings"] == FROM_STORE

    assert len(stored) == 9 * 2  # 9 instances x 2 points, 6 proposals each
    assert stored == live16  # masks (RLE), boxes and scores, exactly
    # against the fp32 encoder: the fp16 rounding moves the scores a little (measured, not assumed zero)
    scores32 = np.array([a["scores"] for a in live32])
    scores16 = np.array([a["scores"] for a in stored])
    score_diff = float(np.abs(scores16 - scores32).max())
    flipped = sum(int((_mask(r16) != _mask(r32)).sum()) for a, b in zip(stored, live32) for r16, r32 in zip(a["segmentation"], b["segmentation"]))  # fmt: skip
    pixels = sum(int(np.prod(r["size"])) for a in live32 for r in a["segmentation"])
    boxes = sum(a["bbox"] != b["bbox"] for a, b in zip(stored, live32))
    print(f"fp16 store vs fp32 live: max score diff {score_diff:.2e}, mask pixels differing {flipped}/{pixels}, "
          f"points with a different box {boxes}/{len(stored)}")  # fmt: skip
    assert 0 < score_diff < 1e-4  # tiny SAM: 3e-6
    assert flipped <= 1e-3 * pixels


def test_refused_for_other_weights_frame_or_a_missing_image(coco, tmp_path):
    module, dm = _module(), _data(coco)
    sam, dataset = module.model.sam, dm.dataset("train", proposals=False)
    other_weights = _embed(tmp_path / "seed1", _module(seed=1), _data(coco))
    bilinear = _embed(tmp_path / "bilinear", module, _data(coco, image_resize="bilinear"))
    cases = [
        (other_weights, r"image encoder weights \(checkpoint\): \w+ in the store, \w+ in this run"),
        (bilinear, "image_resize: bilinear in the store, sam in this run"),
    ]
    for root, match in cases:
        with pytest.raises(
            EmbeddingStoreError, match=f"Embedding store {root} does not match .*{match}.*samflow embed"
        ):
            write_proposals(tmp_path / "out", sam, dataset, embedding_store=root)  # fmt: skip
    # an image changed after the store was written (same size, other pixels): its row is missing
    root = _embed(tmp_path / "emb", module, dm)
    image = coco.parent / "images" / "im2.png"
    pixels = np.asarray(Image.open(image))
    Image.fromarray(255 - pixels).save(image)
    with pytest.raises(EmbeddingStoreError) as err:
        write_proposals(tmp_path / "out", sam, dataset, embedding_store=root)
    message = str(err.value)
    assert "\n" not in message
    assert f"embedding store {root} lacks 1 image(s)" in message and f"e.g. {image};" in message
    assert f"run `samflow embed --experiment NAME --out {root}`" in message
    assert not (tmp_path / "out").exists()  # refused before anything is written
    # the same store, read by a training run of this data: refused at the start as well
    with pytest.raises(
        EmbeddingStoreError, match=f"1 image\\(s\\) of the data are not in the store .*{image}"
    ):
        open_for_run(_module(store=root), dm, "fit")


def test_a_live_store_and_a_store_made_from_embeddings_never_mix(coco, tmp_path):
    """Resuming a proposal store with the other kind of embeddings is refused (the key's ``embeddings``)."""
    module, dm = _module(), _data(coco)
    sam, dataset = module.model.sam, dm.dataset("train", proposals=False)
    root = _embed(tmp_path / "emb", module, dm)
    live, stored = tmp_path / "live", tmp_path / "stored"
    assert write_proposals(live, sam, dataset, shard_size=1, max_shards=1) is None
    assert write_proposals(stored, sam, dataset, shard_size=1, max_shards=1, embedding_store=root) is None
    with pytest.raises(ProposalStoreError, match=r"differs in: embeddings\)"):
        write_proposals(live, sam, dataset, shard_size=1, embedding_store=root)
    with pytest.raises(ProposalStoreError, match=r"differs in: embeddings\)"):
        write_proposals(stored, sam, dataset, shard_size=1)


def _experiment(tmp_path: Path, coco: Path) -> Path:
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "model:\n  sam:\n    variant: tiny\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n  init_args:\n    img_size: 128\n"
        f"    train: {{annotations: {coco}}}\n"
        f"    proposals: {tmp_path / 'not_made_yet'}\n"  # what sapnet_coco has before `samflow proposals`
        "trainer:\n  accelerator: cpu\n  devices: 1\n"
    )
    return exp


def test_cli_embed_then_proposals_from_the_store(coco, tmp_path, monkeypatch, capsys):
    from samflow.cli import main

    exp = _experiment(tmp_path, coco)
    emb = tmp_path / "emb"
    assert main(["embed", "--experiment", str(exp), "--out", str(emb)]) == 0
    assert read_manifest(emb).rows == 3
    monkeypatch.setattr(HookedSam, "run_encoder", lambda *a: pytest.fail("the image encoder ran"))
    by_flag, by_config = tmp_path / "p1", tmp_path / "p2"
    args = ["proposals", "--experiment", str(exp), "--shard-size", "2"]
    assert main([*args, "--out", str(by_flag), "--embedding-store", str(emb)]) == 0
    assert main([*args, "--out", str(by_config), "--model.sam.embedding_store", str(emb)]) == 0
    first = json.loads((by_flag / "proposals.json").read_text())
    assert first == json.loads((by_config / "proposals.json").read_text())
    assert first["info"]["samflow_key"]["embeddings"] == FROM_STORE and len(first["annotations"]) == 9
    capsys.readouterr()
    # another resize rule than the store's: one line naming the store and the command, exit 1
    other = [*args, "--out", str(tmp_path / "p3"), "--embedding-store", str(emb), "--data.init_args.image_resize", "bilinear"]  # fmt: skip
    assert main(other) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"Embedding store {emb} does not match" in err[0]
    assert "image_resize: sam in the store, bilinear in this run" in err[0] and "samflow embed" in err[0]
