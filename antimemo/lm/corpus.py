"""Embedded default corpus and a byte-level tokenizer: everything offline, nothing to download.

The default corpus is the help text that ships with CPython itself (``pydoc_data.topics``: the
language reference pages that ``help("assert")`` prints). It is split into paragraphs at blank
lines and joined back with ``"\\n\\n"`` in sorted topic order, so the text (and every split made
from it) is deterministic for a given Python version. Different Python versions ship slightly
different help texts; record ``sys.version`` next to any number you report (the recipe's report
does).

The tokenizer maps text to its UTF-8 bytes (ids 0..255) and reserves id 256 for padding, so a model
needs ``vocab_size = 257`` (:data:`BYTE_VOCAB_SIZE`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = [
    "BYTE_PAD_ID",
    "BYTE_VOCAB_SIZE",
    "DEFAULT_CORPUS",
    "ByteTokenizer",
    "byte_decode",
    "chunk_ids",
    "load_text",
    "pydoc_topics_paragraphs",
]

#: Name of the embedded default corpus accepted by :func:`load_text`.
DEFAULT_CORPUS = "pydoc_topics"
#: Padding id of :class:`ByteTokenizer` (one past the 256 byte values).
BYTE_PAD_ID = 256
#: Vocabulary size a model needs for :class:`ByteTokenizer` ids (256 bytes + pad).
BYTE_VOCAB_SIZE = 257


class ByteTokenizer:
    """UTF-8 byte tokenizer: one id per byte (0..255), plus a pad id (256).

    Lossless for any text (``decode(encode(s)) == s``); needs no vocabulary file.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé")
        [104, 195, 169]
        >>> tok.decode([104, 195, 169, tok.pad_id])
        'hé'
    """

    pad_id: int = BYTE_PAD_ID
    vocab_size: int = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """Return the UTF-8 bytes of ``text`` as a list of ints in 0..255.

        Args:
            text: any Python string.

        Returns:
            One id per UTF-8 byte.

        Example:
            >>> ByteTokenizer().encode("ab")
            [97, 98]
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}; decode bytes first")
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int] | torch.Tensor, errors: str = "replace") -> str:
        """Turn ids back into text; pad ids are skipped.

        Args:
            ids: a sequence of ints or a 1-D integer tensor, each in 0..256.
            errors: how to treat byte sequences that are not valid UTF-8 (a model can generate
                them); passed to ``bytes.decode``. ``"replace"`` gives U+FFFD, ``"strict"`` raises.

        Returns:
            The decoded string.

        Example:
            >>> ByteTokenizer().decode([97, 98, 256])
            'ab'
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be 1-D, got a tensor of shape {tuple(ids.shape)}; decode row by row")
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.pad_id:
                continue
            if not 0 <= i < 256:
                raise ValueError(f"ids must be byte ids 0..255 or pad id {self.pad_id}, got {i}")
            out.append(i)
        return out.decode("utf-8", errors=errors)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id})"


def byte_decode(ids: Iterable[int] | torch.Tensor) -> str:
    """Decode byte ids to text (``ByteTokenizer().decode`` as a plain, importable function).

    Handy where a config needs a callable by import path, e.g. ``MemorizationMonitor(decode=...)``
    for the zlib membership score: ``decode: antimemo.lm.corpus.byte_decode`` in YAML.

    Args:
        ids: byte ids (0..255) and pad ids (256, skipped).

    Returns:
        The text; invalid UTF-8 becomes U+FFFD.

    Example:
        >>> byte_decode([104, 105])
        'hi'
    """
    return ByteTokenizer().decode(ids)


def pydoc_topics_paragraphs() -> list[str]:
    """Paragraphs of CPython's bundled help texts (``pydoc_data.topics``), in sorted topic order.

    Each topic's text is split at blank lines; paragraphs are stripped of surrounding newlines
    and empty ones dropped.

    Returns:
        About 2,600 paragraphs (about 460 kB of text on CPython 3.11).

    Example:
        >>> paras = pydoc_topics_paragraphs()
        >>> len(paras) > 1000
        True
    """
    from pydoc_data.topics import topics

    paras: list[str] = []
    for key in sorted(topics):
        for p in topics[key].split("\n\n"):
            p = p.strip("\n")
            if p.strip():
                paras.append(p)
    return paras


def load_text(corpus: str | Path) -> str:
    """Load a corpus as one string.

    Args:
        corpus: ``"pydoc_topics"`` for the embedded default corpus (paragraphs joined with a blank
            line), or the path of a UTF-8 text file.

    Returns:
        The text.

    Example:
        >>> text = load_text("pydoc_topics")
        >>> text.startswith('The "assert" statement')
        True
    """
    if str(corpus) == DEFAULT_CORPUS:
        return "\n\n".join(pydoc_topics_paragraphs())
    path = Path(corpus)
    if not path.is_file():
        raise ValueError(
            f"corpus must be {DEFAULT_CORPUS!r} or the path of an existing UTF-8 text file, got {str(corpus)!r} "
            "(no such file); pass an absolute path or one relative to the working directory"
        )
    text = path.read_text(encoding="utf-8")
    if not text:
        raise ValueError(f"corpus file {str(path)!r} is empty; point corpus at a file with text in it")
    return text


def chunk_ids(ids: list[int] | torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping rows of ``seq_len`` ids; a short tail is dropped.

    Args:
        ids: the token stream (list of ints or 1-D tensor).
        seq_len: row length, >= 2.

    Returns:
        ``LongTensor[len(ids) // seq_len, seq_len]``.

    Example:
        >>> chunk_ids(list(range(7)), 3).tolist()
        [[0, 1, 2], [3, 4, 5]]
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}; e.g. seq_len=64")
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = t.numel() // seq_len
    return t[: n * seq_len].reshape(n, seq_len).clone()
