"""Training from an embedding store decodes no training image unless a plugin reads the image.

The store replaces the encoder, so a training step needs each image's size, not its pixels: the
training items then carry a NaN placeholder and the files' headers are read instead of their pixels.
Checked here: the same weights as a run that decodes them, no training file decoded, evaluation
images still decoded, plugins that declare ``reads_image`` keep the pixels, and an undeclared reader
is stopped by an error that names the attribute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from samflow.data import SegmentationDataModule, collate, folder
from samflow.data.quickstart import make_quickstart_data
from samflow.embed.check import skip_training_pixels
from samflow.embed.writer import write_store
from samflow.module import SamflowModule, SamSpec
from samflow.plugins.base import SamPlugin
from samflow.plugins.registry import create_plugin
from samflow.sam.cache import EncoderCacheError


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_quickstart_data(tmp_path_factory.mktemp("pixels_data"), n_train=4, n_val=2, seed=5)


def _data(root: Path) -> SegmentationDataModule:
    dm = SegmentationDataModule(train=str(root / "train"), val=str(root / "val"), img_size=128, batch_size=2)
    dm.setup("fit")
    return dm


def _module(store: Path | None, extra: dict[str, SamPlugin] | None = None) -> SamflowModule:
    torch.manual_seed(0)
    plugins: dict[str, SamPlugin] = {"hq_sam": create_plugin("hq_sam"), **(extra or {})}
    return SamflowModule(
        sam=SamSpec(variant="tiny", seed=0, embedding_store=str(store) if store else None), plugins=plugins
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_root) -> Path:
    root = tmp_path_factory.mktemp("pixels_store") / "store"
    write_store(root, _module(None), _data(data_root), batch_size=2)
    return root


class Batches(Callback):
    """Whether each training batch carried pixels."""

    def __init__(self) -> None:
        self.pixels: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.pixels.append(batch.pixels)


def _fit(module: SamflowModule, data_root: Path, monkeypatch) -> tuple[list[bool], list[str]]:
    """One epoch with validation; returns each training batch's ``pixels`` and the decoded files."""
    decoded: list[str] = []
    read = folder.read_image_with_note
    monkeypatch.setattr(
        folder,
        "read_image_with_note",
        lambda path, *a, **k: decoded.append(Path(path).parent.parent.name) or read(path, *a, **k),
    )
    batches = Batches()
    seed_everything(0)
    trainer = Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[batches],
    )  # fmt: skip
    trainer.fit(module, datamodule=_data(data_root))
    monkeypatch.setattr(folder, "read_image_with_note", read)
    return batches.pixels, decoded


def test_training_decodes_no_image_and_trains_the_same_weights(store, data_root, monkeypatch):
    skipped = _module(store)
    pixels, decoded = _fit(skipped, data_root, monkeypatch)
    assert pixels == [False, False]
    assert decoded == ["val", "val"]  # the evaluation images only

    decoding = _module(store)
    monkeypatch.setattr("samflow.embed.check.skip_training_pixels", lambda *a: False)
    pixels, decoded = _fit(decoding, data_root, monkeypatch)
    assert pixels == [True, True] and sorted(decoded) == ["train"] * 4 + ["val"] * 2

    a, b = skipped.state_dict(), decoding.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    trained = [k for k, v in _module(store).state_dict().items() if not torch.equal(v, a[k])]
    assert trained  # the step changed the HQ-SAM weights, so equal weights say something


class ImageReader(SamPlugin):
    """Reads the image's pixels in a decoder-side hook (as PA-SAM does for its edges)."""

    reads_image = True

    def __init__(self) -> None:
        super().__init__()
        self.means: list[float] = []

    def prompts(self, prompts, ctx):
        self.means.append(float(ctx.image.mean()))
        return prompts


class UndeclaredImageReader(ImageReader):
    reads_image = False


def test_a_plugin_that_reads_the_image_keeps_the_training_pixels(store, data_root, monkeypatch):
    reader = ImageReader()
    pixels, decoded = _fit(_module(store, {"reader": reader}), data_root, monkeypatch)
    assert pixels == [True, True] and decoded.count("train") == 4
    assert len(reader.means) == 3 and all(0 < m < 1 for m in reader.means)  # 2 steps + 1 validation batch


def test_an_undeclared_reader_is_stopped_by_name(store, data_root, monkeypatch):
    with pytest.raises(EncoderCacheError, match=r"were not decoded.*Set `reads_image = True`"):
        _fit(_module(store, {"reader": UndeclaredImageReader()}), data_root, monkeypatch)


class RawImageLoss(SamPlugin):
    """Reads ``batch.image`` itself (not through ``ctx.image``) in a loss, undeclared."""

    def losses(self, out, batch, ctx):
        return {"brightness": batch.image.mean() * out.pred.sigmoid().mean()}


def test_a_raw_read_of_the_placeholder_stops_the_run_naming_reads_image(store, data_root):
    from samflow.callbacks.finite import NonFiniteCheck, NonFiniteError

    trainer = Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[NonFiniteCheck()],
    )  # fmt: skip
    with pytest.raises(
        NonFiniteError,
        match=r"not decoded .* hold NaN: a plugin that reads batch.image must declare `reads_image = True`",
    ):
        trainer.fit(_module(store, {"raw": RawImageLoss()}), datamodule=_data(data_root))


def test_pa_sam_declares_that_it_reads_the_image():
    assert create_plugin("pa_sam").reads_image and not create_plugin("hq_sam").reads_image


def test_an_item_without_pixels_equals_the_decoded_item_but_for_the_image(data_root):
    dm = _data(data_root)
    dataset = dm.datasets["train"]
    dataset.prompt_seed = 7  # the same prompt both times
    full = dataset[1]
    dataset.pixels = False
    bare = dataset[1]
    assert bare.pop("pixels") is False and "pixels" not in full
    assert bare.keys() == full.keys()
    for key, value in full.items():
        if key == "image":
            assert bare[key].shape == value.shape and bare[key].dtype == value.dtype
            assert bare[key].isnan().all() and bare[key].stride() == (0, 0, 0)  # nothing stored per pixel
        elif isinstance(value, torch.Tensor):
            assert torch.equal(bare[key], value), key
        else:
            assert bare[key] == value, key

    batch = collate([dataset[0], dataset[1]])
    assert not batch.pixels and batch.image.shape == (2, 3, 128, 128) and batch.image.isnan().all()
    dataset.pixels = True
    with pytest.raises(ValueError, match="some items carry their image's pixels and others not"):
        collate([dataset[0], bare | {"pixels": False}])


def test_only_training_datasets_are_switched(data_root):
    dm = _data(data_root)
    assert skip_training_pixels(dm, []) is True
    assert not dm.datasets["train"].pixels and dm.datasets["val"].pixels
    assert skip_training_pixels(dm, ["reader"]) is False
    assert dm.datasets["train"].pixels
