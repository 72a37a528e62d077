"""MIA scores, ROC AUC and TPR@FPR against hand computation."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from antimemo.functional.membership import (
    mia_loss,
    mia_min_k,
    mia_min_k_plus_plus,
    mia_zlib,
    roc_auc,
    token_logprob_stats,
    tpr_at_fpr,
)

# --------------------------------------------------------------------------------------------
# token_logprob_stats
# --------------------------------------------------------------------------------------------


def test_token_logprob_stats_hand():
    # V = 2. logits (log 3, 0) give p = (0.75, 0.25); logits (0, 0) give p = (0.5, 0.5).
    l3 = math.log(3.0)
    logits = torch.tensor([[[l3, 0.0], [0.0, 0.0], [5.0, -5.0]]])  # [1, T=3, V=2]
    labels = torch.tensor([[7, 1, 0]])  # labels[0] is never a target
    log_probs, mu, sigma, mask = token_logprob_stats(logits, labels)
    assert log_probs.shape == mu.shape == sigma.shape == mask.shape == (1, 2)
    # position 0 (logits (log 3, 0)) predicts labels[1] = 1: log 0.25 = -1.386294
    # position 1 (uniform) predicts labels[2] = 0: log 0.5 = -0.693147
    torch.testing.assert_close(log_probs, torch.tensor([[-1.3862944, -0.6931472]]))
    # mu_0 = 0.75 log 0.75 + 0.25 log 0.25 = 0.75 * -0.287682 + 0.25 * -1.386294 = -0.562335
    # mu_1 = log 0.5 = -0.693147
    torch.testing.assert_close(mu, torch.tensor([[-0.5623351, -0.6931472]]))
    # sigma_0^2 = 0.75 * 0.287682^2 + 0.25 * 1.386294^2 - 0.562335^2
    #           = 0.062071 + 0.480453 - 0.316221 = 0.226303 -> sigma_0 = 0.475713
    # sigma_1 = 0 (both tokens have the same log-prob)
    torch.testing.assert_close(sigma, torch.tensor([[0.4757131, 0.0]]))
    assert mask.tolist() == [[True, True]]


def test_token_logprob_stats_ignore_index_and_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    labels[0, 4] = -100
    labels[2, 1:3] = -100
    log_probs, mu, sigma, mask = token_logprob_stats(logits, labels)
    assert mask.tolist() == (labels[:, 1:] != -100).tolist()
    # log p at valid targets equals minus the per-token cross-entropy of the shifted LM loss
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="none"
    ).reshape(3, 5)
    torch.testing.assert_close(log_probs[mask], -ce[mask])
    assert bool((log_probs[~mask] == 0).all())
    # sigma^2 = sum p (log p)^2 - mu^2 (the form) matches the stable form used
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    var = (logp.exp() * logp.square()).sum(-1) - mu.square()
    torch.testing.assert_close(sigma.square(), var, atol=1e-5, rtol=1e-4)


def test_token_logprob_stats_half_precision_upcast():
    logits = torch.zeros(1, 3, 4, dtype=torch.bfloat16)
    log_probs, mu, sigma, _ = token_logprob_stats(logits, torch.tensor([[0, 1, 2]]))
    assert log_probs.dtype == torch.float32
    # uniform over 4: log p = mu = -log 4 = -1.386294, sigma = 0
    torch.testing.assert_close(log_probs, torch.full((1, 2), -math.log(4.0)))
    torch.testing.assert_close(mu, torch.full((1, 2), -math.log(4.0)))


def test_token_logprob_stats_errors():
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        token_logprob_stats(torch.zeros(1, 3, 4, dtype=torch.long), torch.zeros(1, 3).long())
    with pytest.raises(TypeError, match="labels must be an integer"):
        token_logprob_stats(torch.zeros(1, 3, 4), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="same N and T"):
        token_logprob_stats(torch.zeros(1, 3, 4), torch.zeros(1, 4).long())
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_logprob_stats(torch.zeros(1, 1, 4), torch.zeros(1, 1).long())
    with pytest.raises(ValueError, match="token id 9 outside the vocabulary"):
        token_logprob_stats(torch.zeros(1, 3, 4), torch.tensor([[0, 9, 1]]))


# --------------------------------------------------------------------------------------------
# per-sequence scores (lower = member)
# --------------------------------------------------------------------------------------------

LP = torch.tensor([[-1.0, -4.0, -2.0, -3.0, -0.5]])


def test_mia_loss_hand():
    # -(-1 - 4 - 2 - 3 - 0.5) / 5 = 10.5 / 5 = 2.1
    assert mia_loss(LP).tolist() == pytest.approx([2.1])
    # masked: only -1 and -3 are valid: (1 + 3) / 2 = 2.0
    mask = torch.tensor([[True, False, False, True, False]])
    assert mia_loss(LP, mask).tolist() == pytest.approx([2.0])


def test_mia_zlib_hand():
    texts = ["aaaa", b"hello world hello world"]
    log_probs = torch.tensor([[-1.0, -3.0], [-0.5, -0.5]])
    # loss = (2.0, 0.5); divided by the zlib-compressed byte lengths
    sizes = [len(zlib.compress(b"aaaa")), len(zlib.compress(b"hello world hello world"))]
    expected = [2.0 / sizes[0], 0.5 / sizes[1]]
    assert mia_zlib(log_probs, texts).tolist() == pytest.approx(expected)
    # str is encoded as UTF-8: "é" is the 2 bytes c3 a9
    one = torch.tensor([[-1.0]])
    assert mia_zlib(one, ["é"]).tolist() == pytest.approx(mia_zlib(one, [b"\xc3\xa9"]).tolist())


def test_mia_zlib_errors():
    lp = torch.tensor([[-1.0], [-2.0]])
    with pytest.raises(ValueError, match="got 1 texts for N = 2"):
        mia_zlib(lp, ["a"])
    with pytest.raises(TypeError, match="texts must be a list"):
        mia_zlib(lp, "ab")
    with pytest.raises(TypeError, match=r"texts\[1\] must be str or bytes"):
        mia_zlib(lp, ["a", 3])


@pytest.mark.parametrize(
    ("k", "expected", "why"),
    [
        (0.2, 4.0, "ceil(0.2 * 5) = 1 lowest: -4 -> 4"),
        (0.3, 3.5, "ceil(1.5) = 2 lowest: -4, -3 -> 3.5"),
        (0.4, 3.5, "ceil(2.0) = 2 lowest -> 3.5"),
        (0.6, 3.0, "ceil(3.0) = 3 lowest: -4, -3, -2 -> 3.0"),
        (1.0, 2.1, "all 5 -> the loss, 2.1"),
        (0.01, 4.0, "ceil(0.05) = 1: at least one token"),
    ],
)
def test_mia_min_k_hand(k, expected, why):
    assert mia_min_k(LP, k=k).tolist() == pytest.approx([expected]), why


def test_mia_min_k_mask_and_rows():
    log_probs = torch.tensor([[-1.0, -9.0, -2.0, -3.0], [-0.1, -0.2, -0.3, -0.4]])
    mask = torch.tensor([[True, False, True, True], [True, True, True, True]])
    # row 0: valid -1, -2, -3 (n = 3), ceil(0.5 * 3) = 2 lowest: -3, -2 -> 2.5 (-9 is masked)
    # row 1: n = 4, ceil(2.0) = 2 lowest: -0.4, -0.3 -> 0.35
    assert mia_min_k(log_probs, mask, k=0.5).tolist() == pytest.approx([2.5, 0.35])


def test_mia_min_k_float_rounding_of_k_times_n():
    # 0.1 * 30 = 3.0000000000000004 in floating point; ceil must still give 3, not 4
    log_probs = -torch.arange(1.0, 31.0).unsqueeze(0)  # -1, ..., -30
    # lowest 3: -30, -29, -28 -> 29.0 (with 4 it would be 28.5)
    assert mia_min_k(log_probs, k=0.1).tolist() == pytest.approx([29.0])


def test_mia_min_k_plus_plus_hand():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5]])
    mu = torch.tensor([[-0.5, -1.0, -1.0]])
    sigma = torch.tensor([[0.5, 2.0, 0.25]])
    # z = (-1 + 0.5) / 0.5 = -1 ; (-2 + 1) / 2 = -0.5 ; (-0.5 + 1) / 0.25 = 2
    # k = 0.5: ceil(1.5) = 2 lowest: -1, -0.5 -> mean -0.75 -> score 0.75
    assert mia_min_k_plus_plus(log_probs, mu, sigma, k=0.5).tolist() == pytest.approx([0.75])
    # masking the z = -1 position: valid z = -0.5, 2, ceil(1.0) = 1 lowest: -0.5 -> 0.5
    mask = torch.tensor([[False, True, True]])
    assert mia_min_k_plus_plus(log_probs, mu, sigma, mask, k=0.5).tolist() == pytest.approx([0.5])


def test_mia_min_k_plus_plus_point_mass_is_finite():
    # a memorized position: p = 1 on the target, so log p = mu = 0, sigma = 0 -> z = 0
    log_probs = torch.tensor([[0.0, -1.0]])
    mu = torch.tensor([[0.0, -1.0]])
    sigma = torch.tensor([[0.0, 1.0]])
    # z = (0, 0) -> score 0 for any k
    assert mia_min_k_plus_plus(log_probs, mu, sigma, k=1.0).tolist() == [0.0]
    # a point mass on another token: log p = -30, mu = 0, sigma = 0 clamped to eps = 1e-3
    # -> z = -30 / 1e-3 = -30000 -> score 30000 (strongly non-member), not inf or NaN
    one = torch.tensor([[-30.0]])
    got = mia_min_k_plus_plus(one, torch.zeros(1, 1), torch.zeros(1, 1), k=1.0)
    assert got.tolist() == pytest.approx([30000.0])


def test_mia_min_k_plus_plus_from_token_logprob_stats_uniform():
    # uniform predictions: log p = mu at every position, sigma = 0 -> every z = 0 -> score 0.
    # In float32, log p - mu is rounding noise (~4e-7 here); the default eps = 1e-3 keeps it at
    # ~4e-4 in z (eps = 1e-6 gave 0.36, a spurious z-score of order 1).
    log_probs, mu, sigma, mask = token_logprob_stats(torch.zeros(2, 5, 7), torch.ones(2, 5).long())
    got = mia_min_k_plus_plus(log_probs, mu, sigma, mask)
    assert got.tolist() == pytest.approx([0.0, 0.0], abs=1e-2)


def test_score_errors():
    with pytest.raises(ValueError, match="k must be a fraction in \\(0, 1\\], got 0"):
        mia_min_k(LP, k=0)
    with pytest.raises(ValueError, match="got 1.5"):
        mia_min_k(LP, k=1.5)
    with pytest.raises(ValueError, match="sequence 1 has no valid target"):
        mia_loss(torch.zeros(2, 3), torch.tensor([[True, True, True], [False, False, False]]))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        mia_loss(torch.zeros(1, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="mask must have the shape"):
        mia_loss(torch.zeros(1, 3), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \[N, T\]"):
        mia_loss(torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        mia_loss(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="sigma must have the shape"):
        mia_min_k_plus_plus(LP, torch.zeros_like(LP), torch.ones(1, 4))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        mia_min_k_plus_plus(LP, torch.zeros_like(LP), -torch.ones_like(LP))


def test_positive_log_probs_are_refused_naming_the_position_and_the_fix():
    bad = torch.tensor([[-1.0, -2.0], [-0.5, 2.3]])  # losses or logits, not log-probabilities
    for call in (
        lambda: mia_loss(bad),
        lambda: mia_min_k(bad, k=0.5),
        lambda: mia_zlib(bad, ["a", "b"]),
        lambda: mia_min_k_plus_plus(bad, torch.zeros_like(bad), torch.ones_like(bad)),
    ):
        with pytest.raises(ValueError, match=r"log_probs must be log-probabilities \(<= 0\), got 2.3 at sequence 1, "
                           r"token 1; positive values are losses \(pass -loss\).*token_logprob_stats"):
            call()
    # float error up to 1e-6 is accepted, and positive values at masked positions are ignored
    assert mia_loss(torch.tensor([[5e-7, -1.0]])).tolist() == pytest.approx([0.5 - 2.5e-7])
    assert mia_loss(bad, torch.tensor([[True, True], [True, False]])).tolist() == pytest.approx([1.5, 0.5])
    with pytest.raises(ValueError, match="got 0.001 at sequence 0, token 0"):
        mia_loss(torch.tensor([[1e-3, -1.0]]))
    with pytest.raises(ValueError, match="got inf at sequence 0, token 1"):
        mia_loss(torch.tensor([[-1.0, float("inf")]]))
    # -inf (probability 0) is a log-probability
    assert mia_loss(torch.tensor([[-float("inf"), -1.0]])).tolist() == [float("inf")]
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0 \(the floor of sigma\), got inf"):
        mia_min_k_plus_plus(LP, torch.zeros_like(LP), torch.ones_like(LP), eps=float("inf"))


# --------------------------------------------------------------------------------------------
# ROC AUC and TPR@FPR (higher = member)
# --------------------------------------------------------------------------------------------


def test_roc_auc_perfect_inverted_tied():
    labels = torch.tensor([1, 1, 0, 0])
    assert float(roc_auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels)) == 1.0  # separates
    assert float(roc_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels)) == 0.0  # inverted
    assert float(roc_auc(torch.full((4,), 0.3), labels)) == 0.5  # all tied: 1/2 per pair


def test_roc_auc_hand_pairs():
    # members 0.9, 0.4 ; non-members 0.6, 0.1. Pairs (member > non-member):
    # 0.9 > 0.6 yes, 0.9 > 0.1 yes, 0.4 > 0.6 no, 0.4 > 0.1 yes -> 3/4 = 0.75
    scores = torch.tensor([0.9, 0.4, 0.6, 0.1])
    labels = torch.tensor([True, True, False, False])
    assert float(roc_auc(scores, labels)) == pytest.approx(0.75)
    # with a tie 0.4 vs 0.4 the pair counts 1/2: (1 + 1 + 0.5 + 1) / 4 = 0.875
    scores = torch.tensor([0.9, 0.4, 0.4, 0.1])
    assert float(roc_auc(scores, labels)) == pytest.approx(0.875)


def test_roc_auc_random_scores_near_half():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4000, generator=gen)
    labels = torch.rand(4000, generator=gen) < 0.5
    # independent of the labels: AUC ~ 0.5, std ~ sqrt(1 / (12 * 2000 * 2000 / 4000)) ~ 0.009
    assert abs(float(roc_auc(scores, labels)) - 0.5) < 0.04


def test_roc_auc_large_scores_not_squashed():
    # torchmetrics applies a sigmoid to predictions outside [0, 1]; in float32 sigmoid(70),
    # sigmoid(80), ... are all exactly 1.0, which would tie everything (AUC 0.5).
    scores = torch.tensor([100.0, 90.0, 80.0, 70.0])
    labels = torch.tensor([1, 1, 0, 0])
    assert float(roc_auc(scores, labels)) == 1.0
    # and negated losses (all negative, large) keep their order too
    assert float(roc_auc(-torch.tensor([50.0, 60.0, 70.0, 80.0]), labels)) == 1.0


def test_tpr_at_fpr_hand():
    # descending scores 10..1 with labels m m n m m n m n n n: 5 members, 5 non-members
    scores = torch.arange(10.0, 0.0, -1.0)
    labels = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0, 0, 0])
    # FPR 0: threshold above the first non-member (8) admits 10, 9 -> TPR 2/5 = 0.4
    assert float(tpr_at_fpr(scores, labels, 0.0)) == pytest.approx(0.4)
    # FPR 1% and 10% are below 1/5 = the smallest non-zero FPR -> same as FPR 0
    assert float(tpr_at_fpr(scores, labels, 0.01)) == pytest.approx(0.4)
    assert float(tpr_at_fpr(scores, labels, 0.1)) == pytest.approx(0.4)
    # FPR 0.2 (1 false positive): threshold above 5 admits 10, 9, 7, 6 -> 4/5 = 0.8
    assert float(tpr_at_fpr(scores, labels, 0.2)) == pytest.approx(0.8)
    # FPR 0.4 (2 false positives): threshold above 3 admits all 5 members -> 1.0
    assert float(tpr_at_fpr(scores, labels, 0.4)) == pytest.approx(1.0)
    assert float(tpr_at_fpr(scores, labels, 1.0)) == 1.0


def test_tpr_at_fpr_exact_budget_boundary():
    # 100 non-members, budget 1% = exactly 1 false positive allowed (1/100 must not be lost to
    # float rounding). Order: member, non-member, member, then 99 non-members below everything.
    scores = torch.arange(102.0, 0.0, -1.0)
    labels = torch.tensor([1, 0, 1] + [0] * 99)
    # FPR 0 -> only the first member: 1/2 ; FPR 1/100 -> both members: 2/2
    assert float(tpr_at_fpr(scores, labels, 0.0)) == pytest.approx(0.5)
    assert float(tpr_at_fpr(scores, labels, 0.01)) == pytest.approx(1.0)


def test_roc_errors():
    s = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="both members and non-members, got 2 member"):
        roc_auc(s, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="got 0 member"):
        tpr_at_fpr(s, torch.tensor([False, False]), 0.01)
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(torch.tensor([0.1, float("nan")]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="same length"):
        roc_auc(s, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="labels must be 0 .* got 2"):
        roc_auc(s, torch.tensor([2, 0]))
    with pytest.raises(TypeError, match="scores must be a 1-D floating-point"):
        roc_auc(torch.tensor([1, 2]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="fpr must be a rate in \\[0, 1\\], got 1.5"):
        tpr_at_fpr(s, torch.tensor([1, 0]), 1.5)
