"""Persistent embedding store: the frozen encoder's outputs on disk for decoder-side training.

``samflow embed --experiment NAME`` writes it (``command``, ``writer``); ``model.sam.embedding_store``
reads it (``store.EmbeddingStore``, checked against the run by ``open_for_run``).
"""

from samflow.embed.check import image_paths, open_for_run, store_key_of
from samflow.embed.store import EmbeddingStore, EmbeddingStoreError, StoreKey, encoder_checksum

__all__ = [
    "EmbeddingStore",
    "EmbeddingStoreError",
    "StoreKey",
    "encoder_checksum",
    "image_paths",
    "open_for_run",
    "store_key_of",
]
