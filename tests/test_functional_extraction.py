"""Extraction scores against hand computation and a plain-Python Levenshtein."""

from __future__ import annotations

import time

import pytest
import torch

from antimemo.functional.extraction import (
    edit_similarity,
    exact_match,
    levenshtein_distance,
    token_match,
)


def _levenshtein_py(a: list[int], b: list[int]) -> int:
    """Textbook O(len(a) * len(b)) dynamic programme, independent of the vectorized one."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(
                d[i - 1][j] + 1,
                d[i][j - 1] + 1,
                d[i - 1][j - 1] + (a[i - 1] != b[j - 1]),
            )
    return d[len(a)][len(b)]


def t(rows):
    return torch.tensor(rows, dtype=torch.long)


def test_exact_match_hand():
    gen = t([[1, 2, 3], [1, 2, 4], [0, 0, 0]])
    tgt = t([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    # row 0 identical; row 1 differs in the last position; row 2 differs everywhere
    assert exact_match(gen, tgt).tolist() == [1.0, 0.0, 0.0]
    assert exact_match(gen, tgt).dtype == torch.float32


def test_token_match_hand():
    gen = t([[1, 2, 3, 4], [1, 9, 3, 9], [5, 5, 5, 5]])
    tgt = t([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    # 4/4 = 1.0 ; positions 0 and 2 agree: 2/4 = 0.5 ; none: 0/4 = 0.0
    assert token_match(gen, tgt).tolist() == [1.0, 0.5, 0.0]


@pytest.mark.parametrize(
    ("a", "b", "expected", "why"),
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], 0, "identical"),
        ([1, 2, 3, 4], [1, 9, 3, 4], 1, "one substitution (2 -> 9)"),
        ([1, 2, 3, 4], [9, 9, 9, 9], 4, "four substitutions"),
        ([1, 2, 3], [1, 2, 9, 3], 1, "one insertion (9 before 3)"),
        ([1, 2, 9, 3], [1, 2, 3], 1, "one deletion (drop 9)"),
        ([1, 2, 3, 4], [2, 3, 4, 5], 2, "shift: delete 1, insert 5 (not 4 substitutions)"),
        # kitten -> sitting: k->s, e->i, insert g = 3
        ([11, 9, 20, 20, 5, 14], [19, 9, 20, 20, 9, 14, 7], 3, "kitten/sitting"),
        ([], [1, 2, 3], 3, "empty -> three insertions"),
        ([1, 2, 3], [], 3, "three deletions -> empty"),
    ],
)
def test_levenshtein_hand(a, b, expected, why):
    gen = torch.tensor([a], dtype=torch.long).reshape(1, len(a))
    tgt = torch.tensor([b], dtype=torch.long).reshape(1, len(b))
    assert levenshtein_distance(gen, tgt).tolist() == [expected], why
    assert _levenshtein_py(a, b) == expected, why  # the reference agrees with the hand value


def test_levenshtein_batch_rows_independent():
    gen = t([[1, 2, 3, 4], [1, 9, 3, 4], [2, 3, 4, 5]])
    tgt = t([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    # row 0: 0 edits; row 1: one substitution; row 2: insert 1 at the front + delete 5 = 2
    assert levenshtein_distance(gen, tgt).tolist() == [0, 1, 2]


def test_levenshtein_matches_reference_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    for s1, s2 in [(8, 8), (5, 9), (12, 3), (1, 1)]:
        # small vocabulary so that matches, partial matches and shifts all occur
        a = torch.randint(0, 3, (40, s1), generator=gen)
        b = torch.randint(0, 3, (40, s2), generator=gen)
        got = levenshtein_distance(a, b).tolist()
        want = [_levenshtein_py(x.tolist(), y.tolist()) for x, y in zip(a, b)]
        assert got == want


def test_edit_similarity_hand():
    gen = t([[1, 2, 3, 4], [1, 2, 9, 4], [9, 9, 9, 9]])
    tgt = t([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    # 1 - 0/4 = 1.0 ; 1 - 1/4 = 0.75 ; 1 - 4/4 = 0.0
    assert edit_similarity(gen, tgt).tolist() == [1.0, 0.75, 0.0]


def test_edit_similarity_survives_a_shift_that_kills_token_match():
    tgt = torch.arange(1, 11).unsqueeze(0)  # 1..10
    gen = torch.arange(0, 10).unsqueeze(0)  # 0..9: one token inserted at the front, last lost
    # every position differs -> token_match 0/10; Levenshtein = insert 0 + delete 10 = 2
    assert token_match(gen, tgt).tolist() == [0.0]
    # 1 - 2/10 = 0.8
    assert edit_similarity(gen, tgt).tolist() == pytest.approx([0.8])


def test_edit_similarity_different_lengths_uses_max_length():
    # [1, 2, 3] -> [1, 2, 3, 4, 5]: 2 insertions, max length 5 -> 1 - 2/5 = 0.6
    assert edit_similarity(t([[1, 2, 3]]), t([[1, 2, 3, 4, 5]])).tolist() == pytest.approx([0.6])


def test_empty_batch():
    empty = torch.zeros(0, 4, dtype=torch.long)
    assert exact_match(empty, empty).shape == (0,)
    assert token_match(empty, empty).shape == (0,)
    assert edit_similarity(empty, empty).shape == (0,)


def test_int32_tokens_accepted():
    gen = t([[1, 2, 3]]).to(torch.int32)
    tgt = t([[1, 2, 4]]).to(torch.int32)
    # 2 of 3 positions agree; 1 substitution -> 1 - 1/3
    assert token_match(gen, tgt).tolist() == pytest.approx([2 / 3])
    assert edit_similarity(gen, tgt).tolist() == pytest.approx([2 / 3])


def test_speed_n1000_s50():
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 50, (1000, 50), generator=gen)
    b = torch.randint(0, 50, (1000, 50), generator=gen)
    start = time.perf_counter()
    edit_similarity(a, b)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"edit_similarity took {elapsed:.3f}s for N=1000, S=50"


@pytest.mark.parametrize("fn", [exact_match, token_match, edit_similarity])
def test_errors(fn):
    good = t([[1, 2, 3]])
    with pytest.raises(TypeError, match="generated must hold integer token ids"):
        fn(good.float(), good)
    with pytest.raises(TypeError, match="target must hold integer token ids"):
        fn(good, good.bool())
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn([[1, 2, 3]], good)
    with pytest.raises(ValueError, match=r"shape \[N, S\]"):
        fn(torch.tensor([1, 2, 3]), good)
    with pytest.raises(ValueError, match="number of probes|same shape"):
        fn(t([[1, 2, 3], [1, 2, 3]]), good)


def test_shape_mismatch_errors_for_positionwise_scores():
    with pytest.raises(ValueError, match="same shape"):
        exact_match(t([[1, 2, 3]]), t([[1, 2, 3, 4]]))
    with pytest.raises(ValueError, match="same shape"):
        token_match(t([[1, 2, 3]]), t([[1, 2, 3, 4]]))


def test_zero_length_errors():
    empty = torch.zeros(2, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="S = 0"):
        token_match(empty, empty)
    with pytest.raises(ValueError, match="S = 0"):
        edit_similarity(empty, empty)
