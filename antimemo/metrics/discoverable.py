"""Greedy and probabilistic discoverable extraction as a DDP-synced ``torchmetrics.Metric``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from antimemo._checks import is_int, is_number
from antimemo.functional.discoverable import (
    check_sampling_scheme,
    discoverable_probability,
    suffix_sampling_log_probability,
    teacher_forced_greedy_match,
)

__all__ = ["DiscoverableExtraction"]


def _p_name(p: float) -> str:
    return f"{p:g}"


class DiscoverableExtraction(Metric):
    """Extraction risk of probes from their teacher-forced logits (one forward pass, no decoding).

    :meth:`update` takes the logits at the suffix positions and the true suffixes (aligned as in
    :mod:`antimemo.functional.discoverable`: ``logits[i, j]`` is the distribution of
    ``target[i, j]``). :meth:`compute` returns:

    - ``exact_match``: fraction of probes that greedy decoding reproduces exactly (argmax equals
      the true token at every suffix position: :func:`~antimemo.functional.teacher_forced_greedy_match`).
      It equals :class:`ExtractableMemorization`'s ``exact_match`` on greedy generations, up to
      float near-ties between the top two logits.
    - ``reproduced_length``: mean number of leading suffix tokens greedy decoding reproduces.
    - ``discoverable/n{n}_p{p}`` for every ``n`` in ``ns`` and ``p`` in ``ps`` (e.g.
      ``discoverable/n100_p0.9``): fraction of probes that are ``(n, p)``-discoverable (Hayes et
      al. 2024), i.e. ``1 - (1 - p_z)^n >= p`` where ``p_z`` is the probability that the sampling
      scheme emits exactly the true suffix: ``n`` attacker samples contain it with probability
      at least ``p``. ``p`` is written with ``format(p, "g")``.
    - ``discoverable/median_log10_pz``: median over probes of ``log10 p_z`` (the mean of the two
      middle values for an even count); ``-inf`` when at least half of the probes have a true
      token removed by top-k / top-p (``p_z = 0``).

    With ``probabilistic=False`` only ``exact_match`` and ``reproduced_length`` are computed (no
    ``p_z``: the cheap greedy verdict).

    States: integer ``sum`` states (probes, exact matches, reproduced tokens, ``(n, p)`` counts
    decided in float64 at :meth:`update`) and one ``cat`` state of ``log10 p_z`` for the median,
    in the metric's float dtype (float32: an empty state on a rank is gathered in that dtype),
    so ``compute()`` under DDP equals the single-process result on the union of the shards.

    Args:
        ns: numbers of samples ``n >= 1`` (default ``(1, 10, 100, 1000)``).
        ps: probability thresholds ``0 < p < 1`` (default ``(0.5, 0.9)``).
        temperature, top_k, top_p: the sampling scheme, applied in that order as in
            ``transformers``; ``None`` switches a truncation off.
        probabilistic: compute ``p_z`` and the ``discoverable/*`` keys (default ``True``).
        **kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = DiscoverableExtraction(ns=(1, 10), ps=(0.5,))
        >>> logits = torch.log(torch.tensor([[[0.6, 0.4], [0.6, 0.4]],     # target [0, 0]: p_z 0.36
        ...                                  [[0.6, 0.4], [0.4, 0.6]]]))   # target [1, 0]: p_z 0.16
        >>> metric.update(logits, torch.tensor([[0, 0], [1, 0]]))
        >>> {k: round(float(v), 3) for k, v in metric.compute().items()}  # doctest: +NORMALIZE_WHITESPACE
        {'exact_match': 0.5, 'reproduced_length': 1.0, 'discoverable/n1_p0.5': 0.0,
         'discoverable/n10_p0.5': 1.0, 'discoverable/median_log10_pz': -0.62}
    """

    is_differentiable = False
    higher_is_better = False  # less extractable is better
    full_state_update = False

    n_probes: Tensor
    n_exact: Tensor
    n_reproduced_tokens: Tensor
    n_discoverable: Tensor
    log10_pz: list[Tensor]

    def __init__(
        self,
        ns: Sequence[int] = (1, 10, 100, 1000),
        ps: Sequence[float] = (0.5, 0.9),
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        probabilistic: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(ns, (str, bytes)) or not isinstance(ns, Sequence) or not ns or not all(is_int(n) and n >= 1 for n in ns):
            raise ValueError(
                f"ns must be a non-empty sequence of integers >= 1 (numbers of attacker samples), got {ns!r}; "
                "e.g. ns=(1, 10, 100, 1000)"
            )
        if isinstance(ps, (str, bytes)) or not isinstance(ps, Sequence) or not ps or not all(
            is_number(p) and 0.0 < float(p) < 1.0 for p in ps
        ):
            raise ValueError(
                f"ps must be a non-empty sequence of probabilities 0 < p < 1, got {ps!r}; e.g. ps=(0.5, 0.9)"
            )
        self.ns = tuple(int(n) for n in ns)
        self.ps = tuple(float(p) for p in ps)
        if len(set(self.ns)) != len(self.ns) or len({_p_name(p) for p in self.ps}) != len(self.ps):
            raise ValueError(f"ns and ps must hold distinct values (they name the result keys), got ns={ns!r}, ps={ps!r}")
        self.temperature, self.top_k, self.top_p = check_sampling_scheme(temperature, top_k, top_p)
        if not isinstance(probabilistic, bool):
            raise TypeError(f"probabilistic must be a bool, got {probabilistic!r}")
        self.probabilistic = probabilistic
        for name in ("n_probes", "n_exact", "n_reproduced_tokens"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state(
            "n_discoverable", default=torch.zeros(len(self.ns), len(self.ps), dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state("log10_pz", default=[], dist_reduce_fx="cat")

    @property
    def keys(self) -> list[str]:
        """The keys :meth:`compute` returns, in order."""
        keys = ["exact_match", "reproduced_length"]
        if self.probabilistic:
            keys += [f"discoverable/n{n}_p{_p_name(p)}" for n in self.ns for p in self.ps]
            keys.append("discoverable/median_log10_pz")
        return keys

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch of probes.

        Args:
            logits: ``[N, S, V]`` teacher-forced logits at the suffix positions
                (``model(input_ids=probes).logits[:, P - 1 : P + S - 1]``).
            target: ``[N, S]`` true suffix token ids (``probes[:, P:]``).
        """
        exact, reproduced = teacher_forced_greedy_match(logits, target)
        device = self.n_probes.device
        self.n_probes += target.shape[0]
        self.n_exact += exact.sum().to(device)
        self.n_reproduced_tokens += reproduced.sum().to(device)
        if not self.probabilistic:
            return
        log_pz = suffix_sampling_log_probability(logits, target, self.temperature, self.top_k, self.top_p)
        counts = torch.stack(
            [
                torch.stack([(discoverable_probability(log_pz, n) >= p).sum() for p in self.ps])
                for n in self.ns
            ]
        )
        self.n_discoverable += counts.to(device=device, dtype=torch.long)
        self.log10_pz.append((log_pz / math.log(10.0)).to(device=device, dtype=self.dtype))

    def compute(self) -> dict[str, Tensor]:
        """The keys listed in the class docstring, as float32 scalars.

        Raises:
            RuntimeError: if no probe was added (on any rank).
        """
        n = int(self.n_probes)
        if n == 0:
            raise RuntimeError(
                "DiscoverableExtraction.compute() called before any probe was added; call update(logits, target) first"
            )
        out = {
            "exact_match": self.n_exact.to(torch.float32) / n,
            "reproduced_length": self.n_reproduced_tokens.to(torch.float32) / n,
        }
        if not self.probabilistic:
            return out
        fractions = self.n_discoverable.to(torch.float32) / n
        for i, samples in enumerate(self.ns):
            for j, p in enumerate(self.ps):
                out[f"discoverable/n{samples}_p{_p_name(p)}"] = fractions[i, j]
        values = self.log10_pz
        values = torch.cat(values) if isinstance(values, list) else values
        ordered = torch.sort(values.to(torch.float64).flatten()).values
        m = ordered.numel()
        median = ordered[m // 2] if m % 2 else (ordered[m // 2 - 1] + ordered[m // 2]) / 2
        out["discoverable/median_log10_pz"] = median.to(torch.float32)
        return out
