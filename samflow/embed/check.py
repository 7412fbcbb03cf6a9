"""Whether a run may read an embedding store: its key, its completeness, augmentation, encoder plugins."""

from __future__ import annotations

from typing import Any

from samflow.embed.store import EmbeddingStore, EmbeddingStoreError, StoreKey, encoder_checksum


def store_key_of(model: Any, datamodule: Any) -> StoreKey:
    """The ``StoreKey`` of a ``SamflowModule`` and a ``SegmentationDataModule``."""
    missing = [a for a in ("img_size", "resize_mode", "image_resize") if not hasattr(datamodule, a)]
    if missing:
        raise EmbeddingStoreError(
            f"model.sam.embedding_store: data {type(datamodule).__name__} has no {', '.join(missing)}; the "
            "store needs samflow's SegmentationDataModule (or one with the same resize options)."
        )
    if datamodule.img_size != model.model.img_size:
        raise EmbeddingStoreError(
            f"data.img_size {datamodule.img_size} differs from the encoder's input size {model.model.img_size}."
        )
    return StoreKey(
        encoder_sha256=encoder_checksum(model.model.sam),
        img_size=int(datamodule.img_size),
        resize_mode=str(datamodule.resize_mode),
        image_resize=str(datamodule.image_resize),
        blocks=tuple(model.model.plugins.encoder_features()),
    )


def image_paths(datamodule: Any) -> list[str]:
    """Every image file of the data module's datasets built so far, in dataset order."""
    return [str(s.image) for dataset in datamodule.datasets.values() for s in dataset.samples]


def require_file_images(datamodule: Any, what: str) -> None:
    """Refuse data whose images are not whole files: the store finds an image by its file, so patches
    of a slide (``SlideDataModule``: every patch has the slide's path, and an LR view the HR view's)
    or instances of a COCO image read through another module would get another image's embedding."""
    from samflow.data.datamodule import SegmentationDataModule

    if not isinstance(datamodule, SegmentationDataModule):
        raise EmbeddingStoreError(
            f"{what} finds images by file and works with samflow.data.SegmentationDataModule (one image per "
            f"file); this experiment's data is {type(datamodule).__name__}, whose images are not whole files. "
            "Drop the embedding store (model.sam.encoder_cache caches within a run)."
        )


def open_for_run(model: Any, datamodule: Any, stage: str) -> EmbeddingStore:
    """The store of ``model.sam_spec.embedding_store`` once it is valid for this run, or one clear error.

    Refused: a plugin that changes the encoder; training augmentation (``data.augment`` changes the
    image, so its stored output would be wrong); a store written for other encoder weights, input
    size, resize rule or blocks; an unfinished store; any image of the run's datasets (after their
    ``setup``) that has no row, because it is new or its file changed.
    """
    path = model.sam_spec.embedding_store
    model.model.check_encoder_cache("model.sam.embedding_store")
    if datamodule is None:
        raise EmbeddingStoreError(
            "model.sam.embedding_store finds images by file and needs samflow's data module (data: ...)."
        )
    require_file_images(datamodule, f"model.sam.embedding_store {path}")
    if stage == "fit" and getattr(datamodule, "augment", None) is not None:
        raise EmbeddingStoreError(
            f"model.sam.embedding_store {path}: data.augment changes the training images, so their stored "
            "embeddings would be wrong; drop data.augment or model.sam.embedding_store."
        )
    store = EmbeddingStore(path, store_key_of(model, datamodule))
    missing = store.missing(image_paths(datamodule))
    if missing:
        raise EmbeddingStoreError(
            f"model.sam.embedding_store {path}: {len(missing)} image(s) of the data are not in the store (new, "
            f"or changed since it was written), e.g. {missing[0]}; run `samflow embed` again for this experiment."
        )
    return store
