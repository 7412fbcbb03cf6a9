"""Whether a run may read an embedding store: its key, its completeness, augmentation, encoder plugins."""

from __future__ import annotations

from typing import Any

from samflow.embed.store import EmbeddingStore, EmbeddingStoreError, StoreKey, encoder_checksum


def input_frame(data: Any) -> tuple[int, str, str]:
    """(img_size, resize_mode, image_resize): how ``data`` frames an image file for the encoder.

    ``data``: a ``SegmentationDataModule``, a ``CocoInstances``, or a ``CocoDataModule`` whose datasets
    are built (``setup``): its splits share one frame, that of ``CocoInstances``.
    """
    from samflow.data.coco import CocoDataModule

    if isinstance(data, CocoDataModule):
        frames = {input_frame(dataset) for dataset in data.datasets.values()}
        if len(frames) != 1:
            raise EmbeddingStoreError(
                f"the embedding store needs the COCO data set up first ({len(frames)} input frames found)."
            )
        return frames.pop()
    missing = [a for a in ("img_size", "resize_mode", "image_resize") if not hasattr(data, a)]
    if missing:
        raise EmbeddingStoreError(
            f"model.sam.embedding_store: data {type(data).__name__} has no {', '.join(missing)}; the "
            "store needs samflow's SegmentationDataModule or CocoDataModule (or one with the same resize options)."
        )
    return int(data.img_size), str(data.resize_mode), str(data.image_resize)


def store_key(sam: Any, frame: tuple[int, str, str], blocks: tuple[int, ...] = ()) -> StoreKey:
    """The ``StoreKey`` of SAM's image encoder on images framed as ``frame`` (``input_frame``)."""
    img_size, resize_mode, image_resize = frame
    return StoreKey(
        encoder_sha256=encoder_checksum(sam),
        img_size=img_size,
        resize_mode=resize_mode,
        image_resize=image_resize,
        blocks=blocks,
    )


def store_key_of(model: Any, datamodule: Any) -> StoreKey:
    """The ``StoreKey`` of a ``SamflowModule`` and its data module (``input_frame``)."""
    frame = input_frame(datamodule)
    if frame[0] != model.model.img_size:
        raise EmbeddingStoreError(
            f"data.img_size {frame[0]} differs from the encoder's input size {model.model.img_size}."
        )
    return store_key(model.model.sam, frame, tuple(model.model.plugins.encoder_features()))


def dataset_images(dataset: Any) -> list[str]:
    """The image files of one dataset (``samples`` of a folder dataset, or a ``CocoInstances``), in order."""
    from samflow.data.coco import CocoInstances

    if isinstance(dataset, CocoInstances):
        return [str(dataset.image_path(i)) for i in range(len(dataset))]
    return [str(s.image) for s in dataset.samples]


def image_paths(datamodule: Any) -> list[str]:
    """Every image file of the data module's datasets built so far, in dataset order."""
    return [p for dataset in datamodule.datasets.values() for p in dataset_images(dataset)]


def require_file_images(datamodule: Any, what: str) -> None:
    """Refuse data whose images are not whole files: the store finds an image by its file, so patches
    of a slide (``SlideDataModule``: every patch has the slide's path, and an LR view the HR view's)
    would get another image's embedding. Allowed: ``SegmentationDataModule`` (one image per file) and
    ``CocoDataModule`` (one item per COCO image file, framed as ``CocoInstances`` says: its
    ``img_size``, ``resize_mode`` and ``image_resize`` are in the store's key)."""
    from samflow.data.coco import CocoDataModule
    from samflow.data.datamodule import SegmentationDataModule

    if not isinstance(datamodule, (SegmentationDataModule, CocoDataModule)):
        raise EmbeddingStoreError(
            f"{what} finds images by file and works with samflow.data.SegmentationDataModule or "
            f"samflow.data.coco.CocoDataModule (one image per file); this experiment's data is "
            f"{type(datamodule).__name__}, whose images are not whole files. "
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


def skip_training_pixels(datamodule: Any, image_readers: list[str]) -> bool:
    """Leave the training images of a run that reads the store undecoded, when nothing needs them.

    With the store the encoder does not run, so a training step needs an image's size, not its pixels,
    unless a plugin reads them (``image_readers``: the keys of plugins with ``reads_image``): each
    training item then carries ``image_placeholder`` and its file's header is read, not its pixels
    (PNG decoding and SAM's resize were about a sixth of a vit_b HQ-SAM epoch from the store).
    Evaluation images are decoded as before (the sample pictures show them). Datasets without the
    ``pixels`` switch (COCO's) are left as they are. Returns whether any training dataset was switched.
    """
    switched = False
    for key, dataset in datamodule.datasets.items():
        if key.partition("/")[0] == "train" and hasattr(dataset, "pixels"):
            dataset.pixels = bool(image_readers)
            switched = switched or not image_readers
    return switched
