"""Text and token-id duplicate detection: normalisation, MinHash, LSH, verification, clustering."""

import random

import numpy as np
import pytest
import torch

from antimemo.dedup import DuplicateIndex
from antimemo.dedup.lsh import candidate_probability, optimal_params
from antimemo.dedup.minhash import (
    fmix32,
    permutations,
    sequence_keys,
    shingle_hashes,
    signatures,
    text_element_hashes,
)
from antimemo.dedup.normalize import normalize_text, normalized_words

VOCAB = [f"w{i}" for i in range(3000)]


def _doc(rng, k):
    return [rng.choice(VOCAB) for _ in range(k)]


def _edit(rng, words, num_edits):
    words = list(words)
    for _ in range(num_edits):
        op = rng.randrange(3)
        pos = rng.randrange(len(words))
        if op == 0:
            words[pos] = rng.choice(VOCAB)
        elif op == 1:
            words.insert(pos, rng.choice(VOCAB))
        elif len(words) > 10:
            del words[pos]
    return words


def _true_jaccard(a, b, n=5):
    """Exact Jaccard of the word 5-gram sets of two texts, computed on the strings themselves."""
    wa, wb = normalized_words(a), normalized_words(b)
    sa = {tuple(wa[i : i + n]) for i in range(len(wa) - n + 1)}
    sb = {tuple(wb[i : i + n]) for i in range(len(wb) - n + 1)}
    return len(sa & sb) / len(sa | sb)


# ----------------------------------------------------------------------------------- normalisation


def test_normalisation_nfkc_case_and_whitespace():
    assert normalize_text("  Ｈｅｌｌｏ\t\nWORLD\u00a0ﬁne ") == "hello world fine"  # fullwidth, NBSP, ligature
    assert normalize_text("Straße") == normalize_text("STRASSE")  # casefold, not lower
    assert normalized_words("a\u2028b\x85c") == ["a", "b", "c"]  # whitespace NFKC keeps non-ASCII


def test_word_hashes_do_not_depend_on_batching():
    """The vectorised path (texts joined, normalised at once, hashed over bytes) gives every word
    the same hash whatever else is in its batch, including texts with NUL, surrogates, long words."""
    rng = random.Random(1)
    alphabet = ["a", "B", "é", "ﬁ", "\u00a0", "\u2028", "\x85", " ", "\t", "\n", "\x1c", "\x01", "\x00", "ß",
                "Σ", "\u3000", "x" * 70, "Ǆ", "\ud800", "𝔘", "\u0301", "ab "]
    for _ in range(150):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25))) for _ in range(rng.randint(1, 5))]
        lengths, hashes = text_element_hashes(texts, max_chars=rng.choice([4, 40, 1 << 20]))
        assert lengths.tolist() == [len(normalized_words(t)) for t in texts]
        alone = [h for t in texts for h in text_element_hashes([t])[1].tolist()]
        assert hashes.tolist() == alone
        words = [w for t in texts for w in normalized_words(t)]
        by_word = {}
        for w, h in zip(words, hashes.tolist()):
            assert by_word.setdefault(w, h) == h  # equal words, equal hashes
        assert len(set(by_word.values())) == len(by_word)  # different words, different hashes


def test_sequence_keys_identify_equal_sequences_only():
    e = np.array([5, 6, 5, 6, 6, 5, 5, 6, 7], dtype=np.uint64)
    k = sequence_keys(e, np.array([2, 2, 2, 0, 3, 0]))
    assert (k[0] == k[1]).all() and (k[3] == k[5]).all()  # [5,6] twice; two empty sequences
    assert not (k[0] == k[2]).any() and not (k[0] == k[4]).any() and not (k[3] == k[0]).any()


# ----------------------------------------------------------------------------------- MinHash


def test_shingles_are_ngrams_within_documents():
    e = np.arange(1, 12, dtype=np.uint64)
    h, off = shingle_hashes(e, np.array([5, 0, 2, 4]), ngram=3)
    # 5 - 3 + 1 = 3 shingles; empty doc: 0; 2 < 3 words: one whole-sequence shingle; 4 - 3 + 1 = 2
    assert off.tolist() == [0, 3, 3, 4, 6]
    same, _ = shingle_hashes(np.array([1, 2, 3, 9, 1, 2, 3], dtype=np.uint64), np.array([4, 3]), ngram=3)
    assert same[0] == same[2] and len(set(same[:2].tolist())) == 2  # n-gram [1,2,3] in both docs
    # no window crosses a document boundary: [2,3,9] of doc 0 is not [3] + doc 1's start
    cross, _ = shingle_hashes(np.array([1, 2, 3, 4], dtype=np.uint64), np.array([2, 2]), ngram=2)
    whole, _ = shingle_hashes(np.array([2, 3], dtype=np.uint64), np.array([2]), ngram=2)
    assert whole[0] not in cross.tolist()


def test_signatures_equal_a_pure_python_affine32_reference():
    rng = np.random.default_rng(0)
    lengths = np.array([7, 0, 1, 300, 4])
    sh = rng.integers(0, 2**63, lengths.sum(), dtype=np.uint64)
    off = np.concatenate([[0], np.cumsum(lengths)])
    a, b = permutations(16, seed=3)
    sig = signatures(sh, off, a, b, block=64)  # the 300-shingle document takes the long path
    mask = (1 << 32) - 1
    for d in range(len(lengths)):
        for k in range(16):
            values = [
                (int(a[k]) * int(fmix32(np.array([int(x) >> 32], dtype=np.uint32))[0]) + int(b[k])) & mask
                for x in sh[off[d] : off[d + 1]]
            ]
            assert int(sig[d, k]) == (min(values) if values else mask)


def test_permutations_match_datasketch_parameters():
    # datasketch 2.x draws affine32 parameters as RandomState(seed).randint(0, 2**31) * 2 + 1 and
    # randint(0, 2**32); for seed=1 its first a is 2 * 1791095845 + 1 = 3582191691
    a, b = permutations(2, seed=1)
    state = np.random.RandomState(1)
    assert int(a[0]) == int(state.randint(0, 1 << 31, 2, dtype=np.uint32)[0]) * 2 + 1 == 3582191691
    assert bool(np.all(a % 2 == 1)) and b.dtype == np.uint32


def test_signature_agreement_estimates_jaccard():
    # token sets A = 0..299, B = 100..399: |A & B| = 200, |A | B| = 400, J = 0.5 (ngram=1 shingles)
    ids = np.concatenate([np.arange(300), np.arange(100, 400)]).astype(np.int64)
    from antimemo.dedup.minhash import token_element_hashes

    h, off = shingle_hashes(token_element_hashes(ids), np.array([300, 300]), ngram=1)
    a, b = permutations(1024, seed=0)
    sig = signatures(h, off, a, b)
    estimate = float((sig[0] == sig[1]).mean())
    # standard error sqrt(0.5 * 0.5 / 1024) = 0.0156; 4 standard errors = 0.0625
    assert abs(estimate - 0.5) < 0.0625


def test_lsh_parameters():
    assert optimal_params(0.8, 128, (0.5, 0.5)) == (9, 13)  # datasketch 2.0 _optimal_param(0.8, 128)
    assert optimal_params(0.9, 128, (0.5, 0.5)) == (5, 25)  # datasketch docs: (0.9, 128) -> (5, 25)
    assert optimal_params(0.8, 128) == (16, 8)  # our recall-leaning default weights (0.05, 0.95)
    # 1 - (1 - 0.8**8)**16: 0.8**8 = 0.16777, 0.83223**16 = exp(16 * -0.18365) = 0.05295 -> 0.94705
    assert candidate_probability(0.8, 16, 8) == pytest.approx(0.94705, abs=1e-4)
    with pytest.raises(ValueError, match="threshold must be in"):
        optimal_params(1.2, 128)
    with pytest.raises(ValueError, match="lsh_weights"):
        optimal_params(0.8, 128, (0.5, 0.7))


# ----------------------------------------------------------------------------------- the index


def test_exact_duplicates_after_normalisation():
    texts = [
        "The quick brown fox",
        "the  QUICK\tbrown\nfox ",
        "Ｔｈｅ quick brown fox",
        "The quick brown cat",
        "",
        "   ",
    ]
    idx = DuplicateIndex.from_texts(texts, progress=False)
    assert idx.cluster_ids.tolist() == [0, 0, 0, 1, 2, 2]
    assert idx.cluster_sizes.tolist() == [3, 1, 2]
    assert idx.params["stats"]["exact_duplicate_examples"] == 3  # 6 texts in 3 exact groups


def test_planted_near_duplicates_are_found_and_nothing_else_is_merged():
    rng = random.Random(0)
    bases = [_doc(rng, rng.randint(80, 160)) for _ in range(600)]
    texts = [" ".join(w) for w in bases]
    pairs = []
    for i in range(0, 600, 3):  # one edited copy of every third document, 1 to 6 random edits
        texts.append(" ".join(_edit(rng, bases[i], rng.randint(1, 6))))
        pairs.append((i, len(texts) - 1))
    idx = DuplicateIndex.from_texts(texts, progress=False)
    c = idx.cluster_ids
    jac = {p: _true_jaccard(texts[p[0]], texts[p[1]]) for p in pairs}
    above = [p for p in pairs if jac[p] >= 0.8]
    below = [p for p in pairs if jac[p] < 0.8]
    assert len(above) > 60 and len(below) > 20  # the edits straddle the threshold
    # pairs at J >= 0.85 are LSH candidates with probability >= 0.994 each; all are found here
    assert all(c[i] == c[j] for i, j in above if jac[(i, j)] >= 0.85)
    found = sum(c[i] == c[j] for i, j in above)
    assert found / len(above) >= 0.95
    # verification with the exact Jaccard: no pair below the threshold is merged
    assert not any(c[i] == c[j] for i, j in below)
    # and the only clusters are planted pairs: random documents never merge
    assert idx.num_clusters == len(texts) - found
    assert idx.cluster_sizes.max() == 2


def test_no_false_merges_of_overlapping_but_dissimilar_texts():
    rng = random.Random(5)
    base = _doc(rng, 100)
    texts = []
    for k in range(40):  # share the first 80 of 100 words: J = 76 / (96 + 96 - 76) = 0.655 < 0.8,
        texts.append(" ".join(base[:80] + _doc(rng, 20)))  # an LSH candidate with probability 0.42
    texts += [" ".join(_doc(random.Random(100 + k), 30)) for k in range(200)]
    idx = DuplicateIndex.from_texts(texts, progress=False)
    assert idx.num_clusters == len(texts)
    assert idx.params["stats"]["pairs_verified"] > 0  # LSH proposed some, verification rejected them
    assert idx.params["stats"]["pairs_merged"] == 0


def test_short_texts_are_duplicates_only_if_equal():
    texts = ["one two", "One  two", "one three", "x", "y", "a b c d e f"]
    idx = DuplicateIndex.from_texts(texts, progress=False)
    assert idx.cluster_ids.tolist() == [0, 0, 1, 2, 3, 4]


def test_token_ids_path():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 50_000, (int(torch.randint(60, 120, (1,), generator=g)),), generator=g) for _ in range(200)]
    near = seqs[3].clone()
    near[40] = 7  # one substitution in a sequence of L tokens changes 5 of L - 4 shingles
    seqs.append(near)  # J = (L - 9) / (L + 1) >= 51 / 61 = 0.836 for L >= 60
    seqs.append(seqs[10].tolist())  # an exact copy given as a list
    seqs.append(np.asarray(seqs[20]))  # and as a numpy array
    idx = DuplicateIndex.from_token_ids(seqs, progress=False)
    c = idx.cluster_ids
    assert c[200] == c[3] and c[201] == c[10] and c[202] == c[20]
    assert idx.num_clusters == 200 and idx.kind == "tokens"
    # a 2-D tensor is a sequence of rows
    rows = torch.stack([s[:50] for s in seqs[:20]] + [seqs[0][:50]])
    assert DuplicateIndex.from_token_ids(rows, progress=False).cluster_ids.tolist()[-1] == 0


def test_token_ids_bad_inputs():
    with pytest.raises(TypeError, match=r"seqs\[1\] must be a 1-D sequence of integer token ids"):
        DuplicateIndex.from_token_ids([[1, 2, 3], "abc"], progress=False)
    with pytest.raises(TypeError, match=r"seqs\[0\].*1-D"):
        DuplicateIndex.from_token_ids([torch.zeros(2, 3, dtype=torch.long)], progress=False)


def test_multiple_workers_give_the_same_index():
    rng = random.Random(3)
    bases = [_doc(rng, 60) for _ in range(150)]
    texts = [" ".join(w) for w in bases] + [" ".join(_edit(rng, bases[i], 1)) for i in range(0, 150, 5)]
    one = DuplicateIndex.from_texts(texts, progress=False, chunk_size=37)
    two = DuplicateIndex.from_texts(texts, progress=False, chunk_size=37, num_workers=2)
    assert np.array_equal(one.cluster_ids, two.cluster_ids)
    assert one.fingerprint == two.fingerprint and one.params == two.params
    assert one.num_clusters < len(texts)  # the comparison is not between two trivial indices
    # the chunking does not matter either
    other = DuplicateIndex.from_texts(texts, progress=False, chunk_size=1000)
    assert np.array_equal(one.cluster_ids, other.cluster_ids)


def test_deterministic_given_seed():
    rng = random.Random(4)
    bases = [_doc(rng, 50) for _ in range(100)]
    texts = [" ".join(w) for w in bases] + [" ".join(_edit(rng, bases[i], 1)) for i in range(0, 100, 4)]
    a = DuplicateIndex.from_texts(texts, progress=False, seed=7)
    b = DuplicateIndex.from_texts(texts, progress=False, seed=7)
    assert np.array_equal(a.cluster_ids, b.cluster_ids) and a.params == b.params


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 1.0}, "threshold must be a Jaccard similarity in"),
        ({"threshold": 0}, "threshold must be a Jaccard similarity in"),
        ({"ngram": 0}, "ngram must be an integer >= 1"),
        ({"num_perm": 0}, "num_perm must be an integer >= 1"),
        ({"num_workers": 0}, "num_workers must be an integer >= 1"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DuplicateIndex.from_texts(["a b c"], progress=False, **kwargs)


def test_bad_text_inputs():
    with pytest.raises(ValueError, match="texts is empty"):
        DuplicateIndex.from_texts([], progress=False)
    with pytest.raises(TypeError, match="texts must be a sequence .* or an iterable of str .* got int"):
        DuplicateIndex.from_texts(5, progress=False)
    with pytest.raises(TypeError, match="texts must be a sequence .* got str"):
        DuplicateIndex.from_texts("a b c", progress=False)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        DuplicateIndex.from_texts(["a", 3], progress=False)
