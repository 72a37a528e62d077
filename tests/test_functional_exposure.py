"""Exposure against hand computation (rank form) and a direct scipy computation (skew-normal)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from antimemo.functional.exposure import exposure_rank, exposure_skewnorm

# 16 references 1.0, 2.0, ..., 16.0, so log2 |R| = 4 (the tensorflow/privacy test's set-up)
REFERENCE = torch.arange(1.0, 17.0)


def test_exposure_rank_known_ranks():
    canary = torch.tensor([0.0, 3.5, 20.0, 16.0])
    got = exposure_rank(canary, REFERENCE)
    expected = [
        4.0 - 0.0,  # 0.0 beats every reference: rank 1, log2(16) - log2(1) = 4
        4.0 - 2.0,  # 1, 2, 3 <= 3.5: rank 4, 4 - log2(4) = 2
        4.0 - math.log2(17),  # worse than all 16: rank 17, 4 - 4.0875 = -0.0875
        4.0 - math.log2(17),  # ties 16.0: a tie counts against the canary, rank 17
    ]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert got.dtype == torch.float32


def test_exposure_rank_ties_count_against_the_canary():
    # canary 3.0 ties with reference 3.0: references <= 3.0 are 1, 2, 3, so rank 4 -> 4 - 2 = 2,
    # while 2.999 has only 1 and 2 ahead: rank 3 -> 4 - log2(3) = 2.415
    got = exposure_rank(torch.tensor([3.0, 2.999]), REFERENCE)
    assert got.tolist() == pytest.approx([2.0, 4.0 - math.log2(3)], abs=1e-6)


def test_exposure_rank_canaries_not_ranked_against_each_other():
    # two canaries both at 0.0: each has rank 1 (only references count), exposure 4 each
    assert exposure_rank(torch.tensor([0.0, 0.0]), REFERENCE).tolist() == [4.0, 4.0]


def test_exposure_rank_order_invariant_and_lists():
    gen = torch.Generator().manual_seed(0)
    shuffled = REFERENCE[torch.randperm(16, generator=gen)]
    canary = torch.tensor([0.5, 7.5, 12.0])
    torch.testing.assert_close(exposure_rank(canary, shuffled), exposure_rank(canary, REFERENCE))
    torch.testing.assert_close(
        exposure_rank([0.5, 7.5, 12.0], REFERENCE.tolist()), exposure_rank(canary, REFERENCE)
    )


def test_exposure_skewnorm_matches_direct_scipy():
    rng = np.random.default_rng(0)
    params = (4.0, 10.0, 2.0)  # shape a, loc, scale
    reference = stats.skewnorm.rvs(*params, size=2000, random_state=rng)
    canary = np.array([9.0, 10.5, 12.0, 20.0])
    fitted = stats.skewnorm.fit(reference)
    expected = -np.log2(stats.skewnorm.cdf(canary, *fitted))
    got = exposure_skewnorm(torch.tensor(canary), torch.tensor(reference))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)
    # lower score = more exposed: exposure decreases with the canary's score
    assert bool((got[:-1] > got[1:]).all())


def test_exposure_skewnorm_order_invariant():
    rng = np.random.default_rng(1)
    reference = torch.tensor(stats.skewnorm.rvs(2.0, 5.0, 1.0, size=500, random_state=rng))
    canary = torch.tensor([4.0, 5.0])
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        exposure_skewnorm(canary, reference), exposure_skewnorm(canary, reference[perm])
    )


def test_exposure_skewnorm_median_canary_about_one_bit():
    # a canary at the median of the reference distribution: CDF = 1/2 -> exposure = 1 bit
    rng = np.random.default_rng(2)
    reference = stats.norm.rvs(5.0, 1.0, size=5000, random_state=rng)
    got = exposure_skewnorm(torch.tensor([float(np.median(reference))]), torch.tensor(reference))
    assert float(got[0]) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("fn", [exposure_rank, exposure_skewnorm])
def test_exposure_errors(fn):
    with pytest.raises(ValueError, match="reference_scores needs at least 2"):
        fn(torch.tensor([1.0]), torch.tensor([2.0]))
    with pytest.raises(ValueError, match="canary_scores needs at least 1"):
        fn(torch.tensor([]), REFERENCE)
    with pytest.raises(ValueError, match="reference_scores must be finite, got nan at index 1"):
        fn(torch.tensor([1.0]), torch.tensor([1.0, float("nan"), 3.0]))
    with pytest.raises(ValueError, match="canary_scores must be finite, got inf"):
        fn(torch.tensor([float("inf")]), REFERENCE)
    with pytest.raises(ValueError, match="must be 1-D"):
        fn(torch.tensor([[1.0]]), REFERENCE)
    with pytest.raises(TypeError, match="real scores"):
        fn(torch.tensor([True]), REFERENCE)


def test_exposure_skewnorm_constant_reference_error():
    with pytest.raises(ValueError, match="all equal"):
        exposure_skewnorm(torch.tensor([1.0]), torch.full((10,), 3.0))
    # the rank form is fine with it: 1.0 beats all 10 -> log2(10)
    assert exposure_rank(torch.tensor([1.0]), torch.full((10,), 3.0)).tolist() == pytest.approx(
        [math.log2(10)]
    )
