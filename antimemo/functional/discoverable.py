"""Extraction risk from one teacher-forced pass: greedy match and sampling probability.

A probe is a training sequence cut into a prefix of ``P`` tokens and a true suffix of ``S``
tokens. Run the model once over the whole probe (teacher forcing); the logits at positions
``P - 1 .. P + S - 2`` are the model's next-token distributions *under the true preceding
tokens* at every suffix position. They answer two attacker questions without decoding:

- **Greedy (discoverable) extraction**, Carlini et al. (ICLR 2023): greedy decoding reproduces
  the suffix exactly iff, at every suffix position, the argmax under the true preceding tokens
  is the true token. :func:`teacher_forced_greedy_match` returns that verdict and how many
  leading suffix tokens greedy decoding reproduces.
- **Probabilistic discoverable extraction**, Hayes et al. (2024, "Measuring memorization in
  language models via probabilistic extraction"): ``p_z``, the probability that a sampling
  scheme emits exactly the true suffix, is the product over suffix positions of the probability
  the scheme gives the true token. :func:`suffix_sampling_probability` and
  :func:`suffix_sampling_log_probability` compute it; :func:`discoverable_probability` turns it
  into the chance ``1 - (1 - p_z)^n`` that ``n`` independent samples contain the suffix; the
  suffix is ``(n, p)``-discoverable when that is ``>= p``.

**Alignment.** Every function takes ``logits`` of shape ``[N, S, V]`` and ``target`` of shape
``[N, S]`` with ``logits[i, j]`` the distribution from which ``target[i, j]`` is drawn. From a
forward over whole probes ``seq`` (``[N, P + S]``, ``out = model(input_ids=seq).logits``,
position ``t`` predicting token ``t + 1``) that is ``logits = out[:, P - 1 : P + S - 1]`` and
``target = seq[:, P:]``; :func:`suffix_logits` does the slicing.

**Sampling scheme**, exactly as ``transformers``' ``generate(do_sample=True, temperature=...,
top_k=..., top_p=...)`` applies its logits processors (``TemperatureLogitsWarper``, then
``TopKLogitsWarper``, then ``TopPLogitsWarper``; checked against transformers 5.x by the Monte
Carlo test in ``tests/test_discoverable.py``), in float32 (or the logits' dtype if wider):

1. temperature: ``scores = logits / temperature``;
2. top-k: tokens whose score is below the ``k``-th largest are removed (ties with the ``k``-th
   are all kept, as in ``transformers``);
3. top-p (nucleus), on the top-k-truncated scores: sort ascending, ``c = cumsum(softmax)``;
   tokens with ``c <= 1 - top_p`` are removed, the most likely token always stays;
4. the probability of a token is ``softmax`` of the remaining scores (renormalised); a removed
   token has probability 0 (log-probability ``-inf``).

``top_k=None`` and ``top_p=None`` (or ``top_p=1.0``) switch truncation off, like ``top_k=0``
and ``top_p=1.0`` in ``transformers``. Note that ``generate`` defaults to ``top_k=50``
(``GenerationConfig``): pass the same scheme to both. The per-token log-probabilities are float32
(float64 logits stay float64) and their sum over the suffix is float64, so ``log p_z`` never
underflows; ``p_z = exp(log p_z)`` can underflow to 0 for long suffixes, which is why the metric
works from ``log p_z``.

No Lightning import: any training loop can use these.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from antimemo._checks import is_int, is_number

__all__ = [
    "check_sampling_scheme",
    "discoverable_probability",
    "sampling_log_probs",
    "suffix_logits",
    "suffix_sampling_log_probability",
    "suffix_sampling_probability",
    "teacher_forced_greedy_match",
]


def check_sampling_scheme(temperature: Any = 1.0, top_k: Any = None, top_p: Any = None) -> tuple[float, int | None, float | None]:
    """Check a sampling scheme and return it normalised (``top_p=1.0`` becomes ``None``).

    Raises:
        ValueError: ``temperature`` not a finite number > 0, ``top_k`` not ``None`` or an integer
            >= 1, ``top_p`` not ``None`` or a number in ``(0, 1]``.

    Example:
        >>> check_sampling_scheme(0.7, 40, 1.0)
        (0.7, 40, None)
    """
    if not is_number(temperature) or float(temperature) <= 0.0:
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature!r}; 1.0 samples from the "
            "model's own distribution (greedy decoding is teacher_forced_greedy_match, not temperature=0)"
        )
    if top_k is not None and (not is_int(top_k) or int(top_k) < 1):
        raise ValueError(
            f"top_k must be None (no top-k truncation) or an integer >= 1, got {top_k!r}; "
            "transformers' top_k=0 means None here"
        )
    if top_p is not None and (not is_number(top_p) or not 0.0 < float(top_p) <= 1.0):
        raise ValueError(
            f"top_p must be None (no nucleus truncation) or a number in (0, 1], got {top_p!r}; "
            "e.g. top_p=0.9 keeps the smallest set of tokens holding 90% of the probability"
        )
    top_p = None if top_p is None or float(top_p) >= 1.0 else float(top_p)
    return float(temperature), (None if top_k is None else int(top_k)), top_p


def _check_logits_target(logits: Any, target: Any) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        what = f"dtype {logits.dtype}" if isinstance(logits, Tensor) else type(logits).__name__
        raise TypeError(
            f"logits must be a floating-point tensor [N, S, V] (the suffix positions' logits), "
            f"got {what}; pass model(input_ids=probes).logits[:, P - 1 : P + S - 1] (suffix_logits does it)"
        )
    if not isinstance(target, Tensor) or target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        what = f"dtype {target.dtype}" if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"target must be an integer tensor [N, S] of the true suffix token ids, got {what}")
    if logits.dim() != 3 or target.dim() != 2 or logits.shape[:2] != target.shape:
        raise ValueError(
            f"logits must be [N, S, V] and target [N, S] with the same N and S (logits[i, j] is the "
            f"distribution of target[i, j]), got logits {tuple(logits.shape)} and target "
            f"{tuple(target.shape)}; slice the logits with suffix_logits(logits, prefix_length)"
        )
    if target.shape[1] < 1 or logits.shape[2] < 1:
        raise ValueError(f"need at least one suffix token and one vocabulary entry, got logits {tuple(logits.shape)}")
    if logits.device != target.device:
        raise ValueError(
            f"logits and target must be on the same device, got {logits.device} and {target.device}; "
            "move one with .to(other.device)"
        )
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= logits.shape[2]):
        raise ValueError(
            f"target token ids must be in [0, V) = [0, {logits.shape[2]}), got values in "
            f"[{int(target.min())}, {int(target.max())}]; padding (-100) has no place in a probe's suffix"
        )


def suffix_logits(logits: Tensor, prefix_length: int) -> Tensor:
    """The logits that predict the suffix tokens, from a forward over whole probes.

    ``logits`` is ``[N, P + S, V]`` with position ``t`` predicting token ``t + 1`` (what a causal
    LM returns); the result is ``logits[:, P - 1 : -1]``, ``[N, S, V]``, aligned with
    ``probes[:, P:]``.

    Example:
        >>> suffix_logits(torch.zeros(2, 10, 5), prefix_length=6).shape
        torch.Size([2, 4, 5])
    """
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be [N, P + S, V], got {getattr(logits, 'shape', type(logits).__name__)}")
    if not is_int(prefix_length) or not 1 <= prefix_length < logits.shape[1]:
        raise ValueError(
            f"prefix_length must be an integer in [1, {logits.shape[1] - 1}] for logits over "
            f"{logits.shape[1]} positions, got {prefix_length!r}"
        )
    return logits[:, prefix_length - 1 : -1]


def sampling_log_probs(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Log-probabilities ``[..., V]`` under the sampling scheme (temperature, then top-k, then
    top-p, renormalised; removed tokens ``-inf``), in float32 or the logits' wider dtype.

    Example:
        >>> lp = sampling_log_probs(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), top_k=2)
        >>> [round(p, 4) for p in lp.exp()[0].tolist()]
        [0.7311, 0.2689, 0.0, 0.0]
    """
    temperature, top_k, top_p = check_sampling_scheme(temperature, top_k, top_p)
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        scores = scores / temperature
    vocab = scores.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p is not None:
        ordered, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # the most likely token always stays
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, -math.inf)
    return scores.log_softmax(dim=-1)


def suffix_sampling_log_probability(
    logits: Tensor,
    target: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """``log p_z`` per probe: the log-probability that the sampling scheme emits exactly
    ``target`` given the true preceding tokens (Hayes et al. 2024).

    Args:
        logits: ``[N, S, V]`` teacher-forced logits at the suffix positions, ``logits[i, j]`` the
            distribution of ``target[i, j]`` (see the module docstring, "Alignment").
        target: ``[N, S]`` true suffix token ids.
        temperature, top_k, top_p: the scheme, applied in that order (as ``transformers``).

    Returns:
        float64 tensor ``[N]``, ``<= 0``; ``-inf`` where some true token is truncated away.

    Example:
        >>> logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.9, 0.0]]]))
        >>> suffix_sampling_log_probability(logits, torch.tensor([[1, 1]])).exp()
        tensor([0.2700], dtype=torch.float64)
        >>> suffix_sampling_log_probability(logits, torch.tensor([[1, 1]]), top_k=1)
        tensor([-inf], dtype=torch.float64)
    """
    _check_logits_target(logits, target)
    log_probs = sampling_log_probs(logits, temperature, top_k, top_p)
    per_token = log_probs.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    return per_token.to(torch.float64).sum(dim=-1)


def suffix_sampling_probability(
    logits: Tensor,
    target: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """``p_z`` per probe, ``exp`` of :func:`suffix_sampling_log_probability` (float64 ``[N]``;
    it underflows to 0 below about ``1e-308``: keep the log for long suffixes).

    Example:
        >>> logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.9, 0.0]]]))
        >>> # top_p=0.6 keeps {0.5, 0.3} then {0.9}: (0.5 / 0.8) * (0.9 / 0.9)
        >>> suffix_sampling_probability(logits, torch.tensor([[0, 1]]), top_p=0.6)
        tensor([0.6250], dtype=torch.float64)
    """
    return suffix_sampling_log_probability(logits, target, temperature, top_k, top_p).exp()


def discoverable_probability(log_pz: Tensor, n: int) -> Tensor:
    """``1 - (1 - p_z)^n``: the chance that ``n`` independent samples contain the suffix,
    computed from ``log p_z`` as ``-expm1(n * log1p(-p_z))`` (with ``log(1 - p_z)`` taken as
    ``log(-expm1(log p_z))`` when ``p_z > 1/2``), exact for ``p_z`` as small as float64 allows.

    Example:
        >>> discoverable_probability(torch.tensor([0.0, -math.inf, math.log(1e-3)]), n=1000)
        tensor([1.0000, 0.0000, 0.6323], dtype=torch.float64)
    """
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (the number of samples), got {n!r}")
    log_pz = log_pz.to(torch.float64)
    log_1m = torch.where(
        log_pz > -math.log(2.0),
        torch.log(-torch.expm1(log_pz)),
        torch.log1p(-torch.exp(log_pz)),
    )
    return -torch.expm1(int(n) * log_1m)


def teacher_forced_greedy_match(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Whether greedy decoding reproduces each suffix, and how many leading tokens it gets right,
    from teacher-forced logits alone.

    Greedy decoding emits ``target[i, 0]`` iff ``argmax logits[i, 0] == target[i, 0]``; having
    emitted the true tokens so far, its next distribution *is* the teacher-forced one, so it
    reproduces the first ``r`` tokens iff the argmax matches at positions ``0 .. r - 1``. Hence
    ``reproduced_length`` is the index of the first mismatch (``S`` when none) and
    ``exact_match`` is ``reproduced_length == S``. Ties: ``torch.argmax`` returns the first
    maximal index, as :func:`~antimemo.functional.greedy_generate` does, so they agree on exact
    ties; they can differ only where the top two logits differ by float rounding between a KV-cached
    and a full forward.

    Args:
        logits: ``[N, S, V]`` teacher-forced logits at the suffix positions (module docstring).
        target: ``[N, S]`` true suffix token ids.

    Returns:
        ``(exact_match, reproduced_length)``: a bool tensor ``[N]`` and a long tensor ``[N]``.

    Example:
        >>> logits = torch.nn.functional.one_hot(torch.tensor([[3, 1, 2], [3, 0, 2]]), 4).float()
        >>> teacher_forced_greedy_match(logits, torch.tensor([[3, 1, 2], [3, 1, 2]]))
        (tensor([ True, False]), tensor([3, 1]))
    """
    _check_logits_target(logits, target)
    hits = logits.argmax(dim=-1) == target
    reproduced = hits.to(torch.long).cumprod(dim=-1).sum(dim=-1)
    return reproduced == target.shape[1], reproduced
