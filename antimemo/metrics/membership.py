"""Membership inference (MIMIR-style scores, AUC and TPR@FPR) as a DDP-synced Metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from antimemo.functional.membership import (
    mia_loss,
    mia_min_k,
    mia_min_k_plus_plus,
    mia_zlib,
    roc_auc,
    tpr_at_fpr,
)

__all__ = ["MembershipInference"]

VALID_SCORES = ("loss", "zlib", "min_k", "min_k_plus_plus")


def _cat_state(state: list[Tensor] | Tensor) -> Tensor | None:
    """A ``cat`` state as one tensor (a list before sync, a tensor after), None if empty."""
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if len(state) > 0 else None


class MembershipInference(Metric):
    """How well simple membership-inference attacks separate members from non-members.

    Each :meth:`update` takes a batch of sequences, some training members and some held-out
    non-members, as per-token log-probabilities (see
    :func:`antimemo.functional.membership.token_logprob_stats`) and computes one score per
    sequence and attack, MIMIR convention (lower = member):

    - ``loss``: ``-mean log p``;
    - ``zlib``: ``loss / len(zlib.compress(utf8 text))`` (needs ``texts``);
    - ``min_k``: ``-mean`` of the lowest ``ceil(min_k * n)`` token log-probs;
    - ``min_k_plus_plus``: the same over ``(log p - mu) / sigma`` (needs ``mu`` and ``sigma``).

    The scores and member labels are kept in ``cat`` states (so DDP gathers them exactly) and
    :meth:`compute` negates each score (higher = member) and returns, for each ``name``:
    ``f"{name}/auc"`` (ROC AUC), ``f"{name}/tpr_at_1pct_fpr"`` and ``f"{name}/tpr_at_0.1pct_fpr"``
    (largest TPR over thresholds whose FPR is at most the budget; see
    :func:`antimemo.functional.membership.tpr_at_fpr`). An AUC near 0.5 means the attack cannot
    tell members from non-members.

    Members and non-members must come from **one random split** of the same data (Duan et al.,
    COLM 2024); otherwise the attack measures distribution shift, not memorization.

    Args:
        scores: attacks to run, a non-empty subset of
            ``("loss", "zlib", "min_k", "min_k_plus_plus")``.
        min_k: fraction ``k`` in ``(0, 1]`` of lowest tokens for ``min_k`` and
            ``min_k_plus_plus``.
        **kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = MembershipInference(scores=("loss", "min_k"))
        >>> log_probs = torch.tensor([[-0.1, -0.2], [-0.3, -0.1], [-2.0, -3.0], [-1.0, -4.0]])
        >>> metric.update(log_probs, is_member=torch.tensor([True, True, False, False]))
        >>> metric.compute()["loss/auc"]
        tensor(1.)
    """

    is_differentiable = False
    higher_is_better = None  # AUC 0.5 (chance) is the private ideal, not 0 or 1
    full_state_update = False

    labels: list[Tensor]

    def __init__(
        self,
        scores: Sequence[str] = VALID_SCORES,
        min_k: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(scores, str):
            scores = (scores,)
        scores = tuple(scores)
        unknown = [s for s in scores if s not in VALID_SCORES]
        if unknown or not scores:
            raise ValueError(
                f"unknown membership score(s) {unknown!r} in scores={scores!r}; valid scores are "
                f"{VALID_SCORES}"
                if unknown
                else f"scores must name at least one of {VALID_SCORES}, got an empty sequence"
            )
        if len(set(scores)) != len(scores):
            raise ValueError(f"scores must not repeat a name, got {scores!r}")
        if isinstance(min_k, bool) or not isinstance(min_k, (int, float)) or not 0 < min_k <= 1:
            raise ValueError(
                f"min_k must be a fraction in (0, 1], got {min_k!r}; 0.2 averages the lowest "
                f"20% of token log-probs"
            )
        self.scores = scores
        self.min_k = float(min_k)
        for name in scores:
            self.add_state(f"score_{name}", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(
        self,
        log_probs: Tensor,
        is_member: Tensor | Sequence[bool],
        mask: Tensor | None = None,
        mu: Tensor | None = None,
        sigma: Tensor | None = None,
        texts: Sequence[str | bytes] | None = None,
    ) -> None:
        """Score a batch of sequences and store the scores with their labels.

        Args:
            log_probs: ``[N, T]`` float ``log p`` of each target token.
            is_member: ``[N]`` bool or 0/1, True = the sequence was trained on.
            mask: optional ``[N, T]`` bool, True at valid targets (default: all valid).
            mu: ``[N, T]`` mean of ``log p`` under the predictive distribution; required when
                ``"min_k_plus_plus"`` is among the scores.
            sigma: ``[N, T]`` standard deviation of ``log p``; required with ``mu``.
            texts: ``N`` strings or bytes, the text of each sequence; required when ``"zlib"``
                is among the scores.

        Raises:
            ValueError: if an input a chosen score needs is missing, or shapes disagree.
        """
        if not isinstance(log_probs, Tensor):
            raise TypeError(
                f"log_probs must be a float tensor [N, T], got {type(log_probs).__name__}"
            )
        labels = torch.as_tensor(is_member, device=log_probs.device)
        if labels.ndim != 1 or log_probs.ndim < 1 or labels.shape[0] != log_probs.shape[0]:
            raise ValueError(
                f"is_member must be 1-D with one label per row of log_probs "
                f"({tuple(log_probs.shape)}), got shape {tuple(labels.shape)}"
            )
        if labels.dtype != torch.bool and bool(((labels != 0) & (labels != 1)).any()):
            raise ValueError("is_member must hold bools or 0/1 (1 = member)")
        if "zlib" in self.scores and texts is None:
            raise ValueError(
                "the 'zlib' score needs texts=[...] (one string per sequence); pass texts or "
                "drop 'zlib' from scores"
            )
        if "min_k_plus_plus" in self.scores and (mu is None or sigma is None):
            raise ValueError(
                "the 'min_k_plus_plus' score needs mu and sigma [N, T] (from "
                "antimemo.functional.membership.token_logprob_stats); pass them or drop "
                "'min_k_plus_plus' from scores"
            )
        computed: dict[str, Tensor] = {}
        for name in self.scores:
            if name == "loss":
                value = mia_loss(log_probs, mask)
            elif name == "zlib":
                assert texts is not None  # checked above
                value = mia_zlib(log_probs, texts, mask)
            elif name == "min_k":
                value = mia_min_k(log_probs, mask, k=self.min_k)
            else:
                assert mu is not None and sigma is not None  # checked above
                value = mia_min_k_plus_plus(log_probs, mu, sigma, mask, k=self.min_k)
            computed[name] = value
        # append only after every score succeeded, so a failed update leaves the state intact
        for name, value in computed.items():
            getattr(self, f"score_{name}").append(
                value.detach().to(device=self.device, dtype=self.dtype)
            )
        self.labels.append(labels.to(device=self.device, dtype=self.dtype))

    def compute(self) -> dict[str, Tensor]:
        """Return ``{f"{name}/auc", f"{name}/tpr_at_1pct_fpr", f"{name}/tpr_at_0.1pct_fpr"}`` per score.

        Raises:
            ValueError: if nothing was added, or only members or only non-members were added
                (on all ranks together).
        """
        labels = _cat_state(self.labels)
        if labels is None or labels.numel() == 0:
            raise ValueError(
                "MembershipInference.compute() called before any update(log_probs, is_member)"
            )
        n_members = int(labels.sum())
        if n_members == 0 or n_members == labels.numel():
            raise ValueError(
                f"MembershipInference needs both members and non-members, got {n_members} "
                f"member(s) and {labels.numel() - n_members} non-member(s); update with "
                f"held-out sequences (is_member=False) from the same random split too"
            )
        target = labels > 0.5
        out: dict[str, Tensor] = {}
        for name in self.scores:
            state = _cat_state(getattr(self, f"score_{name}"))
            higher_is_member = -state  # type: ignore[operator]
            out[f"{name}/auc"] = roc_auc(higher_is_member, target)
            out[f"{name}/tpr_at_1pct_fpr"] = tpr_at_fpr(higher_is_member, target, 0.01)
            out[f"{name}/tpr_at_0.1pct_fpr"] = tpr_at_fpr(higher_is_member, target, 0.001)
        return out
