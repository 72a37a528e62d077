"""Vectorised MinHash over word or token n-gram shingles (numpy, or numba kernels when installed).

Pipeline for one chunk of documents:

1. every *element* (a normalised word, or a token id) gets a stable 64-bit hash, vectorised over
   the UTF-8 bytes of the chunk (:func:`text_element_hashes`) or the ``fmix64`` finalizer of the
   salted token id; two polynomial folds of a document's element hashes give its 128-bit
   exact-duplicate key (:func:`sequence_keys`);
2. every n-gram of consecutive elements gets a 64-bit shingle hash, a wrapping polynomial (odd
   multiplier, modulo ``2**64``) over its (already avalanched) element hashes, computed for all
   documents of the chunk at once; a document shorter than ``n`` has one shingle, the whole
   sequence (salted with its length);
3. MinHash with the permutation scheme of datasketch 2.x (``"affine32"``): the shingle's 32-bit
   input hash (the high half of the 64-bit shingle hash) is pre-mixed with ``fmix32`` and permuted
   by ``h -> a_k * h + b_k mod 2**32`` with odd ``a_k`` (a bijection), ``a, b`` drawn exactly like
   ``datasketch.MinHash(seed=seed, num_perm=num_perm)``; the signature is the per-document
   minimum, reduced with ``np.minimum.reduceat`` over cache-sized blocks of documents and
   permutations;
4. LSH band keys: each band of ``rows`` signature values is folded into one 64-bit key.

Given the same 32-bit input hashes, :func:`signatures` equals datasketch's ``MinHash.hashvalues``
bit for bit (``benchmarks/dedup_bench.py`` checks it).

When numba is installed (``pip install 'antimemo[dedup]'``), the word hashing and the signatures
run as fused compiled loops (:mod:`antimemo.dedup._kernels`) with bit-identical outputs; without
it the numpy code below runs (same outputs, slower), and one INFO log line says so.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from dataclasses import dataclass

import numpy as np

from antimemo.dedup.normalize import content_hash, normalize_text, token_array

__all__ = [
    "ShingleConfig",
    "band_keys",
    "fmix32",
    "fmix64",
    "permutations",
    "shingle_hashes",
    "signatures",
    "sequence_keys",
    "text_element_hashes",
    "token_element_hashes",
]

_U64 = np.uint64
_U32 = np.uint32
_MAX32 = np.uint32(0xFFFFFFFF)
_POLY = _U64(0x9E3779B97F4A7C15)  # odd multiplier of the n-gram polynomial (golden ratio * 2**64)
_SHORT_SALT = _U64(0xD6E8FEB86659FD93)  # distinguishes whole-sequence shingles of short documents
_TOKEN_SALT = _U64(0x2545F4914F6CDD1D)
_BLOCK = 8192  # shingles per block of the permutation step
_ROWS = 32  # permutations per pass over a block: 32 x 8192 x 4 B = 1 MiB (fastest measured, 2 MiB L2)

logger = logging.getLogger(__name__)
#: The compiled kernels module; ``None`` until first use, ``False`` when numba is unavailable (the
#: numpy code runs then; tests set it to ``False`` to compare both paths).
_KERNELS = None


def _compiled():
    """:mod:`antimemo.dedup._kernels`, imported on first use, or ``None`` without numba (logged once)."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from antimemo.dedup import _kernels

            _KERNELS = _kernels
        except ImportError as err:
            _KERNELS = False
            logger.info("%s; running the numpy MinHash code instead (same outputs, slower)", err)
    return _KERNELS or None


@dataclass(frozen=True)
class ShingleConfig:
    """Parameters shared by every chunk of one index build (picklable, sent to worker processes).

    Args:
        ngram: shingle length in elements (words or tokens).
        num_perm: number of MinHash permutations.
        seed: seed of the permutation parameters (``np.random.RandomState(seed)``, as datasketch).
        bands: LSH bands.
        rows: signature rows per band (``bands * rows <= num_perm``).

    Example:
        >>> ShingleConfig(ngram=5, num_perm=128, seed=0, bands=16, rows=8).bands
        16
    """

    ngram: int
    num_perm: int
    seed: int
    bands: int
    rows: int


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3 64-bit finalizer (an avalanching bijection on ``uint64``), element-wise.

    Args:
        x: ``uint64`` array.

    Returns:
        A new ``uint64`` array.

    Example:
        >>> int(fmix64(np.array([0, 1], dtype=np.uint64))[1]) != 1
        True
    """
    x = np.asarray(x, dtype=_U64)
    x = x ^ (x >> _U64(33))
    x = x * _U64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> _U64(33))
    x = x * _U64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> _U64(33))


def fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3 32-bit finalizer, element-wise (the pre-mix of datasketch's ``affine32`` scheme).

    Args:
        x: ``uint32`` array.

    Returns:
        A new ``uint32`` array.

    Example:
        >>> int(fmix32(np.array([1], dtype=np.uint32))[0]) != 1
        True
    """
    x = np.asarray(x, dtype=_U32)
    x = x ^ (x >> _U32(16))
    x = x * _U32(0x85EBCA6B)
    x = x ^ (x >> _U32(13))
    x = x * _U32(0xC2B2AE35)
    return x ^ (x >> _U32(16))


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``affine32`` permutation parameters ``(a, b)``, identical to datasketch 2.x for a seed.

    ``a`` is odd, so ``h -> a * h + b mod 2**32`` is a bijection of 32-bit values.

    Args:
        num_perm: number of permutations.
        seed: seed of ``np.random.RandomState`` (the legacy generator, whose stream is stable).

    Returns:
        Two ``uint32`` arrays of length ``num_perm``.

    Example:
        >>> a, b = permutations(4, seed=1)
        >>> bool(np.all(a % 2 == 1))
        True
    """
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=_U32) * _U32(2) + _U32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=_U32)
    return a, b


_NFKC_SPACES = ("\x85", "\u1680", "\u2028", "\u2029")  # the whitespace NFKC leaves non-ASCII
_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[[0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20]] = True  # str.split()'s ASCII set
_SEP_WITH_NUL = _ASCII_SPACE.copy()
_SEP_WITH_NUL[0] = True
_BYTE_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=_U64)  # low k bytes
_LONG_WORD = 64  # words longer than this many bytes are hashed with BLAKE2b one by one (rare)


def text_element_hashes(texts: list[str], max_chars: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Normalise texts and hash their words, vectorised over the UTF-8 bytes of a batch.

    The words are those of :func:`~antimemo.dedup.normalize.normalized_words` (NFKC, case-folded,
    split on whitespace); normalisation runs once on the batch joined with NUL separators (texts
    that contain NUL are normalised one by one). A word's UTF-8 bytes are read as little-endian
    8-byte blocks (the last one zero-padded), folded by a polynomial modulo ``2**64``, salted with
    the byte length and finalised with ``fmix64``; words longer than 64 bytes use BLAKE2b-8. The
    hash depends only on the word, so it is the same in every chunk, process and machine.

    Args:
        texts: raw texts.
        max_chars: characters normalised and hashed per numpy batch (bounds temporary memory).
            The default 65,536 keeps the temporaries near 1 MiB: batches of 1 MiB of text ran
            2.3x slower, on fresh memory pages (page faults) rather than on arithmetic.

    Returns:
        ``(lengths, hashes)``: words per text (``int64 [D]``) and the ``uint64`` hashes of all
        words, concatenated in text order.

    Example:
        >>> lengths, h = text_element_hashes(["a B a", "", "b"])
        >>> lengths.tolist(), bool(h[0] == h[2] != h[1]), bool(h[1] == h[3])
        ([3, 0, 1], True, True)
    """
    n_docs = len(texts)
    lengths = np.zeros(n_docs, dtype=np.int64)
    parts: list[np.ndarray] = []
    i = 0
    while i < n_docs:
        j, size = i, 0
        while j < n_docs and (j == i or size + len(texts[j]) + 1 <= max_chars):
            size += len(texts[j]) + 1
            j += 1
        batch = texts[i:j]
        joined = "\x00".join(batch)
        if joined.count("\x00") == len(batch) - 1:
            # NFKC and case folding act within NUL-separated segments, so each text is normalised
            # alone; ASCII texts (most of them) are NFKC-stable and only lower-cased, and the slow
            # NFKC scan runs over the non-ASCII texts only
            if joined.isascii():
                big = joined.lower()
            else:
                big = "\x00".join([t.lower() if t.isascii() else _fold(t) for t in batch])
            lens, h = _word_hashes_bytes(big.encode("utf-8", "surrogatepass"), _SEP_WITH_NUL, 0x00)
        else:  # a text contains NUL: normalise one by one, words then contain no whitespace
            norm = "\n".join(normalize_text(t) for t in batch)
            lens, h = _word_hashes_bytes(norm.encode("utf-8", "surrogatepass"), _ASCII_SPACE, 0x0A)
        lengths[i:j] = lens
        parts.append(h)
        i = j
    return lengths, (np.concatenate(parts) if parts else np.zeros(0, dtype=_U64))


def _fold(text: str) -> str:
    """NFKC, case-folded, with the whitespace NFKC leaves non-ASCII turned into spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    for ch in _NFKC_SPACES:
        if ch in text:
            text = text.replace(ch, " ")
    return text


def _fmix64_(x: np.ndarray) -> np.ndarray:
    """:func:`fmix64` in place on a ``uint64`` array (one temporary instead of five)."""
    t = np.empty_like(x)
    for mult in (_U64(0xFF51AFD7ED558CCD), _U64(0xC4CEB9FE1A85EC53)):
        np.right_shift(x, _U64(33), out=t)
        x ^= t
        x *= mult
    np.right_shift(x, _U64(33), out=t)
    x ^= t
    return x


def _word_hashes_bytes(raw: bytes, separators: np.ndarray, doc_sep: int) -> tuple[np.ndarray, np.ndarray]:
    kernels = _compiled()
    if kernels is not None:
        lengths, h, long_idx, long_starts, long_ends = kernels.word_hashes_kernel(
            np.frombuffer(raw, dtype=np.uint8), separators, doc_sep, raw.count(bytes([doc_sep])) + 1, _LONG_WORD
        )
        for w, s, e in zip(long_idx.tolist(), long_starts.tolist(), long_ends.tolist()):
            h[w] = content_hash(raw[s:e]) ^ 0x5BD1E995
        return lengths, h
    m = len(raw)
    # data[0] and data[m + 1:] are padding: words never start or end there, and every 8-byte read
    # starting inside the text stays inside the buffer (read-only view of one bytes object)
    data = np.frombuffer(b"\x00" + raw + b"\x00" * 8, dtype=np.uint8)
    # every separator byte is <= 0x20: look only at those positions (mostly single spaces)
    low = np.flatnonzero(data[1 : m + 1] <= 0x20) + 1
    sep = low[separators[data[low]]]
    # words are the non-empty gaps between consecutive separators (data[0], data[m + 1] act as ones)
    bounds = np.concatenate(([0], sep, [m + 1]))
    gap_start, gap_end = bounds[:-1] + 1, bounds[1:]
    nonempty = gap_end > gap_start
    starts, ends = gap_start[nonempty], gap_end[nonempty]
    per_doc = np.searchsorted(starts, sep[data[sep] == doc_sep])
    lengths = np.diff(np.concatenate(([0], per_doc, [starts.shape[0]]))).astype(np.int64)
    if starts.shape[0] == 0:
        return lengths, np.zeros(0, dtype=_U64)
    wlen = ends - starts
    le64 = np.ndarray((m + 2,), dtype="<u8", buffer=data, strides=(1,))  # le64[p] = bytes p..p+7
    acc = le64[starts] & _BYTE_MASKS[np.minimum(wlen, 8)]
    active = np.flatnonzero(wlen > 8)  # words with another 8-byte block; shrinks with q
    for q in range(1, min(int(wlen.max()), _LONG_WORD + 7) // 8 + 1):
        if q > 1:
            active = active[wlen[active] > 8 * q]
        if active.shape[0] == 0:
            break
        block = le64[starts[active] + 8 * q] & _BYTE_MASKS[np.minimum(wlen[active] - 8 * q, 8)]
        acc[active] = acc[active] * _POLY + block
    acc ^= wlen.astype(_U64) * _SHORT_SALT
    h = _fmix64_(acc)
    for w in np.flatnonzero(wlen > _LONG_WORD).tolist():
        h[w] = content_hash(raw[starts[w] - 1 : ends[w] - 1]) ^ 0x5BD1E995
    return lengths, h


_KEY_BASES = (_U64(0xA0761D6478BD642F), _U64(0xE7037ED1A0B428DB))  # odd bases of the two key folds
_POWERS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _powers(base: _U64, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``base**k`` and ``base**-k`` modulo ``2**64`` for ``k < m`` (cached per process)."""
    cached = _POWERS.get(int(base))
    if cached is None or cached[0].shape[0] < m:
        size = max(m, 1 << 16)
        pw = np.full(size, base, dtype=_U64)
        pw[0] = 1
        np.multiply.accumulate(pw, out=pw)
        inv = np.full(size, _U64(pow(int(base), -1, 1 << 64)), dtype=_U64)
        inv[0] = 1
        np.multiply.accumulate(inv, out=inv)
        cached = _POWERS[int(base)] = (pw, inv)
    return cached[0][:m], cached[1][:m]


def sequence_keys(elements: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """128-bit exact-duplicate keys of element sequences: two polynomial folds of their hashes.

    Equal sequences get equal keys; different ones collide with probability about ``2**-128``
    per pair for random element hashes.

    Args:
        elements: ``uint64`` element hashes of all sequences, concatenated.
        lengths: elements per sequence.

    Returns:
        ``uint64 [D, 2]``.

    Example:
        >>> k = sequence_keys(np.array([5, 6, 5, 6, 6, 5], dtype=np.uint64), np.array([2, 2, 2, 0]))
        >>> bool((k[0] == k[1]).all()), bool((k[0] == k[2]).any()), bool((k[3] == k[0]).any())
        (True, False, False)
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    kernels = _compiled()
    if kernels is not None:
        return kernels.sequence_keys_kernel(
            np.ascontiguousarray(elements, dtype=_U64),
            np.ascontiguousarray(lengths),
            np.array(_KEY_BASES, dtype=_U64),
            np.array((_SHORT_SALT, _TOKEN_SALT), dtype=_U64),
        )
    bounds = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    s, e = bounds[:-1], bounds[1:]
    out = np.empty((lengths.shape[0], 2), dtype=_U64)
    for col, (base, salt) in enumerate(zip(_KEY_BASES, (_SHORT_SALT, _TOKEN_SALT))):
        pw, inv = _powers(base, elements.shape[0] + 1)
        prefix = np.zeros(elements.shape[0] + 1, dtype=_U64)
        np.cumsum(elements * pw[: elements.shape[0]], out=prefix[1:])
        key = (prefix[e] - prefix[s]) * inv[s]
        key ^= lengths.astype(_U64) * salt
        out[:, col] = fmix64(key)
    return out


def token_element_hashes(ids: np.ndarray) -> np.ndarray:
    """64-bit hashes of token ids (splitmix64-style finalizer of the salted id).

    Args:
        ids: ``int64`` token ids.

    Returns:
        ``uint64`` array of the same length.

    Example:
        >>> h = token_element_hashes(np.array([7, 7, 8]))
        >>> bool(h[0] == h[1] != h[2])
        True
    """
    return fmix64(np.asarray(ids, dtype=np.int64).view(_U64) ^ _TOKEN_SALT)


def shingle_hashes(elements: np.ndarray, lengths: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the n-gram shingles of a batch of documents, vectorised.

    Args:
        elements: ``uint64`` element hashes of all documents, concatenated.
        lengths: number of elements per document (sums to ``len(elements)``).
        ngram: shingle length ``n``. A document with ``1 <= m < n`` elements has one shingle (the
            whole sequence); an empty document has none.

    Returns:
        ``(hashes, offsets)``: ``uint64`` shingle hashes of all documents concatenated (with
        repeats if a document repeats an n-gram) and ``int64`` offsets of length ``D + 1``.

    Example:
        >>> e = np.arange(1, 8, dtype=np.uint64)
        >>> h, off = shingle_hashes(e, np.array([5, 2]), ngram=3)
        >>> off.tolist()  # 5 - 3 + 1 = 3 shingles, then 1 whole-sequence shingle
        [0, 3, 4]
    """
    if int(ngram) < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram!r}; e.g. ngram=5 (5-word shingles)")
    lengths = np.asarray(lengths, dtype=np.int64)
    n_docs = lengths.shape[0]
    starts = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    counts = np.where(lengths >= ngram, lengths - ngram + 1, np.minimum(lengths, 1))
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=_U64)
    kernels = _compiled()
    if kernels is not None:
        kernels.shingle_hashes_kernel(np.ascontiguousarray(elements, dtype=_U64), lengths, offsets, int(ngram), out)
        return out, offsets
    total = elements.shape[0]
    full = lengths >= ngram
    if total >= ngram and full.any():
        m = total - ngram + 1
        g = elements[:m].copy()
        for k in range(1, ngram):
            g *= _POLY
            g += elements[k : k + m]
        # drop the windows that run past the end of their document: those starting at one of
        # the last ngram - 1 positions of a document
        valid = np.ones(m, dtype=bool)
        doc_start, doc_end = starts[:-1], starts[1:]
        for k in range(1, ngram):
            pos = doc_end - k
            pos = pos[(pos >= doc_start) & (pos < m)]
            valid[pos] = False
        dest = np.repeat(full, counts)
        out[dest] = g[valid]
    short = np.flatnonzero((lengths > 0) & (lengths < ngram))
    mask = (1 << 64) - 1
    for d in short.tolist():  # rare: documents shorter than one shingle (Python ints, mod 2**64)
        acc = 0
        for v in elements[starts[d] : starts[d + 1]].tolist():
            acc = (acc * int(_POLY) + v) & mask
        acc ^= (int(_SHORT_SALT) * int(lengths[d])) & mask
        out[offsets[d]] = fmix64(np.array([acc], dtype=_U64))[0]
    return out, offsets


def signatures(
    shingles64: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray, block: int = _BLOCK
) -> np.ndarray:
    """MinHash signatures of documents given their 64-bit shingle hashes (``affine32`` scheme).

    Args:
        shingles64: ``uint64`` shingle hashes, concatenated over documents.
        offsets: ``int64`` document offsets into ``shingles64`` (length ``D + 1``).
        a, b: permutation parameters from :func:`permutations`.
        block: shingles per block of the numpy permutation step (memory ``block * 32 * 4`` bytes, up
            to 4 times that for a block of whole documents); the compiled kernel keeps one
            ``num_perm`` running minimum per document instead and ignores it.

    Returns:
        ``uint32`` array ``[D, num_perm]``; a document without shingles gets ``2**32 - 1``
        everywhere (datasketch's empty value).

    Example:
        >>> a, b = permutations(8, seed=0)
        >>> s = signatures(np.array([1, 2, 3], dtype=np.uint64) << np.uint64(32), np.array([0, 3, 3]), a, b)
        >>> s.shape, int(s[1, 0]) == 2**32 - 1
        ((2, 8), True)
    """
    kernels = _compiled()
    if kernels is not None:
        return kernels.signatures_kernel(
            np.ascontiguousarray(shingles64, dtype=_U64),
            np.ascontiguousarray(offsets, dtype=np.int64),
            np.ascontiguousarray(a, dtype=_U32),
            np.ascontiguousarray(b, dtype=_U32),
        )
    n_docs = offsets.shape[0] - 1
    num_perm = a.shape[0]
    out = np.full((num_perm, n_docs), _MAX32, dtype=_U32)
    hv = fmix32((shingles64 >> _U64(32)).astype(_U32))
    a_col = a[:, None]
    b_col = b[:, None]
    rows = min(num_perm, _ROWS)
    # reused (no page faults per block); rows x block values of 4 bytes stay in the L2 cache, which
    # matters more than the number of numpy calls: all 128 rows at once ran 1.5x slower
    buf = np.empty(rows * 4 * block, dtype=_U32)
    nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])
    ne_ends = offsets[nonempty + 1]
    i = 0
    n_ne = nonempty.shape[0]
    while i < n_ne:
        lo = offsets[nonempty[i]]
        # the largest j such that the documents nonempty[i:j] hold at most `block` shingles
        j = max(int(np.searchsorted(ne_ends, lo + block, side="right")), i + 1)
        docs = nonempty[i:j]
        hi = ne_ends[j - 1]
        if hi - lo <= 4 * block:
            seg = offsets[docs] - lo
            for r in range(0, num_perm, rows):
                r1 = min(num_perm, r + rows)
                h = buf[: (r1 - r) * (hi - lo)].reshape(r1 - r, hi - lo)  # dense rows: no cache aliasing
                np.multiply(a_col[r:r1], hv[None, lo:hi], out=h)
                np.add(h, b_col[r:r1], out=h)
                out[r:r1, docs] = np.minimum.reduceat(h, seg, axis=1)
        else:  # one very long document: running minimum over sub-blocks
            acc = out[:, docs[0]].copy()
            for s in range(lo, hi, block):
                for r in range(0, num_perm, rows):
                    r1 = min(num_perm, r + rows)
                    h = buf[: (r1 - r) * (min(hi, s + block) - s)].reshape(r1 - r, -1)
                    np.multiply(a_col[r:r1], hv[None, s : s + h.shape[1]], out=h)
                    np.add(h, b_col[r:r1], out=h)
                    np.minimum(acc[r:r1], h.min(axis=1), out=acc[r:r1])
            out[:, docs[0]] = acc
        i = j
    return np.ascontiguousarray(out.T)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Fold each LSH band of ``rows`` signature values into one 64-bit key.

    Args:
        sigs: ``uint32`` signatures ``[D, num_perm]``.
        bands: number of bands.
        rows: rows per band (``bands * rows <= num_perm``; the remaining permutations are unused).

    Returns:
        ``uint64`` array ``[D, bands]``; two documents are LSH candidates when they share the key
        of at least one band.

    Example:
        >>> s = np.array([[1, 2, 3, 4], [1, 2, 9, 9]], dtype=np.uint32)
        >>> k = band_keys(s, bands=2, rows=2)
        >>> bool(k[0, 0] == k[1, 0]), bool(k[0, 1] == k[1, 1])
        (True, False)
    """
    if bands * rows > sigs.shape[1]:
        raise ValueError(f"bands * rows = {bands * rows} exceeds num_perm = {sigs.shape[1]}")
    # all bands at once: acc[d, j] starts at j + 1 and folds in the band's rows one by one
    s64 = sigs[:, : bands * rows].reshape(sigs.shape[0], bands, rows).astype(_U64)
    keys = np.empty((sigs.shape[0], bands), dtype=_U64)
    keys[:] = np.arange(1, bands + 1, dtype=_U64)
    for t in range(rows):
        keys *= _POLY
        keys += s64[:, :, t]
    return _fmix64_(keys)


# --------------------------------------------------------------------------------------------
# chunk workers (module-level so that multiprocessing can pickle them)


def _text_content_hashes(texts: list[str]) -> np.ndarray:
    """:func:`~antimemo.dedup.normalize.content_hash` of each text's UTF-8, inlined in one generator."""
    blake, frombytes = hashlib.blake2b, int.from_bytes
    return np.fromiter(
        (frombytes(blake(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little") for t in texts),
        dtype=_U64,
        count=len(texts),
    )


def _text_elements(texts: list, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(
                f"texts[{base + i}] must be a str, got {type(t).__name__}; for token ids use "
                "DuplicateIndex.from_token_ids(seqs)"
            )
    content = _text_content_hashes(texts)
    lengths, elements = text_element_hashes(texts)
    return content, lengths, sequence_keys(elements, lengths), elements


def _token_elements(seqs: list, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    content = np.empty(len(seqs), dtype=_U64)
    lengths = np.empty(len(seqs), dtype=np.int64)
    arrays = []
    for i, s in enumerate(seqs):
        arr = token_array(s, where=f"seqs[{base + i}]")
        content[i] = content_hash(arr.astype("<i8", copy=False).tobytes())
        lengths[i] = arr.shape[0]
        arrays.append(arr)
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    elements = token_element_hashes(ids)
    return content, lengths, sequence_keys(elements, lengths), elements


def _elements(kind: str, items: list, base: int):
    if kind == "text":
        return _text_elements(items, base)
    if kind == "tokens":
        return _token_elements(items, base)
    raise ValueError(f"kind must be 'text' or 'tokens', got {kind!r}")


def sketch_chunk(kind: str, items: list, base: int, cfg: ShingleConfig) -> dict:
    """Process one chunk: content hashes, exact keys, shingle counts and LSH band keys.

    Args:
        kind: ``"text"`` or ``"tokens"``.
        items: the chunk's texts or token sequences.
        base: index of the chunk's first item in the dataset (for error messages).
        cfg: the build parameters.

    Returns:
        A dict of numpy arrays: ``content`` (``uint64 [d]``), ``exact`` (``uint64 [d, 2]``),
        ``num_shingles`` (``int64 [d]``), ``bands`` (``uint64 [d, bands]``).

    Example:
        >>> cfg = ShingleConfig(ngram=2, num_perm=16, seed=0, bands=4, rows=4)
        >>> sketch_chunk("text", ["a b c", "A  B c"], 0, cfg)["bands"].shape
        (2, 4)
    """
    content, lengths, exact, elements = _elements(kind, items, base)
    sh, off = shingle_hashes(elements, lengths, cfg.ngram)
    a, b = permutations(cfg.num_perm, cfg.seed)
    sig = signatures(sh, off, a, b)
    return {
        "content": content,
        "exact": exact,
        "num_shingles": np.diff(off),
        "bands": band_keys(sig, cfg.bands, cfg.rows),
    }


def shingle_sets_chunk(kind: str, items: list, base: int, ngram: int) -> list[np.ndarray]:
    """Sorted unique 64-bit shingle hashes of each item (the sets whose Jaccard is verified).

    Args:
        kind: ``"text"`` or ``"tokens"``.
        items: texts or token sequences.
        base: index of the first item (for error messages).
        ngram: shingle length.

    Returns:
        One sorted ``uint64`` array per item.

    Example:
        >>> [s.size for s in shingle_sets_chunk("text", ["a b c a b", "x"], 0, ngram=2)]
        [3, 1]
    """
    _, lengths, _, elements = _elements(kind, items, base)
    sh, off = shingle_hashes(elements, lengths, ngram)
    return [np.unique(sh[off[i] : off[i + 1]]) for i in range(len(items))]
