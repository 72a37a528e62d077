"""Text normalisation and per-example content hashes (stable across processes and machines).

Exact duplicates are found on the *normalised* text: Unicode NFKC, case-folded, runs of
whitespace collapsed to one space, leading/trailing whitespace removed. Near duplicates use word
n-grams of that normalised text. The *content hash* of an example is a hash of its raw bytes and
feeds the dataset fingerprint that ties a :class:`~antimemo.dedup.DuplicateIndex` to its data.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["content_hash", "fingerprint", "normalize_text", "normalized_words", "token_array"]


def normalized_words(text: str) -> list[str]:
    """Split a text into normalised words: NFKC, case-folded, split on any whitespace.

    Args:
        text: the raw text.

    Returns:
        The list of words (empty for an empty or all-whitespace text).

    Example:
        >>> normalized_words("  Ｈello\\tWORLD ")
        ['hello', 'world']
    """
    return unicodedata.normalize("NFKC", text).casefold().split()


def normalize_text(text: str) -> str:
    """Normalise a text for exact-duplicate detection: NFKC, case-folded, single spaces, stripped.

    Args:
        text: the raw text.

    Returns:
        The normalised text; two texts are exact duplicates when their normalised texts are equal.

    Example:
        >>> normalize_text("Hello,\\n\\n  WORLD") == normalize_text("hello, world")
        True
    """
    return " ".join(normalized_words(text))


def token_array(seq: Any, where: str = "seqs") -> np.ndarray:
    """Convert one token sequence (list, tuple, 1-D numpy array or tensor of integers) to ``int64``.

    Args:
        seq: the token ids.
        where: the name used in error messages (e.g. ``"seqs[3]"``).

    Returns:
        A contiguous 1-D ``np.int64`` array.

    Raises:
        TypeError: if ``seq`` is not a 1-D sequence of integers.

    Example:
        >>> token_array([3, 1, 2]).dtype
        dtype('int64')
    """
    if hasattr(seq, "detach") and hasattr(seq, "cpu"):  # torch.Tensor without importing torch
        seq = seq.detach().cpu().numpy()
    arr = np.asarray(seq)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iub"):
        raise TypeError(
            f"{where} must be a 1-D sequence of integer token ids, got {type(seq).__name__} with "
            f"shape {arr.shape} and dtype {arr.dtype}; pass e.g. a list of ints or a 1-D LongTensor"
        )
    return np.ascontiguousarray(arr, dtype=np.int64)


def content_hash(data: bytes) -> int:
    """64-bit content hash of raw bytes (BLAKE2b, 8-byte digest, little-endian integer).

    Args:
        data: the raw bytes of one example (UTF-8 text, ``int64`` token bytes, ``float32`` pixels).

    Returns:
        An integer in ``[0, 2**64)``.

    Example:
        >>> content_hash(b"abc") == content_hash(b"abc") != content_hash(b"abd")
        True
    """
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def fingerprint(content_hashes: Sequence[int] | np.ndarray) -> str:
    """Fingerprint of a dataset: BLAKE2b-128 (hex) over its per-example content hashes, in order.

    Two datasets have the same fingerprint when they hold the same examples in the same order
    (up to 64-bit hash collisions).

    Args:
        content_hashes: one :func:`content_hash` per example.

    Returns:
        A 32-character hex string.

    Example:
        >>> fingerprint([1, 2]) != fingerprint([2, 1])
        True
    """
    arr = np.ascontiguousarray(np.asarray(content_hashes, dtype=np.uint64).astype("<u8"))
    h = hashlib.blake2b(digest_size=16)
    h.update(b"antimemo.dedup.fingerprint/1")
    h.update(arr.tobytes())
    return h.hexdigest()
