"""``SlideDataModule``'s training patches resume: centres, order and draws from the seeds and the epoch."""

from __future__ import annotations

import pytest

pytest.importorskip("tiffslide")

from helpers import resumed_epochs
from synthetic_slide import write_geojson, write_slide

from samflow.data.wsi import SlideDataModule


def test_patches_follow_the_epoch_and_a_resumed_epoch_draws_the_uninterrupted_ones(tmp_path, monkeypatch):
    """Each epoch draws new centres without rebuilding the loader, and a run killed after the first
    batch of epoch 1 and resumed in a fresh process goes on with the uninterrupted run's patches,
    flips, jitter and prompts (the loader used to draw centres only when built: a resumed run drew
    epoch k's while the uninterrupted one kept epoch 0's, and its order came from the global generator)."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    path, _ = write_slide(tmp_path)
    entry = {"slide": str(path), "annotations": str(write_geojson(tmp_path))}

    def loader():
        data = SlideDataModule(
            train=[entry], patch_size=32, img_size=32, patches_per_slide=4, batch_size=2, hflip_jitter=True
        )
        data.setup("fit")
        return data.train_dataloader()

    def key(batch):
        prompts = [t for t in (batch.points, batch.box, batch.mask_prompt) if t is not None]
        return tuple(batch.id), batch.image.double().sum().item(), [p.double().sum().item() for p in prompts]

    first, second, resumed = resumed_epochs(loader, key)
    ids = [set(batch[0]) for batch in first], [set(batch[0]) for batch in second]
    assert not set().union(*ids[0]) & set().union(*ids[1])  # new centres in epoch 1
    assert resumed == second
    assert len(second) == 2
