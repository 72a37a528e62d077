"""Canary exposure (Secret Sharer) as a DDP-synced ``torchmetrics.Metric``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from antimemo.functional.exposure import _as_scores, exposure_rank, exposure_skewnorm

__all__ = ["CanaryExposure"]

_METHODS = ("rank", "skewnorm")


def _cat_state(state: list[Tensor] | Tensor) -> Tensor | None:
    """A ``cat`` state as one tensor (a list before sync, a tensor after), None if empty."""
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if len(state) > 0 else None


class CanaryExposure(Metric):
    """Exposure of inserted canaries against never-inserted reference candidates.

    Feed the model's score (perplexity or loss; lower = more likely) of every inserted canary as
    ``canary_scores`` and of every never-inserted candidate from the same random space as
    ``reference_scores``; either may come in any call and in any number of calls. :meth:`compute`
    returns, for the requested ``methods``:

    - ``exposure_rank`` / ``exposure_rank_per_canary``: mean and per-canary
      ``log2 |R| - log2 rank`` with ``rank = 1 + #{references with score <= canary score}``
      (see :func:`antimemo.functional.exposure.exposure_rank` for the tie and ``|R|``
      conventions, which follow ``tensorflow/privacy``).
    - ``exposure_skewnorm`` / ``exposure_skewnorm_per_canary``: mean and per-canary
      ``-log2 CDF(canary score)`` under a skew-normal fitted to the references
      (:func:`antimemo.functional.exposure.exposure_skewnorm`).
    - ``max_exposure``: ``log2 |R|``, the largest value the rank form can take.

    Scores are kept in ``cat`` states, so under DDP every rank computes on the union of all
    ranks' canaries and references (canaries in rank order; the means do not depend on it).

    Args:
        methods: which forms to compute, a non-empty subset of ``("rank", "skewnorm")``.
        **kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = CanaryExposure(methods=("rank",))
        >>> metric.update(reference_scores=torch.arange(1.0, 9.0))  # 8 references: 1, 2, ..., 8
        >>> metric.update(canary_scores=torch.tensor([0.5, 4.5]))  # ranks 1 and 5
        >>> out = metric.compute()
        >>> out["exposure_rank_per_canary"]  # log2(8) - log2(1), log2(8) - log2(5)
        tensor([3.0000, 0.6781])
    """

    is_differentiable = False
    higher_is_better = False  # less exposure is better
    full_state_update = False

    canary_scores: list[Tensor]
    reference_scores: list[Tensor]

    def __init__(self, methods: Sequence[str] = ("rank", "skewnorm"), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(methods, str):
            methods = (methods,)
        methods = tuple(methods)
        unknown = [m for m in methods if m not in _METHODS]
        if not methods or unknown or len(set(methods)) != len(methods):
            raise ValueError(
                f"methods must be a non-empty subset of {_METHODS} without repeats, got "
                f"{methods!r}"
            )
        self.methods = methods
        self.add_state("canary_scores", default=[], dist_reduce_fx="cat")
        self.add_state("reference_scores", default=[], dist_reduce_fx="cat")

    def update(
        self,
        canary_scores: Tensor | Sequence[float] | None = None,
        reference_scores: Tensor | Sequence[float] | None = None,
    ) -> None:
        """Add canary scores, reference scores, or both.

        Args:
            canary_scores: ``[C]`` finite scores of inserted canaries.
            reference_scores: ``[R]`` finite scores of never-inserted candidates.

        Raises:
            ValueError: if both are None, an input is not 1-D or holds a non-finite value.
        """
        if canary_scores is None and reference_scores is None:
            raise ValueError(
                "update() needs canary_scores, reference_scores or both; got neither"
            )
        if canary_scores is not None:
            x = _as_scores("canary_scores", canary_scores, 0)
            self.canary_scores.append(x.detach().to(device=self.device, dtype=self.dtype))
        if reference_scores is not None:
            x = _as_scores("reference_scores", reference_scores, 0)
            self.reference_scores.append(x.detach().to(device=self.device, dtype=self.dtype))

    def compute(self) -> dict[str, Tensor]:
        """Return the exposures (float32, in bits) of all canaries seen so far.

        Raises:
            ValueError: if no canary or fewer than 2 references were added (on all ranks
                together), or, for ``"skewnorm"``, all references are equal.
        """
        canary = _cat_state(self.canary_scores)
        reference = _cat_state(self.reference_scores)
        if canary is None or canary.numel() == 0:
            raise ValueError(
                "CanaryExposure.compute() needs canary scores; call update(canary_scores=...)"
            )
        if reference is None or reference.numel() < 2:
            got = 0 if reference is None else reference.numel()
            raise ValueError(
                f"CanaryExposure.compute() needs at least 2 reference scores, got {got}; call "
                f"update(reference_scores=...) with the scores of never-inserted candidates"
            )
        out: dict[str, Tensor] = {}
        if "rank" in self.methods:
            per = exposure_rank(canary, reference)
            out["exposure_rank"] = per.mean()
            out["exposure_rank_per_canary"] = per
        if "skewnorm" in self.methods:
            per = exposure_skewnorm(canary, reference)
            out["exposure_skewnorm"] = per.mean()
            out["exposure_skewnorm_per_canary"] = per
        out["max_exposure"] = torch.tensor(
            math.log2(reference.numel()), dtype=torch.float32, device=canary.device
        )
        return out
