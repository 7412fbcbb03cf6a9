"""README, "An embedding store for decoder-side training", claims the other embed tests leave open:

- `samflow embed` runs the encoder over every image of the experiment's datasets (train, val_sets,
  test_sets, predict), each distinct file once;
- ``--batch-size`` defaults to the data's eval batch size (COCO data's ``batch_size``, which its
  evaluation loaders take) and ``--shard-size`` to 256 images;
- an output that is not finite (not only one beyond 65504) stops `samflow embed`, naming the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from samflow.cli import main
from samflow.data import SegmentationDataModule
from samflow.data.quickstart import make_quickstart_data
from samflow.embed import EmbeddingStoreError, command
from samflow.embed.store import DONE, read_manifest
from samflow.embed.writer import write_store
from samflow.module import SamflowModule, SamSpec
from samflow.sam.build import VARIANTS


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("embed_claims")
    return (
        make_quickstart_data(base / "a", n_train=3, n_val=2, seed=1),
        make_quickstart_data(base / "b", n_train=2, n_val=2, seed=2),
    )


def experiment(tmp_path: Path, roots: tuple[Path, Path]) -> Path:
    a, b = roots
    path = tmp_path / "exp.yaml"
    path.write_text(
        "model:\n  sam: {variant: tiny}\n"
        "data:\n  class_path: samflow.data.SegmentationDataModule\n"
        f"  init_args: {{train: {a / 'train'}, val_sets: {{A: {a / 'val'}}}, test_sets: {{B: {b / 'train'}}},"
        f" predict: {b / 'val' / 'images'}, img_size: 128, eval_batch_size: 3}}\n"
        "trainer: {accelerator: cpu, devices: 1}\n"
    )
    return path


def test_embed_covers_train_val_test_and_predict_images(tmp_path, roots):
    a, b = roots
    out = tmp_path / "store"
    assert main(["embed", "--experiment", str(experiment(tmp_path, roots)), "--out", str(out)]) == 0
    manifest = read_manifest(out)
    folders = [a / "train" / "images", a / "val" / "images", b / "train" / "images", b / "val" / "images"]
    files = sorted(str(p) for folder in folders for p in folder.iterdir())
    assert len(files) == 9 and manifest.rows == 9
    assert sorted(map(str, manifest.paths)) == files
    assert np.load(out / DONE).all()


def test_batch_and_shard_size_defaults(tmp_path, roots, monkeypatch):
    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_write_store(root, model, datamodule, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(command, "write_store", fake_write_store)
    with pytest.raises(Stop):
        command.main(["--experiment", str(experiment(tmp_path, roots)), "--out", str(tmp_path / "s")])
    assert (seen["batch_size"], seen["shard_size"]) == (3, 256)  # the data's eval_batch_size: 3


def test_coco_data_is_encoded_in_its_evaluation_batches(tmp_path):
    """COCO data has no ``eval_batch_size``: its evaluation loaders take ``batch_size`` (was 1 here)."""
    from samflow.data.coco import CocoDataModule

    coco = CocoDataModule(val={"annotations": str(tmp_path / "instances.json")}, img_size=128, batch_size=5)
    assert command.eval_batch_size(coco) == 5
    folders = SegmentationDataModule(train=str(tmp_path), img_size=128, batch_size=4, eval_batch_size=3)
    assert command.eval_batch_size(folders) == 3
    assert (
        command.eval_batch_size(SegmentationDataModule(train=str(tmp_path), img_size=128, batch_size=4)) == 4
    )


def test_a_non_finite_output_is_refused_naming_the_image(tmp_path, roots):
    torch.manual_seed(0)
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={})
    with torch.no_grad():
        module.model.sam.image_encoder.neck[-1].weight[0] = float("nan")  # one channel of the embedding
    dm = SegmentationDataModule(train=str(roots[0] / "train"), img_size=128)
    dm.setup("fit")
    with pytest.raises(EmbeddingStoreError, match=r"train_0000.png is not finite in float16"):
        write_store(tmp_path / "nan", module, dm, batch_size=1)
    assert not np.load(tmp_path / "nan" / DONE).any()  # nothing is marked written


def test_disk_per_image_follows_the_store_layout_at_1024_px():
    """README: the embedding is 256 x 64 x 64 float16 values, 2 MiB at 1024 px; HQ-SAM's early block is
    64 x 64 x C_vit: 6 MiB (vit_b), 8 MiB (vit_l), 10 MiB (vit_h). The layout (embedding (C, g, g),
    block (g, g, C_vit), g = img_size / 16) is the one the tiny store shows in test_embedding_store."""
    mib = 2**20
    for name, block_mib in (("vit_b", 6), ("vit_l", 8), ("vit_h", 10)):
        spec = VARIANTS[name]
        grid = spec.img_size // spec.patch_size
        assert (spec.img_size, spec.prompt_dim, grid) == (1024, 256, 64), name
        assert spec.prompt_dim * grid * grid * 2 == 2 * mib, name
        assert grid * grid * spec.embed_dim * 2 == block_mib * mib, name
