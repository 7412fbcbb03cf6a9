"""The README's and docs/architecture.md's limits (who is refused, what is left out) match the code.

Each test names the sentence it guards. A list of exceptions is checked both ways, over every built-in
plugin: the plugins the text names are refused, and every other one is accepted, so a plugin that gains
or loses the limit fails here until the text is changed with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from samflow import HookedSam, PluginStack, build_sam
from samflow.plugins import PluginError
from samflow.plugins.registry import discover
from samflow.sam.cache import EncoderCacheError
from samflow.testing import random_batch

BUILTIN = sorted(
    name for name, info in discover().items() if info.cls is not None and info.distribution == "samflow"
)

#: README, "A real SAM checkpoint": "the encoder-side plugins SAM-Adapter and BA-SAM need SAM's ViT";
#: docs/architecture.md: refused by name on these encoders (``needs_vit_encoder``).
NEEDS_VIT = {"sam_adapter", "ba_sam"}
#: README, "An embedding store ...": "Plugins that change the encoder (SAM-Adapter, LoRA, BA-SAM) are
#: refused too" (and ``model.sam.encoder_cache``: "Refused, with the plugin named, when a plugin changes
#: the encoder").
CHANGES_ENCODER = {"sam_adapter", "lora", "ba_sam"}
#: docs/architecture.md: "A plugin with ``reads_image = True`` (PA-SAM, SAPNet)".
READS_IMAGE = {"pa_sam", "sapnet"}
SIZE = 128


def _plugin(name: str):
    return discover()[name].cls()


def test_the_builtin_plugins_are_the_readme_table():
    assert set(BUILTIN) == {
        "decoder_tuning",
        "tokens",
        "sam_adapter",
        "hq_sam",
        "pa_sam",
        "ba_sam",
        "lora",
        "wsi_sam",
        "sapnet",
    }


@pytest.mark.parametrize("name", BUILTIN)
def test_only_the_vit_plugins_are_refused_on_mobile_sam(name):
    sam = build_sam("mobile_sam", img_size=SIZE)
    if name in NEEDS_VIT:
        with pytest.raises(PluginError, match=rf"Plugin {name!r} \(\w+\) adapts SAM's ViT image encoder"):
            HookedSam(sam, PluginStack({name: _plugin(name)}))
        return
    model = HookedSam(sam, PluginStack({name: _plugin(name)})).eval()
    with torch.no_grad():
        out = model(random_batch(2, size=SIZE, prompt="box"))
    assert out.pred.shape == (2, 1, SIZE // 4, SIZE // 4)


@pytest.mark.parametrize("option", ["model.sam.embedding_store", "model.sam.encoder_cache"])
@pytest.mark.parametrize("name", BUILTIN)
def test_the_store_and_the_cache_refuse_exactly_the_plugins_that_change_the_encoder(name, option):
    model = HookedSam(build_sam("tiny"), PluginStack({name: _plugin(name)}))
    if name in CHANGES_ENCODER:
        with pytest.raises(EncoderCacheError, match=rf"{option} is set, .*{name}"):
            model.check_encoder_cache(option)
    else:
        model.check_encoder_cache(option)


def test_the_plugins_that_read_the_image_are_pa_sam_and_sapnet():
    assert {name for name in BUILTIN if discover()[name].cls.reads_image} == READS_IMAGE


def test_training_from_the_store_decodes_folder_images_but_not_coco_images(tmp_path):
    """README, "An embedding store ...": a SegmentationDataModule's training items carry no pixels with
    the store (``batch.pixels`` False); a CocoDataModule's are decoded as without it."""
    from PIL import Image

    from samflow.data import SegmentationDataModule
    from samflow.data.coco import CocoDataModule
    from samflow.embed.check import skip_training_pixels

    sys.path.insert(0, str(Path(__file__).parent / "coco"))
    from tiny_coco import make_tiny_coco

    root = tmp_path / "folder"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (40, 30), (i * 90, 40, 60)).save(root / "images" / f"{i}.png")
        Image.new("L", (40, 30), 255 * (i % 2)).save(root / "masks" / f"{i}.png")
    folder = SegmentationDataModule(train=str(root), img_size=64, batch_size=2, prompt="box")
    folder.setup("fit")
    assert skip_training_pixels(folder, image_readers=[])
    assert not next(iter(folder.train_dataloader())).pixels

    annotations, _ = make_tiny_coco(tmp_path / "coco")
    coco = CocoDataModule(train={"annotations": str(annotations)}, img_size=64, batch_size=2)
    coco.setup("fit")
    assert not skip_training_pixels(coco, image_readers=[])
    batch = next(iter(coco.train_dataloader()))
    assert batch.pixels and bool(batch.image.isfinite().all())


def test_a_batch_with_unequal_row_counts_is_not_the_mean_of_its_images_steps():
    """README, "Several GPUs or nodes": "The exceptions: a batch whose images have different numbers of
    prompt rows (COCO instances), as each process averages over its own rows". The loss is the mean over
    the batch's rows: image 0 with 3 rows weighs 3/4, so two processes (one image each, mean of their
    means) would take another step. If the loss becomes a mean per image, the README must drop it."""
    from samflow.module import SamflowModule, SamSpec
    from samflow_plugins.decoder_tuning import DecoderTuning

    torch.manual_seed(0)
    module = SamflowModule(
        sam=SamSpec(variant="tiny"), plugins={"decoder": DecoderTuning()}, losses={"bce": 1.0, "dice": 1.0}
    ).double()
    batch = random_batch(2, size=SIZE, prompt="box", seed=3, dtype=torch.float64)
    batch.mask[0, :, :, :40] = 1
    batch.gt_original = [m[0].bool() for m in batch.mask]
    batch = batch.select_rows([0, 0, 0, 1])
    batch.box = batch.box + torch.tensor([[0.0], [4.0], [8.0], [0.0]], dtype=torch.float64)
    batch = batch.replace(sample_seed=[11, 12])

    def loss(part):
        with torch.no_grad():
            out, ctx = module.model.run(part, module.model.context(part))
            return float(module.compute_losses(out, part, ctx)["total"])

    whole, first, second = loss(batch), loss(batch.select_images([0])), loss(batch.select_images([1]))
    assert whole == pytest.approx((3 * first + second) / 4, rel=1e-9)
    assert abs(whole - (first + second) / 2) > 1e-6 * abs(whole)
