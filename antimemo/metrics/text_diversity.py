"""Diversity and tail coverage of generated text as DDP-synced ``torchmetrics.Metric`` classes.

- :class:`TextDiversity`: distinct-n and n-gram entropy of generations for several ``n``.
- :class:`TailCoverage`: how many rare held-out n-grams the generations still contain, how many
  the model still gives a fair probability, and the held-out loss.

The math is :mod:`antimemo.functional.text_diversity`; see ``docs/collapse.md``, "Diversity and
tails".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from antimemo._checks import check_int
from antimemo.functional.text_diversity import (
    RareNgrams,
    _as_batch,
    _best_log_probs,
    _check_threshold,
    _check_vocab_size,
    _distinct_and_entropy,
    _ngram_sums,
    _rare_spec,
    _token_log_probs,
    ngram_keys,
)

__all__ = ["TailCoverage", "TextDiversity"]


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    """A ``cat`` state as one int64 tensor (a list before sync, a tensor after it)."""
    if isinstance(state, Tensor):
        return state.long()
    return dim_zero_cat(state).long() if state else torch.zeros(0, dtype=torch.long)


class TextDiversity(Metric):
    """Distinct-n and n-gram entropy of generated token ids, for each ``n`` in ``ns``.

    The n-gram keys of every update are kept in ``cat`` states (one per ``n``), and
    :meth:`compute` counts the distinct keys of their union, so under DDP the values are exactly
    those of one process seeing every rank's generations (a sum of per-rank distinct counts
    would count an n-gram generated on two ranks twice).

    :meth:`compute` returns ``distinct_{n}`` (distinct / total n-grams) and ``entropy_{n}``
    (nats) for each ``n``; ``nan`` when no n-gram was seen.

    Args:
        ns: the n-gram lengths, distinct integers ``>= 1``.
        vocab_size: n-gram key scheme (:func:`~antimemo.functional.text_diversity.ngram_keys`).
        **kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> m = TextDiversity(ns=(1, 2))
        >>> m.update(torch.tensor([[1, 2, 1, 2]]))
        >>> m.update(torch.tensor([[3, 3, 3, 3]]))
        >>> {k: round(float(v), 4) for k, v in m.compute().items()}
        {'distinct_1': 0.375, 'entropy_1': 1.0397, 'distinct_2': 0.5, 'entropy_2': 1.0114}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ns: Sequence[int] = (1, 2, 3, 4), vocab_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(ns, (str, bytes)) or not isinstance(ns, Sequence) or not ns:
            raise ValueError(f"ns must be a non-empty sequence of n-gram lengths, got {ns!r}; e.g. ns=(1, 2, 3, 4)")
        ns = tuple(check_int("ns", n, 1, "each is an n-gram length, e.g. ns=(1, 2, 3, 4)") for n in ns)
        if len(set(ns)) != len(ns):
            raise ValueError(f"ns must hold distinct n-gram lengths, got {ns!r}")
        self.ns = ns
        self.vocab_size = _check_vocab_size(vocab_size)
        for n in ns:
            self.add_state(f"keys_{n}", default=[], dist_reduce_fx="cat")

    def update(self, token_ids: Tensor | Sequence[Tensor], attention_mask: Tensor | None = None) -> None:
        """Add the n-grams of a batch of generations (integer ``[B, T]`` or a list of 1-D tensors)."""
        for n in self.ns:
            keys = ngram_keys(token_ids, n, attention_mask, self.vocab_size)
            getattr(self, f"keys_{n}").append(keys.to(self.device))  # appended even when empty: every rank has a tensor

    def compute(self) -> dict[str, Tensor]:
        """``distinct_{n}`` and ``entropy_{n}`` over every generation so far (all ranks)."""
        out: dict[str, Tensor] = {}
        for n in self.ns:
            distinct, entropy = _distinct_and_entropy(_cat(getattr(self, f"keys_{n}")))
            out[f"distinct_{n}"], out[f"entropy_{n}"] = distinct, entropy
        return out


class TailCoverage(Metric):
    """Coverage of the rare held-out n-grams by the model, and its held-out loss.

    Two kinds of update, either or both:

    - :meth:`update` with generations: ``tail_coverage`` is the fraction of the rare n-grams
      generated at least once (:func:`~antimemo.functional.text_diversity.tail_coverage`).
    - :meth:`update_heldout` with the logits of one teacher-forced pass over held-out sequences:
      ``tail_probability_coverage`` is the fraction of the (scored) rare n-grams whose best
      occurrence has a geometric-mean token probability ``>= threshold``
      (:func:`~antimemo.functional.text_diversity.tail_probability_coverage`), and
      ``heldout_loss`` the mean token negative log-likelihood (nats/token) of those sequences.

    The states have the fixed size of the rare set (hit counts: ``sum``; best log-probability:
    ``max``; scored flags: ``sum``) plus the loss sums, so under DDP the results are exactly
    those of one process seeing every rank's data. A figure without its kind of update is ``nan``.

    Args:
        rare: a :class:`~antimemo.functional.text_diversity.RareNgrams` (from
            :func:`~antimemo.functional.text_diversity.rare_ngrams`) or a 1-D int64 key tensor.
        n, vocab_size: only for a key tensor ``rare``.
        threshold: per-token probability in ``(0, 1]`` of ``tail_probability_coverage``.
        **kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> from antimemo.functional.text_diversity import rare_ngrams
        >>> rare = rare_ngrams(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 1, 2]]), 1, 0.5, vocab_size=10)
        >>> m = TailCoverage(rare, threshold=0.5)
        >>> m.update(torch.tensor([[4, 4, 1]]))
        >>> float(m.compute()["tail_coverage"])
        0.5
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        rare: RareNgrams | Tensor,
        n: int | None = None,
        threshold: float = 0.01,
        vocab_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        keys, self.n, self.vocab_size = _rare_spec(rare, n, vocab_size)
        if keys.numel() == 0:
            raise ValueError(
                "rare is empty: there are no rare n-grams to cover; use more held-out text, a smaller n or a larger "
                "quantile in rare_ngrams"
            )
        self.threshold = _check_threshold(threshold)
        self._rare = keys.detach().cpu()  # not a state: the same on every rank, never synced
        r = keys.numel()
        self.add_state("generated_hits", default=torch.zeros(r, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("generations", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("best_log_prob", default=torch.full((r,), float("-inf"), dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("scored", default=torch.zeros(r, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nll_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("nll_count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def rare_keys(self) -> Tensor:
        """The sorted rare n-gram keys (CPU)."""
        return self._rare

    def update(
        self,
        generated: Tensor | Sequence[Tensor] | None = None,
        attention_mask: Tensor | None = None,
        *,
        logits: Tensor | None = None,
        heldout: Tensor | None = None,
        heldout_mask: Tensor | None = None,
    ) -> None:
        """Add a batch of generations, and/or the teacher-forced ``logits`` ``[B, T, V]`` of a batch
        of held-out sequences ``heldout`` ``[B, T]`` (see :meth:`update_heldout`)."""
        if generated is None and logits is None:
            raise ValueError("TailCoverage.update needs generated=..., or logits=... with heldout=..., or both")
        if generated is not None:
            keys = ngram_keys(generated, self.n, attention_mask, self.vocab_size).to(self.device)
            self.generated_hits += torch.isin(self._rare.to(self.device), keys).long()
            self.generations += len(generated)
        if logits is not None:
            if heldout is None:
                raise ValueError("heldout is required with logits: the held-out token ids [B, T] the logits score")
            ids, mask = _as_batch(heldout, heldout_mask, "heldout")
            lp, valid = _token_log_probs(logits, ids, mask)
            self.nll_sum += -lp[valid].double().sum().to(self.device)
            self.nll_count += int(valid.sum())
            occ, occ_lp = _ngram_sums(lp, ids, mask, self.n, self.vocab_size)
            best, scored = _best_log_probs(self._rare.to(self.device), occ.to(self.device), occ_lp.to(self.device))
            self.best_log_prob = torch.maximum(self.best_log_prob, best)
            self.scored += scored.long()

    def update_heldout(self, logits: Tensor, token_ids: Tensor, attention_mask: Tensor | None = None) -> None:
        """Score a batch of held-out sequences from their teacher-forced ``logits`` ``[B, T, V]``
        (position ``t`` predicts token ``t + 1``; log-probs work too):
        ``update(logits=logits, heldout=token_ids, heldout_mask=attention_mask)``."""
        self.update(logits=logits, heldout=token_ids, heldout_mask=attention_mask)

    def compute(self) -> dict[str, Tensor]:
        """``tail_coverage``, ``tail_probability_coverage`` and ``heldout_loss`` (``nan`` when not updated)."""
        nan = torch.tensor(float("nan"))
        out = {"tail_coverage": nan, "tail_probability_coverage": nan.clone(), "heldout_loss": nan.clone()}
        if int(self.generations) > 0:
            out["tail_coverage"] = (self.generated_hits > 0).float().mean().cpu()
        scored = self.scored > 0
        if bool(scored.any()):
            covered = self.best_log_prob[scored] >= self.n * math.log(self.threshold)
            out["tail_probability_coverage"] = covered.float().mean().cpu()
        if int(self.nll_count) > 0:
            out["heldout_loss"] = (self.nll_sum / self.nll_count).float().cpu()
        return out
