"""Extractable memorization as a DDP-synced ``torchmetrics.Metric``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from antimemo._checks import check_positive_int
from antimemo.functional.extraction import exact_match, levenshtein_distance

__all__ = ["ExtractableMemorization"]


class ExtractableMemorization(Metric):
    """How much of a probe set the model reproduces from its prefixes.

    Each probe is a training sequence cut into a prefix of ``prefix_length`` tokens and a true
    suffix of ``suffix_length`` tokens; the caller prompts the model with the prefix, decodes
    ``suffix_length`` tokens greedily (e.g. with ``antimemo.functional.generation.greedy_generate``)
    and passes the generated and true suffixes to :meth:`update`. :meth:`compute` returns:

    - ``exact_match``: fraction of probes whose generated suffix equals the true one (extractable
      memorization, Carlini et al., ICLR 2023).
    - ``token_match``: mean fraction of matching positions (Pythia memorization score).
    - ``near_verbatim``: fraction of probes with ``edit_similarity >= near_verbatim_threshold``,
      where ``edit_similarity = 1 - Levenshtein(generated, target) / S`` over token ids
      (exact matches count too, so ``near_verbatim >= exact_match``).

    States are integer sums (matching probes, matching positions, near-verbatim probes, probes)
    with ``sum`` reduction, so the result under DDP is exactly the single-process result on the
    union of the shards.

    Args:
        prefix_length: number of prompt tokens per probe. Not used in the arithmetic; kept so
            that the metric documents the protocol it measures (and for callers that build
            probes from it).
        suffix_length: number of suffix tokens ``S``; :meth:`update` checks it.
        near_verbatim_threshold: edit-similarity threshold in ``[0, 1]`` for ``near_verbatim``.
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``process_group``).

    Example:
        >>> metric = ExtractableMemorization(prefix_length=4, suffix_length=4)
        >>> metric.update(torch.tensor([[1, 2, 3, 4], [1, 2, 3, 9]]),
        ...               torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]]))
        >>> {k: round(float(v), 3) for k, v in metric.compute().items()}
        {'exact_match': 0.5, 'token_match': 0.875, 'near_verbatim': 0.5}
    """

    is_differentiable = False
    higher_is_better = False  # less memorization is better
    full_state_update = False

    n_exact: Tensor
    n_matching_tokens: Tensor
    n_near_verbatim: Tensor
    n_probes: Tensor

    def __init__(
        self,
        prefix_length: int = 32,
        suffix_length: int = 32,
        near_verbatim_threshold: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.prefix_length = check_positive_int(
            "prefix_length", prefix_length, "it is the number of prompt tokens per probe, e.g. 32"
        )
        self.suffix_length = check_positive_int(
            "suffix_length", suffix_length, "it is the number of generated tokens per probe (32)"
        )
        if (
            isinstance(near_verbatim_threshold, bool)
            or not isinstance(near_verbatim_threshold, (int, float))
            or not 0.0 <= near_verbatim_threshold <= 1.0
        ):
            raise ValueError(
                f"near_verbatim_threshold must be in [0, 1], got {near_verbatim_threshold!r}; "
                f"0.9 counts suffixes within 10% edits of the truth"
            )
        self.near_verbatim_threshold = float(near_verbatim_threshold)
        for name in ("n_exact", "n_matching_tokens", "n_near_verbatim", "n_probes"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, generated: Tensor, target: Tensor) -> None:
        """Add a batch of probes.

        Args:
            generated: integer token ids ``[N, suffix_length]`` decoded by the model.
            target: integer token ids ``[N, suffix_length]`` of the true suffixes.

        Raises:
            TypeError: if an input is not an integer tensor.
            ValueError: if the shapes differ, are not 2-D, or ``S != suffix_length``.
        """
        # the functional checks give the dtype/shape errors; add the suffix-length contract
        exact = exact_match(generated, target)
        if target.shape[1] != self.suffix_length:
            raise ValueError(
                f"generated and target must have suffix_length={self.suffix_length} columns, got "
                f"shape {tuple(target.shape)}; decode exactly suffix_length tokens or construct "
                f"the metric with suffix_length={target.shape[1]}"
            )
        # similarity = 1 - d / S >= threshold  <=>  d <= floor(S * (1 - threshold)); decided on
        # the integer distance so that e.g. 1 - 1/10 >= 0.9 is not lost to float rounding
        distance = levenshtein_distance(generated, target)
        max_edits = math.floor(self.suffix_length * (1.0 - self.near_verbatim_threshold) + 1e-9)
        device = self.n_probes.device
        self.n_exact += exact.sum().to(device=device, dtype=torch.long)
        self.n_matching_tokens += (generated == target).sum().to(device)
        self.n_near_verbatim += (distance <= max_edits).sum().to(device)
        self.n_probes += generated.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """Return ``{"exact_match", "token_match", "near_verbatim"}`` as float32 scalars.

        Raises:
            RuntimeError: if no probe was added (on any rank).
        """
        n = int(self.n_probes)
        if n == 0:
            raise RuntimeError(
                "ExtractableMemorization.compute() called before any probe was added; "
                "call update(generated, target) first"
            )
        return {
            "exact_match": self.n_exact.to(torch.float32) / n,
            "token_match": self.n_matching_tokens.to(torch.float32) / (n * self.suffix_length),
            "near_verbatim": self.n_near_verbatim.to(torch.float32) / n,
        }
