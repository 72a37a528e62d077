"""Duplicate detection for training data: ``DuplicateIndex`` over texts, token ids or images.

Example:
    >>> from antimemo.dedup import DuplicateIndex
    >>> idx = DuplicateIndex.from_texts(["Hello  world", "hello world", "bye"], progress=False)
    >>> idx.cluster_ids.tolist()
    [0, 0, 1]

Names are imported lazily: ``antimemo.dedup.minhash`` (numpy only) is what the worker processes
import, so they never load torch.
"""

from importlib import import_module
from typing import Any

_LAZY = {
    "DuplicateIndex": "antimemo.dedup.index",
    "CorruptIndexError": "antimemo.dedup.index",
    "dataset_content_hashes": "antimemo.dedup.index",
    "PixelEmbedder": "antimemo.dedup.images",
    "normalize_text": "antimemo.dedup.normalize",
    "fingerprint": "antimemo.dedup.normalize",
    "optimal_params": "antimemo.dedup.lsh",
    "connected_components": "antimemo.dedup.clusters",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'antimemo.dedup' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
