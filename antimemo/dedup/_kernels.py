"""Compiled (numba) kernels of the MinHash pipeline, bit-identical to the numpy code of ``minhash``.

Each kernel fuses what :mod:`antimemo.dedup.minhash` does in several numpy passes into one loop:

- :func:`signatures_kernel`: for each document, for each shingle, the ``fmix32`` pre-mix and the
  128 ``affine32`` permutations, with the running minimum kept in a ``num_perm`` array (no
  ``[permutations x shingles]`` temporary);
- :func:`word_hashes_kernel`: one scan over a batch's normalised UTF-8 bytes that splits words
  and folds each word's little-endian 8-byte blocks, salted with its byte length and finalised
  with ``fmix64``.

The arithmetic is the numpy code's, in the same integer widths (``uint32`` modulo ``2**32`` for
the permutations, ``uint64`` modulo ``2**64`` for the folds), so the outputs are equal bit for bit
(``tests/test_dedup_kernels.py`` compares both paths). Importing this module imports numba; the
kernels are compiled on first use and cached on disk (``cache=True``), so later processes load
them instead of compiling again.
"""

from __future__ import annotations

import numpy as np

from antimemo._extras import require

numba = require("numba", "the compiled MinHash kernels")

__all__ = ["sequence_keys_kernel", "shingle_hashes_kernel", "signatures_kernel", "word_hashes_kernel"]

_M32 = np.uint64(0xFFFFFFFF)
_C32A = np.uint64(0x85EBCA6B)
_C32B = np.uint64(0xC2B2AE35)
_C64A = np.uint64(0xFF51AFD7ED558CCD)
_C64B = np.uint64(0xC4CEB9FE1A85EC53)
_POLY = np.uint64(0x9E3779B97F4A7C15)
_SHORT_SALT = np.uint64(0xD6E8FEB86659FD93)
_S13 = np.uint64(13)
_S16 = np.uint64(16)
_S32 = np.uint64(32)
_S33 = np.uint64(33)
_MAX32 = np.uint32(0xFFFFFFFF)


@numba.njit(cache=True, nogil=True)
def _fmix32(x):  # x: uint64 holding a 32-bit value; all products reduced modulo 2**32
    x = x ^ (x >> _S16)
    x = (x * _C32A) & _M32
    x = x ^ (x >> _S13)
    x = (x * _C32B) & _M32
    return x ^ (x >> _S16)


@numba.njit(cache=True, nogil=True)
def _fmix64(x):
    x = x ^ (x >> _S33)
    x = x * _C64A
    x = x ^ (x >> _S33)
    x = x * _C64B
    return x ^ (x >> _S33)


@numba.njit(cache=True, nogil=True)
def signatures_kernel(shingles64, offsets, a, b):
    """``uint32 [D, num_perm]`` MinHash signatures, as :func:`antimemo.dedup.minhash.signatures`.

    Args:
        shingles64: ``uint64`` shingle hashes, concatenated over documents.
        offsets: ``int64`` document offsets (length ``D + 1``).
        a, b: ``uint32`` permutation parameters.
    """
    n_docs = offsets.shape[0] - 1
    num_perm = a.shape[0]
    out = np.empty((n_docs, num_perm), dtype=np.uint32)
    acc = np.empty(num_perm, dtype=np.uint32)
    for d in range(n_docs):
        acc[:] = _MAX32
        for s in range(offsets[d], offsets[d + 1]):
            h = np.uint32(_fmix32(shingles64[s] >> _S32))
            for k in range(num_perm):
                v = np.uint32(a[k] * h + b[k])  # modulo 2**32, as the numpy uint32 arithmetic
                if v < acc[k]:
                    acc[k] = v
        out[d, :] = acc
    return out


@numba.njit(cache=True, nogil=True)
def word_hashes_kernel(data, separators, doc_sep, n_docs, long_word):
    """Split ``data`` into words and hash them, as ``minhash._word_hashes_bytes``.

    Args:
        data: ``uint8`` array: the UTF-8 bytes of the batch.
        separators: ``bool [256]``: the bytes that separate words.
        doc_sep: the separator byte that also separates documents.
        n_docs: number of documents in the batch (``doc_sep`` count + 1).
        long_word: words longer than this many bytes are listed for hashing by the caller.

    Returns:
        ``(lengths, hashes, long_index, long_starts, long_ends)``: words per document, the
        ``uint64`` hash of every word in order, and the word indexes and byte ranges (into
        ``data``) of the long words.
    """
    m = data.shape[0]
    lengths = np.zeros(n_docs, dtype=np.int64)
    hashes = np.empty(m // 2 + 1, dtype=np.uint64)
    long_idx = np.empty(m // (long_word + 1) + 1, dtype=np.int64)
    long_starts = np.empty_like(long_idx)
    long_ends = np.empty_like(long_idx)
    n_words = 0
    n_long = 0
    doc = 0
    p = 0
    end = m
    while p < end:
        c = data[p]
        if c <= 0x20 and separators[c]:
            if c == doc_sep:
                doc += 1
            p += 1
            continue
        start = p
        acc = np.uint64(0)
        block = np.uint64(0)
        shift = np.uint64(0)
        first = True
        while p < end:
            c = data[p]
            if c <= 0x20 and separators[c]:  # every separator byte is <= 0x20: one compare for most
                break
            block |= np.uint64(c) << shift
            shift += np.uint64(8)
            p += 1
            if shift == np.uint64(64):
                acc = block if first else acc * _POLY + block
                first = False
                block = np.uint64(0)
                shift = np.uint64(0)
        if shift != np.uint64(0):
            acc = block if first else acc * _POLY + block
        wlen = p - start
        acc ^= np.uint64(wlen) * _SHORT_SALT
        hashes[n_words] = _fmix64(acc)
        if wlen > long_word:
            long_idx[n_long] = n_words
            long_starts[n_long] = start
            long_ends[n_long] = p
            n_long += 1
        n_words += 1
        lengths[doc] += 1
    return lengths, hashes[:n_words], long_idx[:n_long], long_starts[:n_long], long_ends[:n_long]


@numba.njit(cache=True, nogil=True)
def sequence_keys_kernel(elements, lengths, bases, salts):
    """``uint64 [D, 2]`` exact-duplicate keys, as :func:`antimemo.dedup.minhash.sequence_keys`.

    Column ``c`` of a document's key is ``fmix64(sum_i elements[s + i] * bases[c]**i ^
    len * salts[c])`` modulo ``2**64``, the numpy code's prefix-sum fold computed directly.
    """
    n_docs = lengths.shape[0]
    out = np.empty((n_docs, 2), dtype=np.uint64)
    s = 0
    for d in range(n_docs):
        e = s + lengths[d]
        for col in range(2):
            base = bases[col]
            acc = np.uint64(0)
            pw = np.uint64(1)
            for i in range(s, e):
                acc += elements[i] * pw
                pw *= base
            acc ^= np.uint64(lengths[d]) * salts[col]
            out[d, col] = _fmix64(acc)
        s = e
    return out


@numba.njit(cache=True, nogil=True)
def shingle_hashes_kernel(elements, lengths, offsets, ngram, out):
    """Fill ``out`` with the shingle hashes of :func:`antimemo.dedup.minhash.shingle_hashes`.

    A window of ``ngram`` elements folds to ``e0 * P**(n-1) + ... + e(n-1)`` modulo ``2**64``; a
    document with ``1 <= m < ngram`` elements has one shingle, its whole fold salted with ``m``
    and finalised with ``fmix64``.
    """
    s = 0
    for d in range(lengths.shape[0]):
        m = lengths[d]
        o = offsets[d]
        if m >= ngram:
            for i in range(m - ngram + 1):
                g = elements[s + i]
                for k in range(1, ngram):
                    g = g * _POLY + elements[s + i + k]
                out[o + i] = g
        elif m > 0:
            acc = np.uint64(0)
            for i in range(m):
                acc = acc * _POLY + elements[s + i]
            acc ^= _SHORT_SALT * np.uint64(m)
            out[o] = _fmix64(acc)
        s += m
