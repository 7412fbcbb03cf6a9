"""``CocoDataModule``'s training order resumes mid-epoch (SAPNet's runs): ``ResumableLoader``."""

from __future__ import annotations

from helpers import resumed_epochs
from tiny_coco import make_tiny_coco

from samflow.data.coco import CocoDataModule


def test_a_resumed_epoch_trains_the_uninterrupted_epochs_images(tmp_path, monkeypatch):
    """Killed after the first batch of epoch 1 and resumed, the epoch goes on with the images the
    uninterrupted run trains next, not with epoch 0's order from the start (a new shuffling generator
    per process replayed it: images twice, others never)."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    path, _ = make_tiny_coco(tmp_path)

    def loader():
        data = CocoDataModule(train={"annotations": str(path)}, img_size=64, batch_size=1)
        data.setup("fit")
        return data.train_dataloader()

    first, second, resumed = resumed_epochs(loader, lambda batch: tuple(batch.image_ids))
    assert sorted(first) == sorted(second) and len(second) == 3  # every image once an epoch
    assert first != second  # each epoch in its own order
    assert resumed == second
