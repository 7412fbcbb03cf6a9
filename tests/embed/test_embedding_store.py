"""The persistent embedding store: written and read equals the live encoder, resumes identically,
is invalidated by a changed image or checkpoint, and refuses the runs it would get wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samflow.data import SegmentationDataModule
from samflow.data.quickstart import make_quickstart_data
from samflow.embed import EmbeddingStoreError, open_for_run
from samflow.embed.store import DONE, MANIFEST, read_manifest
from samflow.embed.writer import write_store
from samflow.module import SamflowModule, SamSpec
from samflow.plugins.registry import create_plugin

FP16 = {"atol": 2e-3, "rtol": 2e-3}  # fp16 keeps ~3 significant digits


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    # 5 train + 3 val images of 96..160 px (padding differs per image); one val image copies a train image
    root = make_quickstart_data(tmp_path_factory.mktemp("embed_data"), n_train=5, n_val=3, seed=3)
    for sub in ("images", "masks"):
        (root / f"val/{sub}/val_0002.png").write_bytes((root / f"train/{sub}/train_0000.png").read_bytes())
    return root


def _module(store: Path | None = None, seed: int = 0, plugins=("hq_sam",), **spec) -> SamflowModule:
    torch.manual_seed(0)
    return SamflowModule(
        sam=SamSpec(variant="tiny", seed=seed, embedding_store=str(store) if store else None, **spec),
        plugins={name: create_plugin(name) for name in plugins},
    )


def _data(root: Path, **kwargs) -> SegmentationDataModule:
    dm = SegmentationDataModule(
        train=str(root / "train"), val=str(root / "val"), img_size=128, batch_size=4, **kwargs
    )
    dm.setup("fit")
    return dm


def _write(root: Path, data_root: Path, **kwargs) -> tuple:
    return write_store(root, _module(), _data(data_root), batch_size=2, shard_size=3, **kwargs)


@pytest.fixture(scope="module")
def written(tmp_path_factory, data_root) -> Path:
    root = tmp_path_factory.mktemp("store") / "store"
    manifest, count = _write(root, data_root)
    assert (manifest.rows, count) == (7, 7)  # 8 files, 7 distinct contents
    return root


def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted(root.glob("*.npy"))}


def test_layout_fp16_shards_and_memory_maps(written):
    manifest = read_manifest(written)
    assert manifest.key.blocks == (1,)  # the tiny SAM's early block that HQ-SAM declares
    names = sorted(p.name for p in written.glob("*.npy"))
    assert names == [
        "block01-00000.npy", "block01-00001.npy", "block01-00002.npy", DONE,
        "embedding-00000.npy", "embedding-00001.npy", "embedding-00002.npy",
    ]  # fmt: skip
    emb = np.load(written / "embedding-00002.npy", mmap_mode="r")
    assert isinstance(emb, np.memmap) and emb.dtype == np.float16 and emb.shape == (1, 64, 8, 8)
    assert np.load(written / "block01-00000.npy").shape == (3, 8, 8, 64)
    assert np.load(written / DONE).tolist() == [1] * 7


def test_read_equals_the_live_encoder_and_the_same_loss(written, data_root):
    dm = _data(data_root)
    live, stored = _module(), _module(written)
    stored.load_state_dict(live.state_dict())
    stored.model.embedding_store = open_for_run(stored, dm, "fit")
    for loader in (dm.val_dataloader(), dm.train_dataloader()):
        torch.manual_seed(1)
        batch = next(iter(loader))
        ctx_live, ctx_store = live.model.context(batch), stored.model.context(batch)
        with torch.no_grad():
            a = live.model.encode(ctx_live)
            b = stored.model.encode(ctx_store)
            assert b.embeddings.dtype == torch.float32
            torch.testing.assert_close(b.embeddings, a.embeddings, **FP16)
            torch.testing.assert_close(b.features[1], a.features[1], **FP16)
            assert torch.equal(b.normalized, a.normalized)  # computed on demand from the store
        losses = []
        for module in (live, stored):
            module.train()
            out, ctx = module(batch)
            losses.append(module.compute_losses(out, batch, ctx)["total"])
        torch.testing.assert_close(losses[1], losses[0], **FP16)
        assert losses[1].requires_grad


def test_fit_reads_the_store_and_never_runs_the_encoder(written, data_root, monkeypatch):
    from lightning.pytorch import Trainer

    module = _module(written)
    calls, normalized = [], []
    monkeypatch.setattr(module.model, "run_encoder", lambda *a: calls.append(1) or None)
    monkeypatch.setattr(module.model, "preprocess", lambda *a: normalized.append(1) or None)
    trainer = Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=_data(data_root))
    assert trainer.global_step == 2 and not calls
    assert not normalized  # HQ-SAM never reads the normalised images: they are not computed
    assert module.model.embedding_store is not None


def test_resume_after_interruption_writes_identical_files(written, data_root, tmp_path):
    root = tmp_path / "resumed"
    _, first = _write(root, data_root, stop_after=2)  # interrupted after two chunks of two images
    assert first == 4
    with pytest.raises(EmbeddingStoreError, match=r"incomplete \(4 of 7 images\).*samflow embed"):
        open_for_run(_module(root), _data(data_root), "fit")
    _, rest = _write(root, data_root)
    assert rest == 3
    ours, reference = _arrays(root), _arrays(written)
    assert ours.keys() == reference.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)
    assert _write(root, data_root)[1] == 0  # complete: nothing to do


def test_ranks_split_the_rows(written, data_root, tmp_path):
    root = tmp_path / "ranks"
    counts = [_write(root, data_root, rank=r, world=2)[1] for r in (0, 1)]
    assert counts == [4, 3]
    ours, reference = _arrays(root), _arrays(written)
    for name in ours:
        np.testing.assert_allclose(ours[name].astype(np.float32), reference[name].astype(np.float32), **FP16)


def test_changed_image_and_changed_checkpoint_invalidate(written, data_root, tmp_path):
    changed = tmp_path / "data"
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (changed / split / sub).mkdir(parents=True)
            for f in (data_root / split / sub).iterdir():
                (changed / split / sub / f.name).write_bytes(f.read_bytes())
    image = changed / "train/images/train_0003.png"
    pixels = np.array(Image.open(image))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    with pytest.raises(EmbeddingStoreError, match=r"1 image\(s\) .* not in the store .*train_0003.png"):
        open_for_run(_module(written), _data(changed), "fit")
    with pytest.raises(EmbeddingStoreError, match=r"image encoder weights \(checkpoint\)"):
        open_for_run(_module(written, seed=1), _data(data_root), "fit")
    with pytest.raises(EmbeddingStoreError, match=r"holds a store for other inputs.*--overwrite"):
        write_store(written, _module(seed=1), _data(data_root))


@pytest.mark.parametrize(
    ("data_kwargs", "match"),
    [
        ({"augment": {"hflip": 0.5}}, r"data.augment changes the training images"),
        ({"resize_mode": "stretch"}, r"resize_mode: longest in the store, stretch in this run"),
        ({"image_resize": "bilinear"}, r"image_resize: sam in the store, bilinear in this run"),
    ],
)
def test_refused_when_the_data_would_change_the_image(written, data_root, data_kwargs, match):
    with pytest.raises(EmbeddingStoreError, match=match):
        open_for_run(_module(written), _data(data_root, **data_kwargs), "fit")


def test_refused_for_encoder_plugins_other_blocks_and_the_cache(written, data_root):
    with pytest.raises(ValueError, match=r"embedding_store is set, but .*adapter"):
        _module(written, plugins=("sam_adapter",))
    with pytest.raises(ValueError, match=r"encoder_cache and model.sam.embedding_store"):
        _module(written, encoder_cache=4)
    other = _module(written, plugins=("decoder_tuning",))  # no early block: the store's extra one is fine
    assert open_for_run(other, _data(data_root), "fit") is not None
    with pytest.raises(EmbeddingStoreError, match=r"is not an embedding store \(no manifest.json\)"):
        open_for_run(_module(written.parent), _data(data_root), "fit")


def test_refused_for_a_plugin_that_needs_a_block_the_store_lacks(tmp_path, data_root):
    """A store written for decoder tuning (the embedding alone) cannot serve HQ-SAM (its early block)."""
    root = tmp_path / "no_blocks"
    write_store(root, _module(plugins=("decoder_tuning",)), _data(data_root), batch_size=4, shard_size=8)
    assert read_manifest(root).key.blocks == ()
    assert open_for_run(_module(root, plugins=("decoder_tuning",)), _data(data_root), "fit") is not None
    with pytest.raises(EmbeddingStoreError, match=r"encoder blocks: \[\] in the store, \[\d+\] wanted"):
        open_for_run(_module(root), _data(data_root), "fit")


def test_embed_command_writes_a_store_and_refuses_without_out(tmp_path, data_root, capsys):
    from samflow.cli import main

    experiment = tmp_path / "exp.yaml"
    experiment.write_text(
        "model:\n  sam: {variant: tiny}\n  plugins: {hq: {class_path: HQSam}}\n"
        "data:\n  class_path: samflow.data.SegmentationDataModule\n"
        f"  init_args: {{train: {data_root / 'train'}, val: {data_root / 'val'}, img_size: 128}}\n"
        "trainer: {accelerator: cpu, devices: 1}\n"
    )
    assert main(["embed", "--experiment", str(experiment)]) == 1
    assert "samflow: error: samflow embed: where to? Pass --out" in capsys.readouterr().err
    out = tmp_path / "store"
    assert main(["embed", "--experiment", str(experiment), "--out", str(out), "--batch-size", "3"]) == 0
    assert (out / MANIFEST).is_file() and read_manifest(out).rows == 7
    assert np.load(out / DONE).all()


def _train_only_experiment(tmp_path: Path, data_root: Path) -> Path:
    """An experiment file: the tiny SAM on the train folder of ``data_root`` at 128 px."""
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(
        "model:\n  sam: {variant: tiny}\n"
        "data:\n  class_path: samflow.data.SegmentationDataModule\n"
        f"  init_args: {{train: {data_root / 'train'}, img_size: 128}}\n"
        "trainer: {accelerator: cpu, devices: 1}\n"
    )
    return experiment


@pytest.mark.parametrize(
    ("flag", "value"), [("--batch-size", "-2"), ("--batch-size", "0"), ("--shard-size", "0")]
)
def test_embed_command_refuses_sizes_below_one(tmp_path, data_root, capsys, flag, value):
    from samflow.cli import main

    experiment = _train_only_experiment(tmp_path, data_root)
    out = tmp_path / "store"
    assert main(["embed", "--experiment", str(experiment), "--out", str(out), flag, value]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"samflow embed: argument {flag}: must be an integer >= 1, got {value}" in err
    assert not out.exists()


def test_embed_command_exits_1_on_an_incomplete_store(tmp_path, data_root, capsys, monkeypatch):
    import functools

    import samflow.embed.command as command
    from samflow.cli import main

    experiment = _train_only_experiment(tmp_path, data_root)
    out = tmp_path / "store"
    args = ["embed", "--experiment", str(experiment), "--out", str(out), "--batch-size", "2"]
    # interrupted after its first chunk of 2 of the 5 train images
    monkeypatch.setattr(command, "write_store", functools.partial(write_store, stop_after=1))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "is incomplete: 2 of 5 images written (2 encoded now by rank 0); run the same command again" in err
    monkeypatch.undo()
    assert main(args) == 0
    assert np.load(out / DONE).all()


def test_refused_for_data_whose_images_are_not_whole_files(written, tmp_path):
    """Slide patches share their slide's path (and an LR view its HR view's): the store would hand them
    another image's embedding, so they are refused. (COCO images are whole files and are allowed:
    tests/proposals/test_proposals_store.py.)"""
    from samflow.data.wsi.datamodule import SlideDataModule

    with pytest.raises(EmbeddingStoreError, match="this experiment's data is SlideDataModule"):
        open_for_run(_module(written), SlideDataModule(train=[]), "fit")


def test_a_two_resolution_batch_never_reads_the_store(written, data_root):
    """A batch with context views (WSI-SAM's LR view of the same file) is refused at the encoder."""
    from samflow.sam.cache import EncoderCacheError
    from samflow.testing import random_batch

    module = _module(written, plugins=("decoder_tuning",))
    module.model.embedding_store = open_for_run(module, _data(data_root), "fit")
    batch = random_batch(1, 128, prompt="box", seed=0)
    batch = batch.replace(path=["a.png"], context_image=batch.image.clone(), context_affine=None)
    with pytest.raises(EncoderCacheError, match="context views"):
        module.model(batch)


def test_an_output_beyond_float16_is_refused_naming_the_image(data_root, tmp_path):
    """fp16 holds |x| up to 65504: a larger encoder output would be stored as inf and poison training."""
    module = _module()
    with torch.no_grad():
        module.model.sam.image_encoder.neck[-1].weight.mul_(1e6)  # the embedding's last LayerNorm
    with pytest.raises(EmbeddingStoreError, match=r"train_0000.png.*float16.*65504"):
        write_store(tmp_path / "big", module, _data(data_root), batch_size=2)
    assert read_manifest(tmp_path / "big").rows == 7
    assert not np.load(tmp_path / "big" / DONE).any()  # nothing is marked written
