"""The torchmetrics classes: hand values, chunked == single update, reset, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from antimemo.functional.membership import (
    mia_loss,
    mia_min_k,
    mia_min_k_plus_plus,
    mia_zlib,
    roc_auc,
    token_logprob_stats,
    tpr_at_fpr,
)
from antimemo.metrics import CanaryExposure, ExtractableMemorization, MembershipInference


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


# --------------------------------------------------------------------------------------------
# ExtractableMemorization
# --------------------------------------------------------------------------------------------

TARGET = torch.tensor(
    [
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    ]
)
GENERATED = torch.tensor(
    [
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],  # exact: 10/10 matches, distance 0
        [1, 2, 3, 4, 0, 6, 7, 8, 9, 10],  # one substitution: 9/10 matches, distance 1 -> sim 0.9
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # shifted: 0/10 matches, distance 2 -> sim 0.8
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # nothing: 0/10, distance 10 -> sim 0.0
    ]
)


def test_extractable_memorization_hand():
    metric = ExtractableMemorization(prefix_length=8, suffix_length=10)
    metric.update(GENERATED, TARGET)
    out = metric.compute()
    # exact: 1 of 4 probes = 0.25
    # token: (10 + 9 + 0 + 0) / (4 * 10) = 19 / 40 = 0.475
    # near-verbatim (sim >= 0.9): the exact one and the one-substitution one (sim exactly 0.9,
    # which must not be lost to float rounding) = 2 / 4 = 0.5
    assert out["exact_match"].item() == pytest.approx(0.25)
    assert out["token_match"].item() == pytest.approx(0.475)
    assert out["near_verbatim"].item() == pytest.approx(0.5)
    # a looser threshold of 0.8 also admits the shifted probe: 3 / 4
    loose = ExtractableMemorization(suffix_length=10, near_verbatim_threshold=0.8)
    loose.update(GENERATED, TARGET)
    assert loose.compute()["near_verbatim"].item() == pytest.approx(0.75)


def test_extractable_memorization_chunks_equal_single_update_and_reset():
    one = ExtractableMemorization(suffix_length=10)
    one.update(GENERATED, TARGET)
    chunked = ExtractableMemorization(suffix_length=10)
    chunked.update(GENERATED[:1], TARGET[:1])
    chunked.update(GENERATED[1:3], TARGET[1:3])
    chunked.update(GENERATED[3:], TARGET[3:])
    _assert_same(one.compute(), chunked.compute())
    chunked.reset()
    chunked.update(GENERATED[3:], TARGET[3:])  # only the all-wrong probe
    assert {k: v.item() for k, v in chunked.compute().items()} == {
        "exact_match": 0.0,
        "token_match": 0.0,
        "near_verbatim": 0.0,
    }


def test_extractable_memorization_errors():
    metric = ExtractableMemorization(suffix_length=10)
    with pytest.raises(ValueError, match="suffix_length=10 columns, got shape \\(4, 5\\)"):
        metric.update(GENERATED[:, :5], TARGET[:, :5])
    with pytest.raises(ValueError, match="same shape"):
        metric.update(GENERATED[:, :5], TARGET)
    with pytest.raises(TypeError, match="generated must hold integer token ids"):
        metric.update(GENERATED.float(), TARGET)
    with pytest.raises(RuntimeError, match="before any probe"):
        metric.compute()
    with pytest.raises(ValueError, match="suffix_length must be a positive integer, got 0"):
        ExtractableMemorization(suffix_length=0)
    with pytest.raises(ValueError, match="prefix_length must be a positive integer"):
        ExtractableMemorization(prefix_length=2.5)
    with pytest.raises(ValueError, match="near_verbatim_threshold must be in \\[0, 1\\], got 1.5"):
        ExtractableMemorization(near_verbatim_threshold=1.5)


# --------------------------------------------------------------------------------------------
# CanaryExposure
# --------------------------------------------------------------------------------------------


def _exposure_data():
    rng = np.random.default_rng(0)
    reference = torch.tensor(stats.skewnorm.rvs(3.0, 10.0, 2.0, size=400, random_state=rng))
    canary = torch.tensor([5.0, 9.0, 10.5, 11.0, 30.0], dtype=torch.float64)
    return canary.float(), reference.float()


def test_canary_exposure_hand_rank():
    metric = CanaryExposure(methods=("rank",))
    metric.update(reference_scores=torch.arange(1.0, 17.0))  # 16 references: log2 |R| = 4
    metric.update(canary_scores=[0.0, 3.5])
    out = metric.compute()
    # 0.0: rank 1 -> 4 ; 3.5: 1, 2, 3 ahead -> rank 4 -> 4 - 2 = 2 ; mean = 3
    assert out["exposure_rank_per_canary"].tolist() == pytest.approx([4.0, 2.0])
    assert out["exposure_rank"].item() == pytest.approx(3.0)
    assert out["max_exposure"].item() == pytest.approx(4.0)
    assert set(out) == {"exposure_rank", "exposure_rank_per_canary", "max_exposure"}


def test_canary_exposure_both_methods_match_functional():
    canary, reference = _exposure_data()
    metric = CanaryExposure()
    metric.update(canary_scores=canary, reference_scores=reference)
    out = metric.compute()
    fitted = stats.skewnorm.fit(np.sort(reference.double().numpy()))
    expected = -np.log2(stats.skewnorm.cdf(canary.double().numpy(), *fitted))
    np.testing.assert_allclose(out["exposure_skewnorm_per_canary"].numpy(), expected, rtol=1e-4)
    assert out["exposure_skewnorm"].item() == pytest.approx(float(expected.mean()), rel=1e-4)
    assert out["max_exposure"].item() == pytest.approx(math.log2(400))
    assert set(out) == {
        "exposure_rank",
        "exposure_rank_per_canary",
        "exposure_skewnorm",
        "exposure_skewnorm_per_canary",
        "max_exposure",
    }


def test_canary_exposure_chunks_equal_single_update_and_reset():
    canary, reference = _exposure_data()
    one = CanaryExposure()
    one.update(canary_scores=canary, reference_scores=reference)
    chunked = CanaryExposure()
    chunked.update(reference_scores=reference[:150])
    chunked.update(canary_scores=canary[:2])
    chunked.update(canary_scores=canary[2:], reference_scores=reference[150:390])
    chunked.update(reference_scores=reference[390:])
    _assert_same(one.compute(), chunked.compute())
    chunked.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' own warning
        with pytest.raises(ValueError, match="needs canary scores"):
            chunked.compute()


def test_canary_exposure_errors():
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        CanaryExposure(methods=("rank", "exact"))
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        CanaryExposure(methods=())
    metric = CanaryExposure()
    with pytest.raises(ValueError, match="got neither"):
        metric.update()
    with pytest.raises(ValueError, match="canary_scores must be finite, got nan"):
        metric.update(canary_scores=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="reference_scores must be 1-D"):
        metric.update(reference_scores=torch.zeros(2, 2))
    metric.update(canary_scores=torch.tensor([1.0]), reference_scores=torch.tensor([2.0]))
    with pytest.raises(ValueError, match="at least 2 reference scores, got 1"):
        metric.compute()


# --------------------------------------------------------------------------------------------
# MembershipInference
# --------------------------------------------------------------------------------------------


def _mia_batch(n: int = 40, t: int = 12, v: int = 9, seed: int = 0):
    """Random logits; members get their labels' logits boosted so the attacks can work."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n, t), generator=gen)
    is_member = torch.arange(n) % 2 == 0
    logits = torch.randn(n, t, v, generator=gen)
    boost = torch.zeros(n, t, v)
    boost[:, :-1].scatter_(-1, labels[:, 1:].unsqueeze(-1), 1.0)
    logits = logits + 1.5 * boost * is_member.view(n, 1, 1)
    labels[3, 5:] = -100  # some padding
    log_probs, mu, sigma, mask = token_logprob_stats(logits, labels)
    texts = [" ".join(str(x) for x in row.tolist()) for row in labels]
    return log_probs, mu, sigma, mask, texts, is_member


def test_membership_inference_matches_functional():
    log_probs, mu, sigma, mask, texts, is_member = _mia_batch()
    metric = MembershipInference(min_k=0.3)
    metric.update(log_probs, is_member, mask=mask, mu=mu, sigma=sigma, texts=texts)
    out = metric.compute()
    scores = {
        "loss": mia_loss(log_probs, mask),
        "zlib": mia_zlib(log_probs, texts, mask),
        "min_k": mia_min_k(log_probs, mask, k=0.3),
        "min_k_plus_plus": mia_min_k_plus_plus(log_probs, mu, sigma, mask, k=0.3),
    }
    expected_keys = set()
    for name, score in scores.items():
        for suffix, value in (
            ("auc", roc_auc(-score, is_member)),
            ("tpr_at_1pct_fpr", tpr_at_fpr(-score, is_member, 0.01)),
            ("tpr_at_0.1pct_fpr", tpr_at_fpr(-score, is_member, 0.001)),
        ):
            key = f"{name}/{suffix}"
            expected_keys.add(key)
            torch.testing.assert_close(out[key], value, msg=key)
    assert set(out) == expected_keys
    # the boosted members are easy to detect: the loss attack is well above chance
    assert out["loss/auc"].item() > 0.9


def test_membership_inference_hand_auc():
    # loss scores: members 0.15, 0.2 ; non-members 2.5, 0.1 (the last one looks like a member)
    log_probs = torch.tensor([[-0.1, -0.2], [-0.3, -0.1], [-2.0, -3.0], [-0.1, -0.1]])
    metric = MembershipInference(scores=["loss"])
    metric.update(log_probs, is_member=[1, 1, 0, 0])
    out = metric.compute()
    # higher = member is -loss: members -0.15, -0.2 ; non-members -2.5, -0.1. Pairs won:
    # -0.15 > -2.5 yes, -0.15 > -0.1 no, -0.2 > -2.5 yes, -0.2 > -0.1 no -> 2/4 = 0.5
    assert out["loss/auc"].item() == pytest.approx(0.5)
    # the top score (-0.1) is a non-member: with 2 non-members FPR 1% allows 0 false
    # positives, so no threshold admits a member -> TPR 0
    assert out["loss/tpr_at_1pct_fpr"].item() == 0.0
    assert out["loss/tpr_at_0.1pct_fpr"].item() == 0.0


def test_membership_inference_chunks_equal_single_update_and_reset():
    log_probs, mu, sigma, mask, texts, is_member = _mia_batch()
    one = MembershipInference()
    one.update(log_probs, is_member, mask=mask, mu=mu, sigma=sigma, texts=texts)
    chunked = MembershipInference()
    for sl in (slice(0, 7), slice(7, 8), slice(8, 40)):
        chunked.update(
            log_probs[sl], is_member[sl], mask=mask[sl], mu=mu[sl], sigma=sigma[sl], texts=texts[sl]
        )
    _assert_same(one.compute(), chunked.compute())
    chunked.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' own warning
        with pytest.raises(ValueError, match="before any update"):
            chunked.compute()


def test_membership_inference_errors():
    log_probs, mu, sigma, mask, texts, is_member = _mia_batch(n=6)
    with pytest.raises(ValueError, match="unknown membership score\\(s\\) \\['ref'\\].*valid"):
        MembershipInference(scores=("loss", "ref"))
    with pytest.raises(ValueError, match="min_k must be a fraction in \\(0, 1\\], got 0"):
        MembershipInference(min_k=0)
    with pytest.raises(ValueError, match="min_k must be a fraction"):
        MembershipInference(min_k=1.2)
    metric = MembershipInference()
    with pytest.raises(ValueError, match="'zlib' score needs texts"):
        metric.update(log_probs, is_member, mask=mask, mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match="'min_k_plus_plus' score needs mu and sigma"):
        metric.update(log_probs, is_member, mask=mask, texts=texts)
    with pytest.raises(ValueError, match="is_member must be 1-D with one label per row"):
        metric.update(log_probs, is_member[:3], mask=mask, mu=mu, sigma=sigma, texts=texts)
    # a failed update leaves no partial state behind
    with pytest.raises(ValueError, match="got 5 texts"):
        metric.update(log_probs, is_member, mask=mask, mu=mu, sigma=sigma, texts=texts[:5])
    assert metric.labels == [] and metric.score_loss == []
    # only members -> clear error at compute
    only = MembershipInference(scores=("loss", "min_k"))
    only.update(log_probs[is_member], is_member[is_member], mask=mask[is_member])
    with pytest.raises(ValueError, match="both members and non-members, got 3 member"):
        only.compute()
    # optional inputs are not needed when their score is not requested
    ok = MembershipInference(scores=("loss", "min_k"))
    ok.update(log_probs, is_member, mask=mask)
    assert set(ok.compute()) == {
        "loss/auc",
        "loss/tpr_at_1pct_fpr",
        "loss/tpr_at_0.1pct_fpr",
        "min_k/auc",
        "min_k/tpr_at_1pct_fpr",
        "min_k/tpr_at_0.1pct_fpr",
    }
