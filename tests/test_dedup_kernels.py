"""The compiled (numba) MinHash kernels equal the numpy code bit for bit.

Each test runs the same public function of ``antimemo.dedup.minhash`` twice: once with the kernels
(``minhash._KERNELS`` reset, so they are imported) and once on the numpy path
(``minhash._KERNELS = False``, what happens without numba). numba is in the ``test`` extra, so the
compiled path is always exercised here; a missing numba fails the first test instead of skipping.
"""

import logging
import random
import sys

import numpy as np
import pytest

from antimemo.dedup import minhash
from antimemo.dedup.minhash import (
    ShingleConfig,
    permutations,
    sequence_keys,
    shingle_hashes,
    signatures,
    sketch_chunk,
    text_element_hashes,
    token_element_hashes,
)

# ASCII letters, separators of str.split() (ASCII and NFKC-left Unicode ones), NUL, letters that
# NFKC or case folding change (ligature, sharp s, dotted I, full-width), and an astral emoji
ALPHABET = "abcXYZ09 .-\t\n\r\x0b\x0c\x1c\x1f\x85\u00a0\u1680\u2028\u3000\x00\u00e9\u00df\u0130\ufb01\uff21\U0001f600"


def _both(fn, monkeypatch):
    """``fn()`` on the compiled path, then on the numpy path."""
    monkeypatch.setattr(minhash, "_KERNELS", None)
    assert minhash._compiled() is not None, "numba kernels did not load (numba is in the test extra)"
    compiled = fn()
    monkeypatch.setattr(minhash, "_KERNELS", False)
    reference = fn()
    return compiled, reference


def _assert_same(x, y):
    if isinstance(x, tuple):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            _assert_same(u, v)
        return
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def _random_texts(seed, n, max_len=300):
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


EDGE_TEXTS = [
    "",
    " ",
    "one",
    "\x00",
    "a\x00b",  # NUL inside a text: the one-by-one normalisation path
    "a" * 7,
    "b" * 8,
    "c" * 9,
    "d" * 16,
    "e" * 64,  # the longest word folded by the polynomial
    "f" * 65,  # the shortest word hashed with BLAKE2b
    "x" * 500 + " tail " + "\u00e9" * 40,  # a long ASCII word and a long non-ASCII (2-byte) word
    "  leading and trailing  ",
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_word_hashes_equal_numpy(seed, monkeypatch):
    texts = _random_texts(seed, 300) + EDGE_TEXTS
    random.Random(seed).shuffle(texts)
    compiled, reference = _both(lambda: text_element_hashes(texts), monkeypatch)
    _assert_same(compiled, reference)
    assert reference[1].shape[0] > 1000  # many words were compared


def test_word_hashes_small_batches_and_edges(monkeypatch):
    # tiny max_chars: every text its own batch, long texts alone in theirs
    texts = EDGE_TEXTS + _random_texts(7, 40)
    compiled, reference = _both(lambda: text_element_hashes(texts, max_chars=16), monkeypatch)
    _assert_same(compiled, reference)
    for single in ([""], ["word"], ["\x00"], []):
        _assert_same(*_both(lambda: text_element_hashes(single), monkeypatch))


@pytest.mark.parametrize(("num_perm", "ngram", "seed"), [(128, 5, 1), (64, 3, 0), (7, 1, 42), (256, 2, 3)])
def test_signatures_and_keys_equal_numpy(num_perm, ngram, seed, monkeypatch):
    texts = _random_texts(seed + 10, 200) + EDGE_TEXTS
    monkeypatch.setattr(minhash, "_KERNELS", False)
    lengths, elements = text_element_hashes(texts)
    sh, off = shingle_hashes(elements, lengths, ngram)
    a, b = permutations(num_perm, seed)

    _assert_same(*_both(lambda: shingle_hashes(elements, lengths, ngram), monkeypatch))
    sigs = _both(lambda: signatures(sh, off, a, b), monkeypatch)
    _assert_same(*sigs)
    assert sigs[0].shape == (len(texts), num_perm)
    assert (sigs[0][np.diff(off) == 0] == 2**32 - 1).all()  # the empty documents
    assert (sigs[0][np.diff(off) > 0] < 2**32 - 1).any()
    _assert_same(*_both(lambda: sequence_keys(elements, lengths), monkeypatch))


def test_one_long_document_and_token_ids(monkeypatch):
    # one document longer than the numpy code's 4 * block shingles (its running-minimum branch)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 50_000, 40_000)
    elements = token_element_hashes(ids)
    lengths = np.array([0, 35_000, 1, 4_999, 0])
    for ngram in (1, 4, 9):
        _assert_same(*_both(lambda: shingle_hashes(elements, lengths, ngram), monkeypatch))
        sh, off = shingle_hashes(elements, lengths, ngram)
        a, b = permutations(128, 9)
        _assert_same(*_both(lambda: signatures(sh, off, a, b), monkeypatch))
    _assert_same(*_both(lambda: sequence_keys(elements, lengths), monkeypatch))
    # uniform random 64-bit shingles (high bits set) and an empty batch
    sh = rng.integers(0, 2**64 - 1, 3000, dtype=np.uint64, endpoint=True)
    off = np.array([0, 1, 1, 1000, 3000])
    _assert_same(*_both(lambda: signatures(sh, off, a, b), monkeypatch))
    _assert_same(*_both(lambda: signatures(sh[:0], np.zeros(1, dtype=np.int64), a, b), monkeypatch))
    _assert_same(*_both(lambda: sequence_keys(elements[:0], np.zeros(0, dtype=np.int64)), monkeypatch))


@pytest.mark.parametrize("kind", ["text", "tokens"])
def test_sketch_chunk_equal_numpy(kind, monkeypatch):
    cfg = ShingleConfig(ngram=3, num_perm=64, seed=2, bands=8, rows=8)
    if kind == "text":
        items = _random_texts(3, 150) + EDGE_TEXTS
    else:
        rng = np.random.default_rng(0)
        items = [rng.integers(0, 1000, int(rng.integers(0, 60))).tolist() for _ in range(150)]
    compiled, reference = _both(lambda: sketch_chunk(kind, items, 0, cfg), monkeypatch)
    assert compiled.keys() == reference.keys()
    for key in reference:
        _assert_same(compiled[key], reference[key])


def test_missing_numba_logs_once_and_uses_numpy(monkeypatch, caplog):
    import antimemo.dedup as dedup_pkg

    # re-import the kernels module as if numba were not installed
    monkeypatch.setattr(minhash, "_KERNELS", None)
    monkeypatch.delattr(dedup_pkg, "_kernels", raising=False)
    monkeypatch.delitem(sys.modules, "antimemo.dedup._kernels", raising=False)
    monkeypatch.setitem(sys.modules, "numba", None)
    with caplog.at_level(logging.INFO, logger="antimemo.dedup.minhash"):
        lengths, elements = text_element_hashes(["a b c", "d"])
        sequence_keys(elements, lengths)
    assert minhash._KERNELS is False
    msgs = [r.getMessage() for r in caplog.records if r.name == "antimemo.dedup.minhash"]
    assert len(msgs) == 1, msgs
    assert "pip install 'antimemo[dedup]'" in msgs[0] and "same outputs" in msgs[0]
    assert lengths.tolist() == [3, 1]


def test_shingle_hashes_short_documents_and_bad_ngram(monkeypatch):
    elements = token_element_hashes(np.arange(30))
    lengths = np.array([1, 2, 0, 3, 4, 5, 6, 9])  # shorter than, equal to and longer than ngram
    for ngram in (1, 2, 3, 5, 6, 40):
        _assert_same(*_both(lambda: shingle_hashes(elements, lengths, ngram), monkeypatch))
    with pytest.raises(ValueError, match="ngram must be >= 1, got 0"):
        shingle_hashes(elements, lengths, 0)
