"""Streaming builds of DuplicateIndex: one-pass iterables, bounded memory, same result as a list."""

from __future__ import annotations

import random
import tracemalloc
from itertools import combinations

import numpy as np
import pytest

import antimemo.dedup.index as index_mod
from antimemo.dedup import DuplicateIndex
from antimemo.dedup.clusters import connected_components
from antimemo.dedup.lsh import lsh_bucket_arrays, lsh_buckets, optimal_params
from antimemo.dedup.minhash import ShingleConfig, shingle_sets_chunk, sketch_chunk, text_element_hashes


_VOCAB = [f"w{i}" for i in range(5000)]


def _doc(i: int, words: int = 120) -> str:
    return " ".join(map(_VOCAB.__getitem__, np.random.default_rng(i).integers(0, 5000, words).tolist()))


def _corpus(n: int, seed: int = 0) -> list[str]:
    """Random documents, with exact copies (case / spacing changed) and near copies (a few edits)."""
    rng = random.Random(seed)
    texts = [_doc(seed * 100_000 + i, rng.randint(20, 150)) for i in range(n)]
    for i in range(0, n, 7):
        src = texts[rng.randrange(n)].split()
        if i % 2:
            texts[i] = "  ".join(src).upper()  # exact duplicate after normalisation
        else:
            for _ in range(rng.randint(0, 4)):
                src[rng.randrange(len(src))] = f"x{rng.randrange(99)}"
            texts[i] = " ".join(src)
    texts[3] = ""  # an empty text
    texts[5] = "ﬁle Straße Ｈello"  # non-ASCII: NFKC + case folding
    texts[9] = "FILE STRASSE hello"  # the same words after normalisation
    return texts


class OneShot:
    """An iterable that can be iterated once and counts the items it handed out."""

    def __init__(self, items: list) -> None:
        self.items = items
        self.pulled = 0
        self.iterated = False

    def __iter__(self):
        if self.iterated:
            raise AssertionError("the source was iterated twice")
        self.iterated = True
        for x in self.items:
            self.pulled += 1
            yield x


@pytest.mark.parametrize("chunk_size", [1, 37, 4096])
def test_generator_equals_list(chunk_size):
    texts = _corpus(600)
    ref = DuplicateIndex.from_texts(texts, progress=False)
    assert ref.num_clusters < len(texts) - 50  # the planted copies were found
    assert ref.cluster_ids[5] == ref.cluster_ids[9]
    src = OneShot(texts)
    got = DuplicateIndex.from_texts(src, progress=False, chunk_size=chunk_size)
    assert src.pulled == len(texts)
    assert np.array_equal(got.cluster_ids, ref.cluster_ids)
    assert got.fingerprint == ref.fingerprint
    assert np.array_equal(got.content_hashes, ref.content_hashes)
    assert got.params == ref.params


def test_token_generator_equals_list():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 300, rng.integers(0, 80)) for _ in range(400)]
    for i in range(0, 400, 5):  # near copies: one token changed
        s = seqs[rng.integers(400)].copy()
        if s.shape[0]:
            s[rng.integers(s.shape[0])] = 999
        seqs[i] = s
    ref = DuplicateIndex.from_token_ids(seqs, progress=False, threshold=0.7)
    assert ref.params["stats"]["pairs_merged"] > 0
    got = DuplicateIndex.from_token_ids((s.tolist() for s in seqs), progress=False, threshold=0.7, chunk_size=64)
    assert np.array_equal(got.cluster_ids, ref.cluster_ids) and got.fingerprint == ref.fingerprint


def test_generator_is_read_chunk_by_chunk(monkeypatch):
    texts = _corpus(300)
    src = OneShot(texts)
    seen = []

    def spy(kind, items, base, cfg):
        seen.append((src.pulled, base, len(items)))
        return sketch_chunk(kind, items, base, cfg)

    monkeypatch.setattr(index_mod, "sketch_chunk", spy)
    DuplicateIndex.from_texts(src, progress=False, chunk_size=50)
    # each chunk is sketched when exactly its items have been pulled: no read-ahead, no second read
    assert seen == [(b + 50, b, 50) for b in range(0, 300, 50)]


def _peak_mib(build) -> float:
    tracemalloc.start()
    try:
        build()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_streaming_memory_does_not_hold_the_corpus(tmp_path):
    n, words = 1000, 600  # about 3.4 KB of text per document

    def gen(count):
        return (_doc(i, words) for i in range(count))

    text_mib = sum(len(t) for t in gen(n)) / 2**20
    DuplicateIndex.from_texts(gen(300), progress=False, chunk_size=128)  # warm-up: per-process caches
    stream = [_peak_mib(lambda c=c: DuplicateIndex.from_texts(gen(c), progress=False, chunk_size=128,
                                                                spill_dir=tmp_path)) for c in (n, 2 * n)]
    listed = [_peak_mib(lambda c=c: DuplicateIndex.from_texts(list(gen(c)), progress=False, chunk_size=128))
              for c in (n, 2 * n)]
    # holding the texts costs their size; the streaming build adds only its per-document arrays
    assert listed[1] - listed[0] > 0.9 * text_mib
    assert stream[1] - stream[0] < 0.25 * text_mib, (stream, listed, text_mib)
    assert list(tmp_path.iterdir()) == []  # the spill file is gone


def test_clusters_equal_brute_force_verification_of_the_lsh_candidates():
    texts = _corpus(500, seed=3)
    idx = DuplicateIndex.from_texts(iter(texts), progress=False, threshold=0.7)
    bands, rows = optimal_params(0.7, 128, (0.05, 0.95))
    cfg = ShingleConfig(ngram=5, num_perm=128, seed=0, bands=bands, rows=rows)
    res = sketch_chunk("text", texts, 0, cfg)
    sets = shingle_sets_chunk("text", texts, 0, 5)
    pairs = []
    for i, j in combinations(range(len(texts)), 2):
        if (res["exact"][i] == res["exact"][j]).all():
            pairs.append((i, j))
        elif (res["bands"][i] == res["bands"][j]).any() and sets[i].size and sets[j].size:
            inter = np.intersect1d(sets[i], sets[j]).size
            if inter / (sets[i].size + sets[j].size - inter) >= 0.7:
                pairs.append((i, j))
    assert len(pairs) > 40
    assert np.array_equal(idx.cluster_ids, connected_components(len(texts), np.array(pairs)))


def test_lsh_bucket_arrays_match_the_list_form():
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 6, (50, 4)).astype(np.uint64)
    ids = np.sort(rng.choice(10_000, 50, replace=False))
    members, offsets = lsh_bucket_arrays(keys, ids)
    buckets = lsh_buckets(keys, ids)
    assert len(buckets) == offsets.shape[0] - 1 > 0
    for g, b in enumerate(buckets):
        assert np.array_equal(members[offsets[g] : offsets[g + 1]], b)
        band = next(j for j in range(4) if len({int(k) for k in keys[np.searchsorted(ids, b), j]}) == 1)
        assert len(b) >= 2 and band >= 0
    # every pair of documents sharing a band key is in some bucket
    for j in range(4):
        for x, y in combinations(range(50), 2):
            if keys[x, j] == keys[y, j]:
                assert any(ids[x] in b and ids[y] in b for b in buckets)
    assert [a.size for a in lsh_bucket_arrays(keys[:1], ids[:1])] == [0, 1]


def test_mixed_ascii_and_unicode_batch_normalises_each_text():
    texts = ["plain ascii FILE", "ﬁle", "Straße\u2028x", "strasse X", "ꭰ Ꭰ", "\u00c5 A\u030a"]
    lengths, h = text_element_hashes(texts)
    assert lengths.tolist() == [3, 1, 2, 2, 2, 2]
    words = np.split(h, np.cumsum(lengths)[:-1])
    assert words[0][2] == words[1][0]  # "FILE" and the ligature "ﬁle" fold to "file"
    assert np.array_equal(words[2], words[3])  # ß -> ss, U+2028 is whitespace, x/X
    assert words[4][0] == words[4][1]  # Cherokee small and capital letters fold together
    assert words[5][0] == words[5][1]  # precomposed and combining ring compose under NFKC
    for t, w in zip(texts, words):
        assert np.array_equal(text_element_hashes([t])[1], w)


def test_bad_stream_inputs(tmp_path):
    def bad():
        yield "a b c"
        yield 3

    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        DuplicateIndex.from_texts(bad(), progress=False, spill_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # cleaned up after the failure
    with pytest.raises(ValueError, match="texts is empty"):
        DuplicateIndex.from_texts(iter([]), progress=False)
    with pytest.raises(TypeError, match=r"seqs\[1\] must be a 1-D sequence of integer token ids"):
        DuplicateIndex.from_token_ids(iter([[1, 2], "ab"]), progress=False)
    for value in (tmp_path / "missing", 3):
        with pytest.raises(ValueError, match=r"spill_dir must be an existing directory.*got"):
            DuplicateIndex.from_texts(iter(["a"]), progress=False, spill_dir=value)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        DuplicateIndex.from_texts(iter(["a"]), progress=False, chunk_size=0)
