"""Membership-inference (MIA) scores for language models, MIMIR conventions.

Per-sequence scores (one value per sequence, **lower = more likely a member**, as in MIMIR,
``iamgroot42/mimir``, ``mimir/attacks/*.py``):

- :func:`mia_loss`: ``-mean_t log p(x_t | x_<t)``, the average token loss (Yeom et al. 2018).
- :func:`mia_zlib`: ``loss / len(zlib.compress(utf8 bytes))`` (Carlini et al. 2021).
- :func:`mia_min_k`: ``-mean`` of the lowest ``ceil(k * n)`` token log-probs (Min-K% Prob,
  Shi et al., ICLR 2024).
- :func:`mia_min_k_plus_plus`: the same over ``(log p - mu) / sigma``, where ``mu`` and
  ``sigma`` are the mean and standard deviation of ``log p`` under the model's own predictive
  distribution at that position (Min-K%++, Zhang et al., ICLR 2025).

Their inputs come from :func:`token_logprob_stats`, which takes a causal LM's logits.

Evaluation (**higher = more likely a member**; negate the MIMIR scores first):
:func:`roc_auc` and :func:`tpr_at_fpr`, built on ``torchmetrics.functional.classification``.

Caveat (Duan et al., "Do Membership Inference Attacks Work on Large Language Models?", COLM 2024):
members and non-members must come from one random split of the same distribution; otherwise the
attack measures the distribution shift, not memorization.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_roc

__all__ = [
    "mia_loss",
    "mia_min_k",
    "mia_min_k_plus_plus",
    "mia_zlib",
    "roc_auc",
    "token_logprob_stats",
    "tpr_at_fpr",
]


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def token_logprob_stats(
    logits: Tensor, labels: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token log-probabilities and predictive-distribution statistics of a causal LM.

    Shifts for next-token prediction: ``logits[:, t]`` predicts ``labels[:, t + 1]``, so every
    output has shape ``[N, T - 1]``. Computed in float32 (half-precision logits are upcast).
    Call it under ``torch.no_grad()`` when no gradient is wanted; peak memory is about three
    float32 copies of ``logits``.

    Args:
        logits: ``[N, T, V]`` float logits of a causal LM over the sequence.
        labels: ``[N, T]`` integer token ids of the same sequence (usually ``input_ids``);
            positions equal to ``ignore_index`` (padding, prompt) are not targets.
        ignore_index: label value that marks a position as not a target.

    Returns:
        ``(log_probs, mu, sigma, mask)``, each ``[N, T - 1]``:

        - ``log_probs``: ``log p(labels[:, t + 1])`` under ``logits[:, t]``; 0.0 where masked.
        - ``mu``: ``sum_v p_v log p_v``, the expected log-probability (minus the entropy).
        - ``sigma``: ``sqrt(sum_v p_v (log p_v)^2 - mu^2)``, computed as the numerically stable
          equivalent ``sqrt(sum_v p_v (log p_v - mu)^2)``.
        - ``mask``: bool, True where ``labels[:, t + 1] != ignore_index``.

    Raises:
        TypeError: if ``logits`` is not floating point or ``labels`` not integer.
        ValueError: if the shapes do not match or ``T < 2``.

    Example:
        >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
        >>> log_probs, mu, sigma, mask = token_logprob_stats(logits, torch.tensor([[0, 1, 2]]))
        >>> log_probs  # log(1/4)
        tensor([[-1.3863, -1.3863]])
        >>> sigma  # every token equally likely: no spread
        tensor([[0., 0.]])
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"logits must be a floating-point tensor [N, T, V], got "
            f"{logits.dtype if isinstance(logits, Tensor) else type(logits).__name__}"
        )
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(
            f"labels must be an integer tensor [N, T] of token ids, got "
            f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be [N, T, V] and labels [N, T] with the same N and T, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if labels.shape[1] < 2:
        raise ValueError(
            f"sequences need at least 2 tokens (the first one is never a target), got T = "
            f"{labels.shape[1]}"
        )
    logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [N, T-1, V]
    targets = labels[:, 1:]
    mask = targets != ignore_index
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets)).long()
    vocab = logp_all.shape[-1]
    if bool((safe_targets >= vocab).any()) or bool((safe_targets < 0).any()):
        bad = safe_targets[(safe_targets >= vocab) | (safe_targets < 0)][0]
        raise ValueError(
            f"labels hold token id {int(bad)} outside the vocabulary [0, {vocab}) of logits "
            f"(and not equal to ignore_index={ignore_index})"
        )
    log_probs = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    log_probs = torch.where(mask, log_probs, torch.zeros_like(log_probs))
    probs = logp_all.exp()
    mu = (probs * logp_all).sum(-1)
    sigma = (probs * (logp_all - mu.unsqueeze(-1)).square()).sum(-1).sqrt()
    return log_probs, mu, sigma, mask


#: Largest value accepted in ``log_probs`` (log-probabilities are ``<= 0``; this allows float error).
LOG_PROB_TOLERANCE = 1e-6


def _check_log_probs(log_probs: Tensor, mask: Tensor | None) -> Tensor:
    if not isinstance(log_probs, Tensor) or not log_probs.is_floating_point():
        raise TypeError(
            f"log_probs must be a floating-point tensor [N, T] of per-token log-probabilities, "
            f"got {log_probs.dtype if isinstance(log_probs, Tensor) else type(log_probs).__name__}"
        )
    if log_probs.ndim != 2:
        raise ValueError(
            f"log_probs must have shape [N, T] (one row per sequence), got {tuple(log_probs.shape)}"
        )
    if mask is None:
        mask = torch.ones_like(log_probs, dtype=torch.bool)
    else:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a bool tensor [N, T] (True = valid target), got "
                f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}"
            )
        if mask.shape != log_probs.shape:
            raise ValueError(
                f"mask must have the shape of log_probs {tuple(log_probs.shape)}, got "
                f"{tuple(mask.shape)}"
            )
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        row = int((counts == 0).nonzero()[0])
        raise ValueError(
            f"sequence {row} has no valid target token (mask is all False); "
            f"drop it before scoring"
        )
    if bool((torch.isnan(log_probs) & mask).any()):
        raise ValueError("log_probs holds NaN at a valid (mask=True) position")
    # one max() per call; the masked search runs only when a positive value exists somewhere
    if log_probs.numel() and float(log_probs.max()) > LOG_PROB_TOLERANCE:
        bad = (log_probs > LOG_PROB_TOLERANCE) & mask
        if bool(bad.any()):
            row, col = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"log_probs must be log-probabilities (<= 0), got {float(log_probs[row, col]):.6g} at sequence "
                f"{row}, token {col}; positive values are losses (pass -loss), negated log-probs or logits: "
                "compute them with token_logprob_stats(logits, labels)"
            )
    return mask



def _check_k(k: float) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not (0.0 < float(k) <= 1.0):
        raise ValueError(
            f"k must be a fraction in (0, 1], got {k!r}; k=0.2 averages the lowest 20% of tokens"
        )


def _lowest_fraction_mean(values: Tensor, mask: Tensor, k: float) -> Tensor:
    """Mean of the lowest ``ceil(k * n)`` valid entries of each row (n = valid count)."""
    n = mask.sum(dim=1)
    # ceil with a small tolerance so that e.g. 0.1 * 30 = 3.0000000000000004 gives 3, not 4
    k_len = torch.ceil(n.to(torch.float64) * float(k) - 1e-9).clamp(min=1).to(torch.long)
    inf = torch.full_like(values, math.inf)
    ordered = torch.sort(torch.where(mask, values, inf), dim=1).values
    pos = torch.arange(values.shape[1], device=values.device)
    take = pos.unsqueeze(0) < k_len.unsqueeze(1)
    total = torch.where(take, ordered, torch.zeros_like(ordered)).sum(dim=1)
    return total / k_len.to(values.dtype)


# --------------------------------------------------------------------------------------------
# scores (lower = member)
# --------------------------------------------------------------------------------------------


def mia_loss(log_probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """LOSS attack score: ``-mean`` of the valid token log-probs of each sequence.

    Lower = more likely a member (MIMIR convention).

    Args:
        log_probs: ``[N, T]`` float ``log p`` of each target token.
        mask: optional ``[N, T]`` bool, True at valid targets (default: all valid).

    Returns:
        A tensor ``[N]`` in the dtype of ``log_probs``.

    Raises:
        TypeError / ValueError: on a wrong dtype or shape, a row without a valid token, NaN, or a
            positive "log-probability" (above ``1e-6``) at a valid position.

    Example:
        >>> mia_loss(torch.tensor([[-1.0, -3.0, -8.0]]), torch.tensor([[True, True, False]]))
        tensor([2.])
    """
    mask = _check_log_probs(log_probs, mask)
    total = torch.where(mask, log_probs, torch.zeros_like(log_probs)).sum(dim=1)
    return -total / mask.sum(dim=1).to(log_probs.dtype)


def mia_zlib(
    log_probs: Tensor, texts: Sequence[str | bytes], mask: Tensor | None = None
) -> Tensor:
    """zlib attack score: ``loss / len(zlib.compress(utf8 bytes of the text))``.

    ``loss`` is :func:`mia_loss`; the denominator is the length in bytes of the text compressed
    with Python's ``zlib.compress`` at its default level (MIMIR ``mimir/attacks/zlib.py``).
    Lower = more likely a member.

    Args:
        log_probs: ``[N, T]`` float ``log p`` of each target token.
        texts: ``N`` strings (encoded as UTF-8) or bytes, the text of each sequence.
        mask: optional ``[N, T]`` bool, True at valid targets.

    Returns:
        A tensor ``[N]`` in the dtype of ``log_probs``.

    Raises:
        TypeError: if ``texts`` is not a sequence of str/bytes.
        ValueError: if ``len(texts) != N``, plus the checks of :func:`mia_loss`.

    Example:
        >>> # len(zlib.compress(b"aaaa")) == 12, so 2.0 / 12
        >>> mia_zlib(torch.tensor([[-1.0, -3.0]]), ["aaaa"])
        tensor([0.1667])
    """
    loss = mia_loss(log_probs, mask)
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(
            f"texts must be a list of N strings or bytes (one per sequence), got "
            f"{type(texts).__name__}"
        )
    if len(texts) != log_probs.shape[0]:
        raise ValueError(
            f"texts must hold one text per sequence: got {len(texts)} texts for "
            f"N = {log_probs.shape[0]} rows of log_probs"
        )
    sizes = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            data = text.encode("utf-8")
        elif isinstance(text, (bytes, bytearray)):
            data = bytes(text)
        else:
            raise TypeError(f"texts[{i}] must be str or bytes, got {type(text).__name__}")
        sizes.append(len(zlib.compress(data)))
    denom = torch.tensor(sizes, dtype=log_probs.dtype, device=log_probs.device)
    return loss / denom


def mia_min_k(log_probs: Tensor, mask: Tensor | None = None, k: float = 0.2) -> Tensor:
    """Min-K% Prob score: ``-mean`` of the lowest ``ceil(k * n)`` token log-probs per sequence.

    ``n`` is the number of valid tokens of the row. MIMIR (``mimir/attacks/min_k.py``) takes
    ``int(k * n)`` tokens, which is empty (a NaN score) for ``n < 1 / k``; the ceiling here always
    keeps at least one token and agrees with MIMIR whenever ``k * n`` is an integer.
    Lower = more likely a member.

    Args:
        log_probs: ``[N, T]`` float ``log p`` of each target token.
        mask: optional ``[N, T]`` bool, True at valid targets.
        k: fraction of tokens to average, in ``(0, 1]``; ``k = 1`` gives :func:`mia_loss`.

    Returns:
        A tensor ``[N]`` in the dtype of ``log_probs``.

    Raises:
        ValueError: if ``k`` is not in ``(0, 1]``, plus the checks of :func:`mia_loss`.

    Example:
        >>> # 5 tokens, ceil(0.4 * 5) = 2 lowest: -4 and -3, so score = 3.5
        >>> mia_min_k(torch.tensor([[-1.0, -4.0, -2.0, -3.0, -0.5]]), k=0.4)
        tensor([3.5000])
    """
    _check_k(k)
    mask = _check_log_probs(log_probs, mask)
    return -_lowest_fraction_mean(log_probs, mask, k)


def mia_min_k_plus_plus(
    log_probs: Tensor,
    mu: Tensor,
    sigma: Tensor,
    mask: Tensor | None = None,
    k: float = 0.2,
    eps: float = 1e-3,
) -> Tensor:
    """Min-K%++ score: :func:`mia_min_k` over the z-scores ``(log p - mu) / sigma``.

    ``mu`` and ``sigma`` are the mean and standard deviation of ``log p`` under the model's
    predictive distribution at each position (from :func:`token_logprob_stats`), as in MIMIR
    ``mimir/attacks/min_k_plus_plus.py``. Lower = more likely a member.

    ``sigma`` is clamped to at least ``eps``, which MIMIR does not do (it returns NaN or inf):

    - a point-mass prediction (``sigma = 0``, common for a model that has memorized its data)
      then gives a finite z-score, about 0 when the target is the predicted token and very
      negative when it is not;
    - a (near-)uniform prediction has ``sigma = 0`` too, and there ``log p - mu`` is float32
      rounding noise of order ``1e-7 * |mu|`` (about ``1e-6`` for a 30k vocabulary); the
      default ``eps = 1e-3`` keeps that noise below ``1e-2`` in z, where ``eps = 1e-6`` would
      turn it into a z-score of order 1. Lower ``eps`` only with float64 statistics.

    Args:
        log_probs: ``[N, T]`` float ``log p`` of each target token.
        mu: ``[N, T]`` float ``sum_v p_v log p_v`` at each position.
        sigma: ``[N, T]`` float, non-negative standard deviation of ``log p`` at each position.
        mask: optional ``[N, T]`` bool, True at valid targets.
        k: fraction of tokens to average, in ``(0, 1]``.
        eps: lower bound applied to ``sigma``.

    Returns:
        A tensor ``[N]`` in the dtype of ``log_probs``.

    Raises:
        TypeError / ValueError: on a wrong dtype or shape of ``mu`` / ``sigma``, a negative or
            NaN ``sigma`` at a valid position, plus the checks of :func:`mia_min_k`.

    Example:
        >>> log_p = torch.tensor([[-3.0, -1.0, 0.0]])  # mu = -1, sigma = 1: z-scores -2, 0, 1
        >>> mia_min_k_plus_plus(log_p, torch.full((1, 3), -1.0), torch.ones(1, 3), k=0.5)  # ceil(1.5) = 2
        tensor([1.])
    """
    _check_k(k)
    mask = _check_log_probs(log_probs, mask)
    for name, x in (("mu", mu), ("sigma", sigma)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor [N, T] (see token_logprob_stats), got "
                f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}"
            )
        if x.shape != log_probs.shape:
            raise ValueError(
                f"{name} must have the shape of log_probs {tuple(log_probs.shape)}, got "
                f"{tuple(x.shape)}"
            )
    if bool(((sigma < 0) | torch.isnan(sigma) | torch.isnan(mu)).logical_and(mask).any()):
        raise ValueError(
            "sigma must be >= 0 and mu, sigma non-NaN at every valid position; "
            "compute them with token_logprob_stats"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite number > 0 (the floor of sigma), got {eps!r}; e.g. eps=1e-3")
    z = (log_probs - mu) / sigma.clamp(min=eps)
    z = torch.where(mask, z, torch.zeros_like(z))
    return -_lowest_fraction_mean(z.to(log_probs.dtype), mask, k)


# --------------------------------------------------------------------------------------------
# evaluation (higher = member)
# --------------------------------------------------------------------------------------------


def _check_scores_labels(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise TypeError(
            f"scores must be a 1-D floating-point tensor (higher = member), got "
            f"{scores.dtype if isinstance(scores, Tensor) else type(scores).__name__}"
        )
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"labels must be a 1-D bool or 0/1 tensor (True / 1 = member), got "
            f"{type(labels).__name__}"
        )
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"scores and labels must be 1-D with the same length, got {tuple(scores.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if labels.dtype != torch.bool and bool(((labels != 0) & (labels != 1)).any()):
        bad = labels[(labels != 0) & (labels != 1)][0]
        raise ValueError(f"labels must be 0 (non-member) or 1 (member), got {bad.item()}")
    target = labels.to(torch.long)
    n_pos = int(target.sum())
    if n_pos == 0 or n_pos == target.numel():
        raise ValueError(
            f"ROC needs both members and non-members, got {n_pos} member(s) and "
            f"{target.numel() - n_pos} non-member(s); score sequences of both kinds"
        )
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores holds NaN; check the per-sequence scores")
    # Dense ranks in [0, 1]: same order and ties as `scores`, so the ROC is unchanged, and
    # torchmetrics will not squash values outside [0, 1] with a sigmoid (which would create ties
    # between large scores in floating point).
    _, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    top = max(int(inverse.max()), 1)
    preds = inverse.to(torch.float64) / top
    return preds, target


def roc_auc(scores: Tensor, labels: Tensor) -> Tensor:
    """Area under the ROC curve of a membership score (higher score = member).

    Uses ``torchmetrics.functional.classification.binary_auroc`` on the exact (unbinned) curve;
    tied scores count one half. 1.0 = perfect attack, 0.5 = chance, 0.0 = perfectly inverted.
    To evaluate a MIMIR score (lower = member) pass its negation.

    Args:
        scores: ``[N]`` float scores, higher = more likely a member.
        labels: ``[N]`` bool or 0/1, True / 1 = member.

    Returns:
        A float32 scalar tensor.

    Raises:
        ValueError: if only one class is present, shapes differ, or a score is NaN.

    Example:
        >>> roc_auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0]))
        tensor(1.)
    """
    preds, target = _check_scores_labels(scores, labels)
    return binary_auroc(preds, target).to(torch.float32)


def tpr_at_fpr(scores: Tensor, labels: Tensor, fpr: float) -> Tensor:
    """True-positive rate of a membership score at a false-positive-rate budget.

    Defined as the **largest TPR over all score thresholds whose FPR is <= fpr** (no
    interpolation between ROC points), from
    ``torchmetrics.functional.classification.binary_roc``. With ``n`` non-members the achievable
    FPRs are multiples of ``1 / n``, so for ``n < 1 / fpr`` this is the TPR at zero false
    positives: with 100 non-members, TPR@0.1% FPR equals TPR@0% FPR.

    Args:
        scores: ``[N]`` float scores, higher = more likely a member.
        labels: ``[N]`` bool or 0/1, True / 1 = member.
        fpr: the false-positive budget in ``[0, 1]``, e.g. 0.01.

    Returns:
        A float32 scalar tensor.

    Raises:
        ValueError: if ``fpr`` is outside ``[0, 1]``, only one class is present, shapes differ,
            or a score is NaN.

    Example:
        >>> # the top score is a non-member: at FPR 0 no threshold admits any member
        >>> s, y = torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([0, 1, 1, 0])
        >>> tpr_at_fpr(s, y, 0.0), tpr_at_fpr(s, y, 0.5)
        (tensor(0.), tensor(1.))
    """
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be a rate in [0, 1], got {fpr!r}; e.g. 0.01 for 1% FPR")
    preds, target = _check_scores_labels(scores, labels)
    fpr_curve, tpr_curve, _ = binary_roc(preds, target)
    n_neg = int((target == 0).sum())
    false_pos = torch.round(fpr_curve.to(torch.float64) * n_neg)  # exact counts
    allowed = false_pos <= float(fpr) * n_neg + 1e-9
    return tpr_curve[allowed].max().to(torch.float32)
