"""Diversity and tail coverage of generated text, as pure tensor functions (model collapse).

Training on generated text shrinks the distribution, and its tails disappear first (Shumailov et
al. 2024). The functions here measure both effects on token ids:

- :func:`distinct_n`: distinct n-grams / total n-grams over a batch of generations (corpus-level
  distinct-n, Li et al. 2016), in ``[0, 1]``; ``nan`` without any n-gram.
- :func:`ngram_entropy`: Shannon entropy, in nats, of the empirical n-gram distribution of the
  batch: ``H = -sum_g p_g log p_g`` with ``p_g = count_g / total``; ``nan`` without any n-gram.
- :func:`rare_ngrams`: the *rare* n-grams of real held-out text: the distinct held-out n-grams in
  the bottom ``quantile`` by their frequency in the training data (tie rule below).
- :func:`tail_coverage`: the fraction of the rare n-grams that a set of generations contains at
  least once.
- :func:`tail_probability_coverage`: the fraction of the rare n-grams that the model still gives
  a per-token probability of at least ``threshold`` in their held-out context, from one
  teacher-forced pass over the held-out sequences.

**Token ids** are an integer tensor ``[B, T]`` (with an optional ``attention_mask`` ``[B, T]``,
1 = text, 0 = padding) or a list of 1-D integer tensors of any lengths. An n-gram is ``n``
consecutive positions of one row, all of them text; n-grams never span two rows. Ids must be
``>= 0`` at text positions (``-100`` is allowed only under mask 0).

**N-gram keys.** Every n-gram becomes one int64 key, so that counting, set membership and DDP
gathering stay tensor operations (:func:`ngram_keys`):

- *exact packing*, when ``vocab_size = V`` is given and ``V**n <= 2**63``: ``key = sum_i t_i
  V**(n-1-i)`` (base-``V`` digits), which is injective; every id must be ``< V``;
- otherwise a *64-bit hash* (all arithmetic modulo ``2**64``, ``mix64`` the splitmix64 finalizer
  also used by :func:`~antimemo.functional.goldfish_mask`, ``GAMMA = 0x9E3779B97F4A7C15``)::

      h = mix64(n * GAMMA)
      for t in (t_0, ..., t_{n-1}):  h = mix64(h + (t + 1) * GAMMA)
      key = h  (as two's-complement int64)

  The hash does not depend on the vocabulary size. Distinct n-grams of one call are checked for
  collisions (``check_collisions=True``: as many distinct keys as distinct n-grams, else a
  ``RuntimeError``). Keys gathered from several calls (batches, ranks) are not re-checked; for
  ``M`` distinct n-grams the chance of any collision is at most ``M**2 / 2**65`` (``3e-8`` for a
  million).

Keys made with and without ``vocab_size`` live in different spaces: compute every key of one
measurement with the same ``vocab_size`` (:class:`RareNgrams` and :class:`NgramCounts` carry
theirs, and the functions taking them use it).

Example:
    >>> gens = torch.tensor([[1, 2, 1, 2], [3, 3, 3, 3]])
    >>> float(distinct_n(gens, 2))   # 6 bigrams, distinct: (1,2) (2,1) (3,3)
    0.5
    >>> round(float(ngram_entropy(gens, 1)), 4)  # unigrams 1, 2 (2 each) and 3 (4 times)
    1.0397
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from antimemo._checks import check_int, is_number
from antimemo.functional.goldfish import _GAMMA, _mix64_

__all__ = [
    "NgramCounts",
    "RareNgrams",
    "distinct_n",
    "ngram_counts",
    "ngram_entropy",
    "ngram_keys",
    "ngram_log_probs",
    "rare_ngrams",
    "tail_coverage",
    "tail_probability_coverage",
]

_MAX_KEY = 2**63


class NgramCounts(NamedTuple):
    """How often each n-gram occurs (:func:`ngram_counts`)."""

    keys: Tensor
    """int64 ``[K]``: the distinct n-gram keys, sorted ascending."""
    counts: Tensor
    """int64 ``[K]``: occurrences of each."""
    n: int
    """The n-gram length."""
    vocab_size: int | None
    """The ``vocab_size`` of the keys (``None``: hashed keys)."""


class RareNgrams(NamedTuple):
    """The rare n-grams of held-out text (:func:`rare_ngrams`)."""

    keys: Tensor
    """int64 ``[R]``: the rare n-gram keys, sorted ascending."""
    train_counts: Tensor
    """int64 ``[R]``: the training count of each rare n-gram."""
    threshold: int
    """The training count at the quantile: every candidate with a count ``<= threshold`` is rare."""
    num_candidates: int
    """Distinct held-out n-grams that were candidates (``M`` in the tie rule)."""
    n: int
    """The n-gram length."""
    vocab_size: int | None
    """The ``vocab_size`` of the keys (``None``: hashed keys)."""


# ----------------------------------------------------------------------------------- inputs


def _check_n(n: Any, name: str = "n") -> int:
    return check_int(name, n, 1, "it is the n-gram length, e.g. n=2 for bigrams")


def _check_vocab_size(vocab_size: Any) -> int | None:
    if vocab_size is None:
        return None
    return check_int("vocab_size", vocab_size, 1, "or None to hash the n-grams (no vocabulary needed)")


def _integer(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _as_batch(token_ids: Any, attention_mask: Any, name: str) -> tuple[Tensor, Tensor]:
    """``(ids [B, T] int64, mask [B, T] bool)`` from a tensor (+ mask) or a list of 1-D tensors."""
    if isinstance(token_ids, Tensor):
        if token_ids.dim() != 2 or not _integer(token_ids):
            raise ValueError(
                f"{name} must be an integer tensor [B, T] (one row per sequence) or a list of 1-D integer tensors, "
                f"got {token_ids.dtype} of shape {tuple(token_ids.shape)}; for one sequence use {name}[None]"
            )
        ids = token_ids.long()
        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            if not isinstance(attention_mask, Tensor) or attention_mask.shape != token_ids.shape:
                got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
                raise ValueError(
                    f"attention_mask must be a tensor of the shape of {name}, {tuple(token_ids.shape)}, got {got}; "
                    "1 marks text, 0 padding"
                )
            mask = attention_mask.to(ids.device) != 0
    elif isinstance(token_ids, Sequence) and not isinstance(token_ids, (str, bytes)):
        if attention_mask is not None:
            raise ValueError(
                f"attention_mask is only for a padded tensor {name} [B, T]; a list of 1-D tensors holds text only: "
                "pass attention_mask=None"
            )
        rows = list(token_ids)
        for i, row in enumerate(rows):
            if not isinstance(row, Tensor) or row.dim() != 1 or not _integer(row):
                got = f"{row.dtype} of shape {tuple(row.shape)}" if isinstance(row, Tensor) else type(row).__name__
                raise ValueError(f"{name}[{i}] must be a 1-D integer tensor of token ids, got {got}")
        length = max((r.numel() for r in rows), default=0)
        device = rows[0].device if rows else torch.device("cpu")
        ids = torch.zeros((len(rows), length), dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), length), dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            ids[i, : row.numel()] = row.to(device)
            mask[i, : row.numel()] = True
    else:
        raise TypeError(
            f"{name} must be an integer tensor [B, T] or a list of 1-D integer tensors, got {type(token_ids).__name__}"
        )
    if bool((ids[mask] < 0).any()):
        bad = int(ids[mask].min())
        raise ValueError(
            f"{name} holds a negative token id ({bad}) at a text position; mark padding with attention_mask=0 "
            "(or drop it from the rows)"
        )
    return ids, mask


def _windows(ids: Tensor, mask: Tensor, n: int) -> Tensor:
    """``[M, n]`` int64: every n-gram whose ``n`` positions are text, row-major order."""
    if ids.shape[1] < n:
        return ids.new_zeros((0, n))
    grams = ids.unfold(1, n, 1)  # [B, T - n + 1, n]
    valid = mask.unfold(1, n, 1).all(-1)
    return grams[valid]


def _packable(n: int, vocab_size: int | None) -> bool:
    return vocab_size is not None and vocab_size**n <= _MAX_KEY


def _keys_of(grams: Tensor, n: int, vocab_size: int | None) -> Tensor:
    """Keys of the n-gram rows ``grams`` ``[M, n]`` (the scheme of the module docstring)."""
    if _packable(n, vocab_size):
        assert vocab_size is not None
        if grams.numel() and int(grams.max()) >= vocab_size:
            raise ValueError(
                f"token id {int(grams.max())} is >= vocab_size={vocab_size}; pass the model's vocabulary size "
                "(logits.shape[-1]) or vocab_size=None to hash the n-grams"
            )
        key = torch.zeros(grams.shape[0], dtype=torch.long, device=grams.device)
        for i in range(n):
            key = key * vocab_size + grams[:, i]
        return key
    h = torch.full((grams.shape[0],), n, dtype=torch.long, device=grams.device)
    h *= _GAMMA
    _mix64_(h)
    for i in range(n):
        h += (grams[:, i] + 1) * _GAMMA
        _mix64_(h)
    return h


def ngram_keys(
    token_ids: Tensor | Sequence[Tensor],
    n: int,
    attention_mask: Tensor | None = None,
    vocab_size: int | None = None,
    check_collisions: bool = True,
) -> Tensor:
    """The int64 key of every n-gram of the rows (row-major order; see the module docstring).

    Args:
        token_ids: integer tensor ``[B, T]`` or a list of 1-D integer tensors.
        n: the n-gram length, ``>= 1``.
        attention_mask: ``[B, T]`` (1 = text, 0 = padding) for a tensor ``token_ids``; an n-gram
            must lie on text only.
        vocab_size: ``V`` for exact packing when ``V**n <= 2**63``; ``None`` hashes.
        check_collisions: with hashed keys, check that this call's distinct n-grams have distinct
            keys (a ``RuntimeError`` otherwise).

    Returns:
        LongTensor ``[M]``, one key per n-gram, on the device of ``token_ids``.

    Example:
        >>> ngram_keys(torch.tensor([[1, 2, 3]]), 2, vocab_size=10)  # 1*10+2, 2*10+3
        tensor([12, 23])
        >>> ngram_keys([torch.tensor([1, 2, 3]), torch.tensor([4])], 2).shape  # hashed; [4] has none
        torch.Size([2])
    """
    n = _check_n(n)
    vocab_size = _check_vocab_size(vocab_size)
    ids, mask = _as_batch(token_ids, attention_mask, "token_ids")
    grams = _windows(ids, mask, n)
    keys = _keys_of(grams, n, vocab_size)
    if check_collisions and not _packable(n, vocab_size) and keys.numel() > 1:
        distinct_keys = torch.unique(keys).numel()
        distinct_grams = torch.unique(grams, dim=0).shape[0]
        if distinct_keys != distinct_grams:  # pragma: no cover - about 2**-64 per pair
            raise RuntimeError(
                f"n-gram hash collision: {distinct_grams} distinct {n}-grams got {distinct_keys} distinct keys; "
                f"pass vocab_size (exact packing when vocab_size**n <= 2**63)"
            )
    return keys


def ngram_counts(
    token_ids: Tensor | Sequence[Tensor],
    n: int,
    attention_mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> NgramCounts:
    """The distinct n-grams of the rows (sorted keys) and how often each occurs.

    Example:
        >>> c = ngram_counts(torch.tensor([[1, 2, 1, 2]]), 2, vocab_size=10)
        >>> c.keys.tolist(), c.counts.tolist()
        ([12, 21], [2, 1])
    """
    n = _check_n(n)
    vocab_size = _check_vocab_size(vocab_size)
    keys, counts = torch.unique(ngram_keys(token_ids, n, attention_mask, vocab_size), return_counts=True)
    return NgramCounts(keys, counts.long(), n, vocab_size)


def _distinct_and_entropy(keys: Tensor) -> tuple[Tensor, Tensor]:
    """``(distinct-n, entropy in nats)`` of the n-gram occurrences ``keys`` (``nan`` when empty)."""
    if keys.numel() == 0:
        nan = torch.tensor(float("nan"))
        return nan, nan.clone()
    _, counts = torch.unique(keys, return_counts=True)
    total = keys.numel()
    p = counts.double() / total
    entropy = -(p * p.log()).sum()
    return torch.tensor(counts.numel() / total, dtype=torch.float32), entropy.float().cpu()


def distinct_n(
    token_ids: Tensor | Sequence[Tensor],
    n: int,
    attention_mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Distinct n-grams / total n-grams over all rows (corpus-level distinct-n).

    Args:
        token_ids: generations, integer ``[B, T]`` or a list of 1-D tensors.
        n: n-gram length (1 to 4 are the usual ones).
        attention_mask: ``[B, T]``, 1 = text (n-grams must lie on text).
        vocab_size: see :func:`ngram_keys` (the value does not change the result).

    Returns:
        A float scalar in ``(0, 1]``, ``nan`` when the rows hold no n-gram.

    Example:
        >>> float(distinct_n(torch.tensor([[5, 5, 5, 5]]), 1))
        0.25
    """
    return _distinct_and_entropy(ngram_keys(token_ids, n, attention_mask, vocab_size))[0]


def ngram_entropy(
    token_ids: Tensor | Sequence[Tensor],
    n: int,
    attention_mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Shannon entropy (nats) of the empirical n-gram distribution of all rows.

    ``H = -sum_g p_g log p_g``, ``p_g`` = occurrences of n-gram ``g`` / all n-gram occurrences.
    ``0`` when one n-gram repeats; ``log(M)`` for ``M`` distinct n-grams occurring equally often.

    Returns:
        A float scalar ``>= 0``, ``nan`` when the rows hold no n-gram.

    Example:
        >>> round(float(ngram_entropy(torch.tensor([[0, 1, 2, 3]]), 1)), 4)  # log 4
        1.3863
    """
    return _distinct_and_entropy(ngram_keys(token_ids, n, attention_mask, vocab_size))[1]


# ------------------------------------------------------------------------------------ tails


def _check_quantile(quantile: Any) -> float:
    if not is_number(quantile) or not 0 < quantile <= 1:
        raise ValueError(
            f"quantile must be a number in (0, 1], got {quantile!r}; 0.1 takes the bottom decile of the held-out "
            "n-grams by training frequency"
        )
    return float(quantile)


def rare_ngrams(
    reference: Tensor | Sequence[Tensor],
    train: Tensor | Sequence[Tensor] | NgramCounts,
    n: int,
    quantile: float = 0.1,
    *,
    reference_mask: Tensor | None = None,
    train_mask: Tensor | None = None,
    vocab_size: int | None = None,
    include_unseen: bool = True,
) -> RareNgrams:
    """The rare n-grams of real held-out text: the bottom ``quantile`` by training frequency.

    **Rule.** The candidates are the ``M`` distinct n-grams of ``reference`` (all of them, or
    with ``include_unseen=False`` those occurring at least once in the training data). Sort their
    training counts ascending, ``c_(1) <= ... <= c_(M)``, and let ``k = ceil(quantile * M)``.
    The threshold is ``c_(k)``, and **every** candidate with a training count ``<= c_(k)`` is
    rare: ties at the threshold are all kept, so no n-gram is picked over an equally frequent
    one, and the rare set can hold more than ``k`` n-grams (e.g. when many held-out n-grams never
    occur in training, count 0).

    Args:
        reference: the held-out sequences, integer ``[N, T]`` or a list of 1-D tensors.
        train: the training sequences (same forms), or their :class:`NgramCounts` from
            :func:`ngram_counts` (same ``n`` and ``vocab_size``).
        n: the n-gram length.
        quantile: in ``(0, 1]``; 0.1 is the bottom decile.
        reference_mask, train_mask: attention masks of tensor inputs.
        vocab_size: see :func:`ngram_keys`.
        include_unseen: keep the held-out n-grams that never occur in training as candidates.

    Returns:
        :class:`RareNgrams` (``keys`` sorted; empty when there is no candidate).

    Example:
        >>> train = torch.tensor([[1, 2, 1, 2, 1, 2, 3]])     # counts: 1 x5, 2 x3, 3 x1 (unigrams)
        >>> held = torch.tensor([[1, 2, 3, 4]])               # 4 never occurs in training
        >>> r = rare_ngrams(held, train, 1, quantile=0.5, vocab_size=10)
        >>> r.keys.tolist(), r.threshold, r.num_candidates   # k = ceil(0.5 * 4) = 2: counts 0, 1
        ([3, 4], 1, 4)
    """
    n = _check_n(n)
    vocab_size = _check_vocab_size(vocab_size)
    quantile = _check_quantile(quantile)
    if not isinstance(include_unseen, bool):
        raise TypeError(f"include_unseen must be a bool, got {include_unseen!r}")
    if isinstance(train, NgramCounts):
        if train.n != n or train.vocab_size != vocab_size:
            raise ValueError(
                f"train holds NgramCounts of n={train.n}, vocab_size={train.vocab_size}, but rare_ngrams got "
                f"n={n}, vocab_size={vocab_size}; count the training data with the same n and vocab_size"
            )
        counts = train
    else:
        counts = ngram_counts(train, n, train_mask, vocab_size)
    ref_keys = torch.unique(ngram_keys(reference, n, reference_mask, vocab_size))
    train_keys, train_counts = counts.keys.to(ref_keys.device), counts.counts.to(ref_keys.device)
    found = torch.zeros_like(ref_keys)
    if train_keys.numel():
        pos = torch.searchsorted(train_keys, ref_keys).clamp(max=train_keys.numel() - 1)
        hit = train_keys[pos] == ref_keys
        found = torch.where(hit, train_counts[pos], found)
    if not include_unseen:
        keep = found > 0
        ref_keys, found = ref_keys[keep], found[keep]
    m = ref_keys.numel()
    if m == 0:
        empty = torch.zeros(0, dtype=torch.long, device=ref_keys.device)
        return RareNgrams(empty, empty.clone(), 0, 0, n, vocab_size)
    k = max(1, math.ceil(quantile * m - 1e-9))
    threshold = int(torch.sort(found).values[k - 1])
    rare = found <= threshold
    return RareNgrams(ref_keys[rare], found[rare], threshold, m, n, vocab_size)


def _rare_spec(rare: Any, n: Any, vocab_size: Any) -> tuple[Tensor, int, int | None]:
    """``(sorted keys, n, vocab_size)`` of a :class:`RareNgrams` or a key tensor."""
    if isinstance(rare, RareNgrams):
        if n is not None and n != rare.n:
            raise ValueError(f"n={n!r} differs from the rare set's n={rare.n}; pass n=None to use the rare set's")
        if vocab_size is not None and vocab_size != rare.vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size!r} differs from the rare set's vocab_size={rare.vocab_size}; its keys were "
                "made with the latter: pass vocab_size=None"
            )
        return torch.sort(rare.keys).values, rare.n, rare.vocab_size
    if isinstance(rare, Tensor) and rare.dim() == 1 and rare.dtype == torch.long:
        if n is None:
            raise ValueError("n is required when rare is a key tensor (a RareNgrams carries its own n)")
        return torch.unique(rare), _check_n(n), _check_vocab_size(vocab_size)
    got = f"{rare.dtype} of shape {tuple(rare.shape)}" if isinstance(rare, Tensor) else type(rare).__name__
    raise TypeError(f"rare must be a RareNgrams (from rare_ngrams) or a 1-D int64 tensor of n-gram keys, got {got}")


def tail_coverage(
    generated: Tensor | Sequence[Tensor],
    rare: RareNgrams | Tensor,
    n: int | None = None,
    attention_mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """The fraction of the rare n-grams that occur at least once in the generations.

    Args:
        generated: integer ``[B, T]`` or a list of 1-D tensors.
        rare: a :class:`RareNgrams` (its ``n`` and ``vocab_size`` are used) or a 1-D int64 tensor
            of keys made with ``n`` and ``vocab_size``.
        n, vocab_size: only for a key tensor ``rare``.
        attention_mask: ``[B, T]``, 1 = text.

    Returns:
        A float scalar in ``[0, 1]``; ``nan`` for an empty rare set.

    Example:
        >>> rare = rare_ngrams(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 1, 2]]), 1, 0.5, vocab_size=10)
        >>> rare.keys.tolist()                       # 3 and 4 never occur in training
        [3, 4]
        >>> float(tail_coverage(torch.tensor([[4, 4, 1]]), rare))
        0.5
    """
    keys, n, vocab_size = _rare_spec(rare, n, vocab_size)
    if keys.numel() == 0:
        return torch.tensor(float("nan"))
    gen = ngram_keys(generated, n, attention_mask, vocab_size).to(keys.device)
    return torch.isin(keys, gen).float().mean().cpu()


def _token_log_probs(logits: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p(x_{t+1} | x_<=t) [B, T-1] float32, valid [B, T-1])``: valid when both positions are text."""
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape or not logits.is_floating_point():
        got = f"{logits.dtype} of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"logits must be a float tensor [B, T, V] = [{ids.shape[0]}, {ids.shape[1]}, V] (position t predicts "
            f"token t + 1; log-probs work too), got {got}"
        )
    ids = ids.to(logits.device)
    mask = mask.to(logits.device)
    valid = mask[:, 1:] & mask[:, :-1]
    targets = torch.where(valid, ids[:, 1:], torch.zeros_like(ids[:, 1:]))
    if targets.numel() and int(targets.max()) >= logits.shape[-1]:
        raise ValueError(f"token id {int(targets.max())} is outside the logits' vocabulary of {logits.shape[-1]}")
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    return lp, valid


def ngram_log_probs(
    logits: Tensor,
    token_ids: Tensor,
    n: int,
    attention_mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The teacher-forced log-probability of every n-gram occurrence that has a context.

    An occurrence of ``x_j .. x_{j+n-1}`` (``j >= 1``, positions ``j - 1 .. j + n - 1`` all
    text) scores ``log P = sum_{t=j}^{j+n-1} log p(x_t | x_<t)``: the probability that the model
    continues its true held-out context with exactly this n-gram. Occurrences at the start of a
    row (no context) are not scored.

    Args:
        logits: ``[B, T, V]`` logits of ``token_ids`` (position ``t`` predicts ``t + 1``);
            log-probs work too (``log_softmax`` leaves them unchanged).
        token_ids: integer ``[B, T]``.
        n: n-gram length.
        attention_mask: ``[B, T]``, 1 = text.
        vocab_size: see :func:`ngram_keys`.

    Returns:
        ``(keys [M] int64, log_probs [M] float32)``, one per scored occurrence.

    Example:
        >>> logits = torch.zeros(1, 3, 4)                  # uniform over 4 tokens
        >>> keys, lp = ngram_log_probs(logits, torch.tensor([[0, 1, 2]]), 2, vocab_size=4)
        >>> keys.tolist(), [round(v, 4) for v in lp.tolist()]   # only (1, 2) has a context
        ([6], [-2.7726])
    """
    n = _check_n(n)
    vocab_size = _check_vocab_size(vocab_size)
    ids, mask = _as_batch(token_ids, attention_mask, "token_ids")
    lp, _ = _token_log_probs(logits, ids, mask)
    return _ngram_sums(lp, ids, mask, n, vocab_size)


def _ngram_sums(lp: Tensor, ids: Tensor, mask: Tensor, n: int, vocab_size: int | None) -> tuple[Tensor, Tensor]:
    """:func:`ngram_log_probs` from the token log-probs ``lp`` ``[B, T-1]`` of :func:`_token_log_probs`."""
    if ids.shape[1] < n + 1:
        return torch.zeros(0, dtype=torch.long, device=lp.device), torch.zeros(0, device=lp.device)
    mask = mask.to(lp.device)
    scored = mask.unfold(1, n + 1, 1).all(-1)  # [B, T - n]: context j-1 and the n-gram j..j+n-1
    grams = ids.to(lp.device)[:, 1:].unfold(1, n, 1)[scored]
    sums = lp.unfold(1, n, 1).sum(-1)[scored]
    return _keys_of(grams, n, vocab_size), sums


def _check_threshold(threshold: Any) -> float:
    if not is_number(threshold) or not 0 < threshold <= 1:
        raise ValueError(
            f"threshold must be a per-token probability in (0, 1], got {threshold!r}; e.g. threshold=0.01 counts a "
            "rare n-gram as covered when its geometric-mean token probability is at least 1%"
        )
    return float(threshold)


def tail_probability_coverage(
    logits: Tensor,
    token_ids: Tensor,
    rare: RareNgrams | Tensor,
    threshold: float = 0.01,
    n: int | None = None,
    attention_mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """The fraction of the rare n-grams whose model probability is at least ``threshold`` per token.

    From one teacher-forced pass over the held-out sequences (``logits`` of ``token_ids``): each
    scored occurrence of a rare n-gram gets ``log P`` (:func:`ngram_log_probs`); a rare n-gram
    is covered when its best occurrence has ``P >= threshold**n``, i.e. a geometric-mean token
    probability ``>= threshold`` (so one threshold means the same for every ``n``). The fraction
    is over the rare n-grams with at least one scored occurrence in these sequences.

    Args:
        logits: ``[B, T, V]`` logits (or log-probs) of ``token_ids``.
        token_ids: the held-out sequences, integer ``[B, T]``.
        rare: :class:`RareNgrams` or a key tensor (then ``n``, ``vocab_size``).
        threshold: per-token probability in ``(0, 1]``.
        attention_mask: ``[B, T]``, 1 = text.

    Returns:
        A float scalar in ``[0, 1]``, ``nan`` when no rare n-gram is scored.

    Example:
        >>> ids = torch.tensor([[0, 1, 2, 3]])
        >>> logits = torch.full((1, 4, 4), -10.0)
        >>> logits[0, 0, 1] = 10.0                        # the model is sure of 1 after 0
        >>> rare = torch.tensor([1, 2])                   # unigram keys (vocab_size=4): tokens 1 and 2
        >>> float(tail_probability_coverage(logits, ids, rare, 0.5, n=1, vocab_size=4))
        0.5
    """
    keys, n, vocab_size = _rare_spec(rare, n, vocab_size)
    threshold = _check_threshold(threshold)
    occ, lp = ngram_log_probs(logits, token_ids, n, attention_mask, vocab_size)
    best, scored = _best_log_probs(keys.to(lp.device), occ, lp)
    if not bool(scored.any()):
        return torch.tensor(float("nan"))
    return (best[scored] >= n * math.log(threshold)).float().mean().cpu()


def _best_log_probs(keys: Tensor, occ: Tensor, lp: Tensor) -> tuple[Tensor, Tensor]:
    """Per rare key (sorted ``keys``): the best ``log P`` over the occurrences ``occ`` (``-inf``
    when none) and whether it has any (float64, bool)."""
    best = torch.full((keys.numel(),), float("-inf"), dtype=torch.float64, device=keys.device)
    scored = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
    if keys.numel() == 0 or occ.numel() == 0:
        return best, scored
    pos = torch.searchsorted(keys, occ).clamp(max=keys.numel() - 1)
    hit = keys[pos] == occ
    best.scatter_reduce_(0, pos[hit], lp[hit].double(), reduce="amax")
    scored[pos[hit]] = True
    return best, scored
