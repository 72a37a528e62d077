"""``import_faiss``: the one place that imports FAISS (bottom layer: no other antimemo module).

Shared by :mod:`antimemo.functional.replica` (replica search) and :mod:`antimemo.dedup.images`
(image duplicate index), which re-exports it as ``antimemo.dedup.images.import_faiss``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["import_faiss"]


def import_faiss(needed_by: str = "DuplicateIndex.from_images") -> Any:
    """Import FAISS, or raise an ImportError that says how to install it.

    Args:
        needed_by: what needs FAISS, named in the error.

    Returns:
        The ``faiss`` module.

    Example:
        >>> hasattr(import_faiss(), "IndexFlatIP")
        True
    """
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - exercised by a monkeypatched test
        raise ImportError(
            f"{needed_by} needs FAISS for the nearest-neighbour search: "
            "pip install faiss-cpu  (or faiss-gpu); there is no fallback"
        ) from err
    return faiss
