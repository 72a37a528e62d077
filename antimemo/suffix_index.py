"""``TokenIndex``: a suffix array over a tokenized training set, for span lookups.

Untargeted extraction (Carlini et al. 2021; Nasr et al. 2023, "Scalable extraction of training
data from (production) language models") asks whether text a model generates freely occurs
verbatim in its training data. :class:`TokenIndex` answers the questions that needs, over token
ids:

- :meth:`~TokenIndex.count`: how often a span occurs in training;
- :meth:`~TokenIndex.find`: where, as ``(document, offset)`` pairs;
- :meth:`~TokenIndex.longest_prefix_match`: the longest prefix of a token sequence that occurs;
- :meth:`~TokenIndex.matching_lengths`: that length at every start position of a batch of
  generations at once (what :class:`antimemo.metrics.UntargetedExtraction` uses).

**Layout.** The documents are concatenated into one stream with a separator after each, and the
suffix array lists the start of every suffix that begins on a token, in lexicographic order of
the suffixes. Every separator is distinct from every other separator and from every token (it
sorts below all tokens), so no match (and no suffix comparison) ever crosses a document
boundary: a span is found only where it lies inside one document.

**Build.** Prefix doubling (Manber and Myers 1993) with group refinement (Larsson and Sadakane
2007): suffixes are sorted by their first token, then repeatedly by ``(rank of the first h
tokens, rank of the h tokens after them)`` with ``np.argsort`` on one ``int64`` key, and each pass
re-sorts only the suffixes still tied with another one. Because separators are unique, the
number of passes is ``ceil(log2(longest document))`` at most (7 for 64-token rows), and the work
shrinks as groups resolve. ``benchmarks/suffix_index_bench.py`` measures it against
``pydivsufsort`` (libdivsufsort in C) and ``infini-gram`` (figures in ``docs/benchmarks.md``).

**Queries** are vectorized binary searches over the suffix array: all queries of a batch advance
together, each step gathering the candidate suffixes' first ``m`` tokens into one array.

**Files.** :meth:`~TokenIndex.save` writes an uncompressed ``.npz`` through
:func:`antimemo._atomic.atomic_open` with a SHA-256 digest over every array and the metadata;
:meth:`~TokenIndex.load` reads it with ``allow_pickle=False`` and raises a ``ValueError`` for a
truncated, corrupt or edited file.

This module needs only numpy (and tqdm for the progress bar); it accepts torch tensors without
importing torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from antimemo._atomic import atomic_open

__all__ = ["TokenIndex"]

#: Format tag stored in every saved index.
FORMAT = "antimemo.suffix_index.TokenIndex/1"
_ARRAYS = ("stream", "suffix_array", "doc_starts")
_REBUILD = "rebuild it with `TokenIndex.build(sequences).save(path)`"
#: Build shows a progress bar by default from this many tokens on.
_PROGRESS_FROM = 2_000_000
#: Elements gathered per query step (bounds the memory of a batch search).
_CHUNK_ELEMENTS = 1 << 22


def _as_token_array(seq: Any, where: str) -> np.ndarray:
    """One document as a 1-D ``int64`` array (lists, tuples, numpy arrays, torch tensors)."""
    if hasattr(seq, "detach") and hasattr(seq, "cpu"):  # a torch tensor, without importing torch
        seq = seq.detach().cpu().numpy()
    if isinstance(seq, (str, bytes)):
        raise TypeError(f"{where} must be a sequence of integer token ids, got {type(seq).__name__}; tokenize it first")
    arr = np.asarray(seq)
    if arr.ndim != 1:
        raise ValueError(f"{where} must be 1-D (one document of token ids), got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        if arr.dtype.kind == "b" or not np.all(np.equal(np.mod(arr, 1), 0)):
            raise TypeError(f"{where} must hold integer token ids, got dtype {arr.dtype}; pass token ids, not text or logits")
    return arr.astype(np.int64, copy=False)


def _documents(sequences: Any, key: str) -> Iterable[np.ndarray]:
    """Yield each document of ``sequences`` (rows of a 2-D array/tensor, sequences, or dicts)."""
    if hasattr(sequences, "detach") and hasattr(sequences, "cpu"):
        sequences = sequences.detach().cpu().numpy()
    if isinstance(sequences, np.ndarray):
        if sequences.ndim != 2:
            raise ValueError(
                f"sequences as an array must be 2-D [documents, tokens], got shape {sequences.shape}; "
                "pass a list of 1-D sequences for documents of different lengths"
            )
        for i in range(sequences.shape[0]):
            yield _as_token_array(sequences[i], f"sequences[{i}]")
        return
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__len__") or not hasattr(sequences, "__getitem__"):
        raise TypeError(
            "sequences must be a sequence of token-id sequences (list, 2-D array or tensor, or a dataset of "
            f"dicts with {key!r}), got {type(sequences).__name__}; wrap an iterator with list(...)"
        )
    for i in range(len(sequences)):
        item = sequences[i]
        where = f"sequences[{i}]"
        if isinstance(item, Mapping):
            if key not in item:
                raise KeyError(
                    f"sequences[{i}] is a dict without the key {key!r} (keys: {sorted(map(str, item))}); "
                    f"pass key=<the key of the token ids>"
                )
            item, where = item[key], f"sequences[{i}][{key!r}]"
        yield _as_token_array(item, where)


def _suffix_array(stream: np.ndarray, is_sep: np.ndarray, bar: Any) -> np.ndarray:
    """Suffix array of ``stream`` (all positions); separators are unique and sort below tokens."""
    n = stream.shape[0]
    num_sep = int(is_sep.sum())
    # initial key: separator j -> j (unique), token t -> num_sep + t
    key = np.where(is_sep, np.cumsum(is_sep) - 1, stream + num_sep)
    sa = np.argsort(key, kind="stable").astype(np.int64)
    sk = key[sa]
    del key
    head = np.ones(n, dtype=bool)
    head[1:] = sk[1:] != sk[:-1]
    del sk
    slot = np.arange(n, dtype=np.int64)
    # rank[i] = slot (index in sa) of the first suffix of i's group; groups are contiguous in sa
    rank = np.empty(n, dtype=np.int64)
    rank[sa] = np.maximum.accumulate(np.where(head, slot, 0))
    gid = np.cumsum(head) - 1
    sizes = np.bincount(gid)
    slots = slot[sizes[gid] > 1]  # slots of suffixes still tied with another one
    del gid, sizes, head, slot
    h = 1
    bar.update(1)
    while slots.size:
        pos = sa[slots]
        r1 = rank[pos]
        # a suffix tied on its first h tokens has no separator among them (separators are
        # unique), so pos + h is still inside the stream
        r2 = rank[pos + h]
        order = np.argsort(r1 * (n + 1) + r2)
        pos, r1, r2 = pos[order], r1[order], r2[order]
        sa[slots] = pos
        new = np.ones(slots.shape[0], dtype=bool)
        new[1:] = (r1[1:] != r1[:-1]) | (r2[1:] != r2[:-1])
        rank[pos] = np.maximum.accumulate(np.where(new, slots, 0))
        gid = np.cumsum(new) - 1
        slots = slots[np.bincount(gid)[gid] > 1]
        h *= 2
        bar.update(1)
    return sa


ALGORITHMS = ("auto", "numpy", "divsufsort")


def _resolve_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}; 'auto' picks the fastest installed")
    if algorithm == "numpy":
        return algorithm
    try:
        import pydivsufsort  # noqa: F401
    except ImportError as err:
        if algorithm == "auto":
            return "numpy"
        raise ImportError(
            "TokenIndex.build(algorithm='divsufsort') needs the pydivsufsort package: "
            'pip install "antimemo[extraction]" (or algorithm="numpy", which needs nothing)'
        ) from err
    return "divsufsort"


def _suffix_array_divsufsort(stream: np.ndarray, is_sep: np.ndarray) -> np.ndarray:
    """The same suffix array as :func:`_suffix_array`, sorted by libdivsufsort (C)."""
    from pydivsufsort import divsufsort

    num_sep = int(is_sep.sum())
    key = np.where(is_sep, np.cumsum(is_sep) - 1, stream + num_sep)
    # pydivsufsort narrows the ids to the smallest big-endian width and sorts the bytes, keeping
    # the suffixes that start on a token boundary: the order of the id sequences
    return np.asarray(divsufsort(key), dtype=np.int64)


class TokenIndex:
    """A suffix array over tokenized training documents: count and locate spans.

    Build one with :meth:`build` (or :meth:`load` a saved one). Documents are kept apart: a span
    is found only where it lies inside one document, never across the end of one and the start
    of the next.

    Attributes:
        params: build parameters (``num_docs``, ``num_tokens``, ``boundary_ids``, ...), saved with
            the index.

    Example:
        >>> idx = TokenIndex.build([[1, 2, 3, 4], [3, 4, 5], [9, 1, 2]], progress=False)
        >>> idx.count([1, 2]), idx.find([3, 4])
        (2, [(0, 2), (1, 0)])
        >>> idx.count([4, 3])  # 4 ends document 0 and 3 starts document 1: no match across them
        0
        >>> idx.longest_prefix_match([3, 4, 5, 6])
        3
    """

    def __init__(self, stream: np.ndarray, suffix_array: np.ndarray, doc_starts: np.ndarray, params: dict) -> None:
        self._stream = stream
        self._sa = suffix_array
        self._doc_starts = doc_starts
        self.params = dict(params)
        for a in (self._stream, self._sa, self._doc_starts):
            a.setflags(write=False)
        ends = np.append(doc_starts[1:] - 1, stream.shape[0] - 1)
        self._doc_lengths = (ends - doc_starts).astype(np.int64)
        seps = np.flatnonzero(stream < 0)
        # longest run of tokens between two separators: no match can be longer
        self._max_run = int(np.diff(np.concatenate([[-1], seps])).max() - 1) if seps.size else 0

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        sequences: Any,
        *,
        key: str = "input_ids",
        boundary_ids: Iterable[int] = (),
        algorithm: str = "auto",
        progress: bool | None = None,
    ) -> TokenIndex:
        """Index a tokenized training set.

        Args:
            sequences: the documents: a list (or any indexable sequence, e.g. a
                ``torch.utils.data.Dataset``) of 1-D token sequences (lists, arrays, LongTensors),
                of dicts holding them under ``key`` (e.g. ``{"input_ids": LongTensor[L]}``), or a
                2-D array / tensor whose rows are the documents.
            key: the dict key of the token ids when items are dicts.
            boundary_ids: token ids that are not content (padding, ``-100`` labels): they are
                never matched, and a span is never found across them. Their positions still count
                in document offsets. Token ids must be ``>= 0`` except those listed here.
            algorithm: how the suffix array is sorted: ``"numpy"`` (prefix doubling, no
                dependency), ``"divsufsort"`` (libdivsufsort through ``pydivsufsort``, installed
                by ``pip install "antimemo[extraction]"``) or ``"auto"`` (``"divsufsort"`` when
                ``pydivsufsort`` is importable, else ``"numpy"``). Both give the same index, array
                for array; ``docs/benchmarks.md`` compares their speed and memory.
            progress: show a tqdm progress bar over the build passes; ``None`` shows it from 2M
                tokens on.

        Returns:
            The index.

        Raises:
            ImportError: for ``algorithm="divsufsort"`` without ``pydivsufsort``.
            TypeError: for items that are not integer token sequences.
            ValueError: for an empty dataset, a document with a negative token id not in
                ``boundary_ids``, or no content token at all.

        Example:
            >>> idx = TokenIndex.build([{"input_ids": [5, 6, 7, 256, 256]}], boundary_ids=[256], progress=False)
            >>> idx.count([7, 256]), idx.count([6, 7])
            (0, 1)
        """
        from tqdm.auto import tqdm

        if not isinstance(key, str):
            raise TypeError(f"key must be a str (the dict key of the token ids), got {type(key).__name__}")
        algorithm = _resolve_algorithm(algorithm)
        bids = np.asarray(sorted({int(b) for b in boundary_ids}), dtype=np.int64)
        docs = list(_documents(sequences, key))
        if not docs:
            raise ValueError("sequences is empty: a token index needs at least one document")
        lengths = np.fromiter((d.shape[0] for d in docs), dtype=np.int64, count=len(docs))
        doc_starts = np.zeros(len(docs), dtype=np.int64)
        doc_starts[1:] = np.cumsum(lengths + 1)[:-1]
        n = int(lengths.sum() + len(docs))
        stream = np.full(n, -1, dtype=np.int64)
        for i, (d, s) in enumerate(zip(docs, doc_starts)):
            if d.size and d.min() < 0:
                bad = d[d < 0]
                if not np.isin(bad, bids).all():
                    raise ValueError(
                        f"sequences[{i}] holds the negative token id {int(bad[~np.isin(bad, bids)][0])}; token ids must "
                        f"be >= 0, or listed in boundary_ids (e.g. boundary_ids=[-100] for ignored labels)"
                    )
            stream[s : s + d.shape[0]] = d
        del docs
        if bids.size:
            stream[np.isin(stream, bids)] = -1
        is_sep = stream < 0
        if is_sep.all():
            raise ValueError("sequences hold no content token (every document is empty or made of boundary_ids)")
        num_tokens = int((~is_sep).sum())
        if progress is None:
            progress = num_tokens >= _PROGRESS_FROM
        max_run = int(np.diff(np.concatenate([[-1], np.flatnonzero(is_sep)])).max() - 1)
        passes = 1 + max(0, math.ceil(math.log2(max(max_run, 1))))
        if algorithm == "divsufsort":
            passes = 1
        with tqdm(total=passes, desc=f"token index: sorting {num_tokens:,} suffixes ({algorithm})", unit="pass",
                  disable=not progress) as bar:
            if algorithm == "divsufsort":
                sa = _suffix_array_divsufsort(stream, is_sep)
                bar.update(1)
            else:
                sa = _suffix_array(stream, is_sep, bar)
        sa = sa[~is_sep[sa]]
        max_token = int(stream.max())
        stream_dtype = np.int32 if max_token < 2**31 - 1 else np.int64
        sa_dtype = np.int32 if n < 2**31 - 1 else np.int64
        params = {
            "num_docs": int(len(doc_starts)),
            "num_tokens": num_tokens,
            "boundary_ids": [int(b) for b in bids],
            "max_token": max_token,
            "algorithm": algorithm,
        }
        return cls(stream.astype(stream_dtype), sa.astype(sa_dtype), doc_starts, params)

    # ------------------------------------------------------------------ attributes
    @property
    def num_docs(self) -> int:
        """Number of documents."""
        return int(self._doc_starts.shape[0])

    @property
    def num_tokens(self) -> int:
        """Number of content tokens (boundary ids excluded): the suffixes indexed."""
        return int(self._sa.shape[0])

    @property
    def max_token_id(self) -> int:
        """The largest token id in the training stream (-1 for an index without content tokens).

        Example:
            >>> TokenIndex.build([[1, 7], [3]], progress=False).max_token_id
            7
        """
        return int(self._stream.max()) if self._stream.size else -1

    @property
    def max_match_length(self) -> int:
        """Longest run of content tokens inside one document: no match is ever longer."""
        return self._max_run

    @property
    def nbytes(self) -> int:
        """Bytes held by the index arrays."""
        return int(self._stream.nbytes + self._sa.nbytes + self._doc_starts.nbytes)

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenIndex(docs={self.num_docs}, tokens={self.num_tokens}, max_match_length={self.max_match_length})"

    def document(self, doc: int) -> np.ndarray:
        """Token ids of document ``doc`` (boundary ids read as ``-1``).

        Example:
            >>> TokenIndex.build([[1, 2], [3]], progress=False).document(1).tolist()
            [3]
        """
        if isinstance(doc, bool) or not isinstance(doc, (int, np.integer)) or not 0 <= doc < self.num_docs:
            raise IndexError(f"doc must be an integer in [0, {self.num_docs}), got {doc!r}")
        s = int(self._doc_starts[doc])
        return np.asarray(self._stream[s : s + int(self._doc_lengths[doc])], dtype=np.int64)

    # ------------------------------------------------------------------ queries
    def _search(self, queries: np.ndarray, lengths: np.ndarray, upper: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batched binary search of ``queries[q, :lengths[q]]`` in the suffix array.

        Returns ``(p, lcp_at, lcp_before)``: ``p`` is the first slot whose suffix is ``>=`` the query
        (``upper=False``) or ``>`` it (``upper=True``), comparing only the first ``lengths[q]``
        tokens; ``lcp_at`` / ``lcp_before`` are the common-prefix lengths of the query with the
        suffixes at slots ``p`` and ``p - 1`` (0 where the slot does not exist).
        """
        q, m = queries.shape
        size = self._sa.shape[0]
        lo = np.zeros(q, dtype=np.int64)
        hi = np.full(q, size, dtype=np.int64)
        cols = np.arange(m, dtype=np.int64)
        valid = cols[None, :] < lengths[:, None]
        last = self._stream.shape[0] - 1

        def first_stop(starts: np.ndarray, rows: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """First column (of ``c``) where suffix and query differ or the query ends, and
            whether the suffix token there is below the query token."""
            idx = starts[:, None] + c[None, :]
            np.minimum(idx, last, out=idx)  # the stream ends with a separator: comparison stops there
            window = self._stream[idx]
            qw = queries[rows[:, None], c[None, :]]
            stop = (window != qw) | ~valid[rows[:, None], c[None, :]]
            found = stop.any(axis=1)
            k = stop.argmax(axis=1)
            r = np.arange(rows.shape[0])
            less = window[r, k] < qw[r, k]
            return np.where(found, c[0] + k, m), less

        head = cols[: min(m, 8)]  # most comparisons stop within a few tokens: look there first

        def compare(slots: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            starts = self._sa[slots].astype(np.int64)
            j, less = first_stop(starts, rows, head)
            more = np.flatnonzero(j >= head.shape[0]) if head.shape[0] < m else np.zeros(0, dtype=np.int64)
            if more.size:
                j[more], less[more] = first_stop(starts[more], rows[more], cols[head.shape[0] :])
            lcp = np.minimum(j, lengths[rows])
            prefix = j >= lengths[rows]
            go_right = (~prefix & less) | (prefix & upper)
            return go_right, lcp

        for _ in range(max(1, int(size).bit_length())):
            active = np.flatnonzero(lo < hi)
            if not active.size:
                break
            mid = (lo[active] + hi[active]) // 2
            right, _ = compare(mid, active)
            lo[active[right]] = mid[right] + 1
            hi[active[~right]] = mid[~right]
        p = lo
        lcp_at = np.zeros(q, dtype=np.int64)
        lcp_before = np.zeros(q, dtype=np.int64)
        rows = np.flatnonzero(p < size)
        if rows.size:
            lcp_at[rows] = compare(p[rows], rows)[1]
        rows = np.flatnonzero(p > 0)
        if rows.size:
            lcp_before[rows] = compare(p[rows] - 1, rows)[1]
        return p, lcp_at, lcp_before

    def _span(self, span: Any, name: str = "span") -> np.ndarray:
        arr = _as_token_array(span, name)
        if arr.shape[0] == 0:
            raise ValueError(f"{name} is empty: pass at least one token id (an empty span occurs everywhere)")
        if arr.min() < 0:
            raise ValueError(f"{name} holds the negative token id {int(arr.min())}; token ids are >= 0")
        return arr

    def _range(self, span: np.ndarray) -> tuple[int, int]:
        q = span[None, :]
        ln = np.array([span.shape[0]], dtype=np.int64)
        lo = int(self._search(q, ln, upper=False)[0][0])
        hi = int(self._search(q, ln, upper=True)[0][0])
        return lo, hi

    def count(self, span: Any) -> int:
        """Number of occurrences of ``span`` (a 1-D token sequence) inside training documents.

        Example:
            >>> TokenIndex.build([[1, 1, 1]], progress=False).count([1, 1])
            2
        """
        arr = self._span(span)
        if arr.shape[0] > self._max_run:
            return 0
        lo, hi = self._range(arr)
        return hi - lo

    def counts(self, spans: Any) -> np.ndarray:
        """:meth:`count` of each row of ``spans`` (``[Q, m]`` equal-length spans) in one batched search.

        Example:
            >>> TokenIndex.build([[1, 2, 1, 2]], progress=False).counts([[1, 2], [2, 1], [2, 2]]).tolist()
            [2, 1, 0]
        """
        if hasattr(spans, "detach") and hasattr(spans, "cpu"):
            spans = spans.detach().cpu().numpy()
        arr = np.asarray(spans)
        if arr.ndim != 2 or arr.shape[1] == 0:
            raise ValueError(f"spans must be 2-D [Q, m] with m >= 1 tokens, got shape {arr.shape}")
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"spans must hold integer token ids, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        out = np.zeros(arr.shape[0], dtype=np.int64)
        if arr.shape[1] > self._max_run or arr.shape[0] == 0:
            return out
        q = np.where(arr < 0, -2, arr)
        ln = np.full(arr.shape[0], arr.shape[1], dtype=np.int64)
        step = max(1, _CHUNK_ELEMENTS // arr.shape[1])
        for s in range(0, arr.shape[0], step):
            lo = self._search(q[s : s + step], ln[s : s + step], upper=False)[0]
            hi = self._search(q[s : s + step], ln[s : s + step], upper=True)[0]
            out[s : s + step] = hi - lo
        return out

    def find(self, span: Any, limit: int | None = None) -> list[tuple[int, int]]:
        """Every occurrence of ``span`` as ``(document, offset)``, sorted.

        Args:
            span: 1-D token sequence.
            limit: read at most this many occurrences (in suffix-array order, so not necessarily
                the first documents) before sorting them; ``None`` returns all.

        Example:
            >>> TokenIndex.build([[7, 8], [0, 7, 8]], progress=False).find([7, 8])
            [(0, 0), (1, 1)]
        """
        arr = self._span(span)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
            raise ValueError(f"limit must be None or an integer >= 0, got {limit!r}")
        if arr.shape[0] > self._max_run:
            return []
        lo, hi = self._range(arr)
        if limit is not None:
            hi = min(hi, lo + int(limit))
        return self._locate(np.asarray(self._sa[lo:hi], dtype=np.int64))

    def _locate(self, positions: np.ndarray) -> list[tuple[int, int]]:
        docs = np.searchsorted(self._doc_starts, positions, side="right") - 1
        offsets = positions - self._doc_starts[docs]
        order = np.lexsort((offsets, docs))
        return [(int(d), int(o)) for d, o in zip(docs[order], offsets[order])]

    def longest_prefix_match(self, tokens: Any) -> int:
        """Length of the longest prefix of ``tokens`` that occurs inside one training document.

        Example:
            >>> TokenIndex.build([[1, 2, 3], [2, 3, 4]], progress=False).longest_prefix_match([2, 3, 9])
            2
        """
        arr = _as_token_array(tokens, "tokens")
        if arr.shape[0] == 0:
            return 0
        return int(self.matching_lengths(arr[None, :])[0, 0])

    def matching_lengths(self, tokens: Any) -> np.ndarray:
        """``out[n, i]``: the longest prefix of ``tokens[n, i:]`` that occurs in training.

        These are the matching statistics of each row against the training set: row ``n`` holds
        a training span of at least ``L`` tokens starting at ``i`` iff ``out[n, i] >= L``.
        Negative ids (padding written as ``-1``) never match.

        Args:
            tokens: integer token ids ``[N, T]`` (numpy array or tensor).

        Returns:
            ``int64 [N, T]``.

        Example:
            >>> TokenIndex.build([[1, 2, 3]], progress=False).matching_lengths([[0, 1, 2, 3]]).tolist()
            [[0, 3, 2, 1]]
        """
        if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):
            tokens = tokens.detach().cpu().numpy()
        arr = np.asarray(tokens)
        if arr.ndim != 2:
            raise ValueError(f"tokens must be 2-D [N, T], got shape {arr.shape}; use tokens[None] for one sequence")
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"tokens must hold integer token ids, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        n, t = arr.shape
        out = np.zeros((n, t), dtype=np.int64)
        m = min(t, self._max_run)
        if n == 0 or m == 0:
            return out
        # query (n, i) = tokens[n, i:i+m], padded with -2 (never equal to a stream value)
        padded = np.full((n, t + m), -2, dtype=np.int64)
        padded[:, :t] = np.where(arr < 0, -2, arr)
        starts = np.arange(t)
        lengths_row = np.minimum(m, t - starts)
        flat_rows = np.repeat(np.arange(n), t)
        flat_starts = np.tile(starts, n)
        flat_len = np.tile(lengths_row, n)
        step = max(1, _CHUNK_ELEMENTS // m)
        result = np.empty(n * t, dtype=np.int64)
        for s in range(0, n * t, step):
            rows = flat_rows[s : s + step]
            st = flat_starts[s : s + step]
            q = padded[rows[:, None], st[:, None] + np.arange(m)[None, :]]
            _, a, b = self._search(q, flat_len[s : s + step], upper=False)
            result[s : s + step] = np.maximum(a, b)
        out[:] = result.reshape(n, t)
        return out

    def occurrences(self, spans: Any, max_per_span: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where each row of ``spans`` (``[Q, m]``, equal-length) occurs, in one batched search.

        Args:
            spans: integer token ids ``[Q, m]``.
            max_per_span: read at most this many occurrences per span (``None``: all).

        Returns:
            ``(rows, docs, offsets)``, three ``int64`` arrays with one entry per occurrence: the
            span's row in ``spans``, the document and the offset in it (grouped by row; within a
            row in suffix-array order).

        Example:
            >>> rows, docs, offs = TokenIndex.build([[1, 2], [0, 1, 2]], progress=False).occurrences([[1, 2], [2, 2]])
            >>> rows.tolist(), sorted(zip(docs.tolist(), offs.tolist()))
            ([0, 0], [(0, 0), (1, 1)])
        """
        if hasattr(spans, "detach") and hasattr(spans, "cpu"):
            spans = spans.detach().cpu().numpy()
        arr = np.asarray(spans)
        if arr.ndim != 2 or arr.shape[1] == 0:
            raise ValueError(f"spans must be 2-D [Q, m] with m >= 1 tokens, got shape {arr.shape}")
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"spans must hold integer token ids, got dtype {arr.dtype}")
        empty = np.zeros(0, dtype=np.int64)
        if arr.shape[0] == 0 or arr.shape[1] > self._max_run:
            return empty, empty, empty
        q = np.where(arr < 0, -2, arr.astype(np.int64, copy=False))
        ln = np.full(q.shape[0], q.shape[1], dtype=np.int64)
        lo = self._search(q, ln, upper=False)[0]
        hi = self._search(q, ln, upper=True)[0]
        if max_per_span is not None:
            hi = np.minimum(hi, lo + int(max_per_span))
        num = hi - lo
        rows = np.repeat(np.arange(q.shape[0], dtype=np.int64), num)
        if not rows.size:
            return empty, empty, empty
        # slot of each occurrence: lo[row] + rank within its row
        first = np.cumsum(num) - num
        slots = lo[rows] + (np.arange(rows.shape[0]) - first[rows])
        pos = np.asarray(self._sa[slots], dtype=np.int64)
        docs = np.searchsorted(self._doc_starts, pos, side="right") - 1
        return rows, docs, pos - self._doc_starts[docs]

    def span_documents(self, span: Any, limit: int | None = None) -> np.ndarray:
        """Distinct documents holding ``span`` (sorted ``int64``), at most ``limit`` occurrences read.

        Example:
            >>> TokenIndex.build([[1, 2], [1, 2, 1, 2]], progress=False).span_documents([1, 2]).tolist()
            [0, 1]
        """
        arr = self._span(span)
        if arr.shape[0] > self._max_run:
            return np.zeros(0, dtype=np.int64)
        lo, hi = self._range(arr)
        if limit is not None:
            hi = min(hi, lo + int(limit))
        pos = np.asarray(self._sa[lo:hi], dtype=np.int64)
        return np.unique(np.searchsorted(self._doc_starts, pos, side="right") - 1)

    # ------------------------------------------------------------------ files
    def _meta(self) -> dict:
        return {"format": FORMAT, "params": self.params}

    @staticmethod
    def _digest(arrays: Mapping[str, np.ndarray], meta_json: str) -> str:
        h = hashlib.sha256()
        h.update(f"{FORMAT}\0meta\0{meta_json}\0".encode())
        for name in _ARRAYS:
            a = np.ascontiguousarray(arrays[name])
            h.update(f"{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
            h.update(memoryview(a).cast("B"))
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to ``path`` (``.npz``, atomic, with a SHA-256 integrity digest).

        Returns:
            The path written.

        Example:
            >>> import tempfile, pathlib
            >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.npz"
            >>> _ = TokenIndex.build([[1, 2, 3]], progress=False).save(p)
            >>> TokenIndex.load(p).count([2, 3])
            1
        """
        path = Path(path)
        arrays = {"stream": self._stream, "suffix_array": self._sa, "doc_starts": self._doc_starts}
        meta_json = json.dumps(self._meta(), sort_keys=True)
        digest = self._digest(arrays, meta_json)
        with atomic_open(path, "wb") as f:
            np.savez(f, **arrays, meta=np.array(meta_json), sha256=np.array(digest))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenIndex:
        """Read an index written by :meth:`save` (never unpickles).

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: ``"not a valid antimemo token index (truncated/corrupt): <path>"`` for a
                file that is not a complete index, or ``"... <path> was modified ..."`` when its
                arrays or metadata do not match the SHA-256 digest saved with them.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no token index at {str(path)!r}; {_REBUILD}")

        def corrupt(detail: str) -> ValueError:
            return ValueError(f"not a valid antimemo token index (truncated/corrupt): {str(path)!r}; {detail}; {_REBUILD}")

        try:
            with np.load(path, allow_pickle=False) as z:
                names = set(z.files)
                missing = sorted((set(_ARRAYS) | {"meta", "sha256"}) - names)
                if missing:
                    raise corrupt(f"missing arrays {missing}")
                arrays = {name: z[name] for name in _ARRAYS}
                meta_raw, digest_raw = z["meta"], z["sha256"]
        except ValueError as err:
            if str(err).startswith("not a valid antimemo token index"):
                raise
            raise corrupt(f"{type(err).__name__}: {err}") from err
        except (FileNotFoundError, PermissionError, MemoryError):
            raise
        except Exception as err:  # BadZipFile, EOFError, zlib.error, OSError, AttributeError (a lone .npy)
            raise corrupt(f"{type(err).__name__}: {err}") from err
        if meta_raw.dtype.kind != "U" or meta_raw.shape != () or digest_raw.dtype.kind != "U" or digest_raw.shape != ():
            raise corrupt("its 'meta' / 'sha256' entries are not strings")
        meta_json, digest = str(meta_raw[()]), str(digest_raw[()])
        if cls._digest(arrays, meta_json) != digest:
            raise ValueError(
                f"antimemo token index {str(path)!r} was modified after it was saved: its arrays or metadata do not "
                f"match the SHA-256 digest stored with them (edited, or damaged on disk); {_REBUILD}"
            )
        try:
            meta = json.loads(meta_json)
        except json.JSONDecodeError as err:
            raise corrupt("its metadata is not JSON") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise corrupt(f"format {meta.get('format') if isinstance(meta, dict) else None!r} is not {FORMAT!r}")
        stream, sa, starts = arrays["stream"], arrays["suffix_array"], arrays["doc_starts"]
        if (stream.ndim != 1 or sa.ndim != 1 or starts.ndim != 1 or stream.dtype.kind != "i" or sa.dtype.kind != "i"
                or starts.dtype.kind != "i" or not stream.size or stream[-1] >= 0 or not starts.size):
            raise corrupt("its arrays do not have the layout of a token index")
        return cls(stream, sa, starts.astype(np.int64, copy=False), meta.get("params", {}))
