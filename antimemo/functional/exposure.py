"""Canary exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A *canary* is a random secret (e.g. "my PIN is 381927") inserted into the training data; the
*reference* set ``R`` holds candidates drawn from the same random space but never inserted. Each
sequence is scored by the model with its perplexity or loss (lower = more likely). Exposure says
how many bits of the secret the model gives away: a canary that scores better than every
reference has exposure ``log2 |R|``; one that scores like a typical reference has exposure
about 1.

Both forms follow the reference implementation ``tensorflow/privacy``,
``tensorflow_privacy/privacy/privacy_tests/secret_sharer/exposures.py``
(``compute_exposure_interpolation`` and ``compute_exposure_extrapolation``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats
from torch import Tensor

__all__ = ["exposure_rank", "exposure_skewnorm"]


def _as_scores(name: str, x: Tensor | Sequence[float], min_len: int) -> Tensor:
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x, dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{name} must be a 1-D tensor or sequence of floats (perplexity or loss), "
                f"got {type(x).__name__}"
            ) from err
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must hold real scores (perplexity or loss), got dtype {x.dtype}")
    if x.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (one score per sequence), got shape {tuple(x.shape)}; "
            f"flatten it with .reshape(-1)"
        )
    if x.numel() < min_len:
        raise ValueError(
            f"{name} needs at least {min_len} score(s), got {x.numel()}"
            + (
                "; exposure compares canaries with never-inserted reference candidates, "
                "score more of them (thousands give a usable resolution)"
                if name == "reference_scores"
                else ""
            )
        )
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0])
        raise ValueError(
            f"{name} must be finite, got {float(x[idx])} at index {idx}; "
            f"drop or fix sequences whose loss overflowed"
        )
    return x


def exposure_rank(
    canary_scores: Tensor | Sequence[float], reference_scores: Tensor | Sequence[float]
) -> Tensor:
    """Rank ("interpolation") exposure of each canary against a reference set.

    ``exposure = log2 |R| - log2 rank`` with ``rank = 1 + #{r in R : score_r <= score_canary}``.

    Conventions, as in ``tensorflow/privacy`` ``exposures.py::compute_exposure_interpolation``
    (which sorts ``(score, -1)`` pairs for references before ``(score, i)`` pairs for secrets and
    takes ``1 + #references ahead``):

    - **Ties count against the canary**: a reference with exactly the canary's score is ranked
      ahead of it, so ties never inflate exposure.
    - **|R| is the number of references only** (the canary is not counted), and canaries are
      ranked only against references, never against each other.
    - Hence the maximum is ``log2 |R|`` (canary strictly better than every reference) and a
      canary worse than every reference gets ``log2 |R| - log2(|R| + 1)``, slightly negative.

    Args:
        canary_scores: ``[C]`` perplexity or loss of each inserted canary (lower = more likely).
        reference_scores: ``[R]`` scores of never-inserted candidates, ``R >= 2``.

    Returns:
        A float32 tensor ``[C]`` of exposures in bits, on ``canary_scores``' device.

    Raises:
        TypeError: if an input is not real-valued.
        ValueError: if an input is not 1-D, holds a non-finite value, there is no canary, or
            fewer than 2 references.

    Example:
        >>> # 2 of the 4 references score <= 2.5, so rank = 3 and exposure = log2(4) - log2(3)
        >>> exposure_rank(torch.tensor([2.5]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
        tensor([0.4150])
    """
    canary = _as_scores("canary_scores", canary_scores, 1)
    reference = _as_scores("reference_scores", reference_scores, 2)
    device = canary.device
    canary64 = canary.detach().to("cpu", torch.float64)
    reference64 = torch.sort(reference.detach().to("cpu", torch.float64)).values
    # #{r <= c} for sorted r: the insertion point to the right of equal values.
    ahead = torch.searchsorted(reference64, canary64, right=True)
    rank = (ahead + 1).to(torch.float64)
    exposure = math.log2(reference64.numel()) - torch.log2(rank)
    return exposure.to(device=device, dtype=torch.float32)


def exposure_skewnorm(
    canary_scores: Tensor | Sequence[float], reference_scores: Tensor | Sequence[float]
) -> Tensor:
    """Skew-normal ("extrapolation") exposure of each canary.

    Fits a skew-normal distribution to the reference scores with ``scipy.stats.skewnorm.fit`` and
    returns ``exposure = -log2 CDF_fit(score_canary)``, exactly the form of ``tensorflow/privacy``
    ``exposures.py::compute_exposure_extrapolation``. Unlike the rank form, it is not capped at
    ``log2 |R|``, so it can resolve canaries that beat every reference; it is
    ``+inf`` when the fitted CDF underflows to 0 in float64 (a canary far beyond the reference
    distribution's left tail).

    The references are sorted before the fit so the result does not depend on their order (e.g.
    the order in which DDP ranks gathered them). The fit runs on the CPU in float64.

    Args:
        canary_scores: ``[C]`` perplexity or loss of each inserted canary (lower = more likely).
        reference_scores: ``[R]`` scores of never-inserted candidates, ``R >= 2`` (the fit needs
            many more to be meaningful; the Secret Sharer paper uses thousands).

    Returns:
        A float32 tensor ``[C]`` of exposures in bits, on ``canary_scores``' device.

    Raises:
        TypeError: if an input is not real-valued.
        ValueError: if an input is not 1-D, holds a non-finite value, there is no canary,
            fewer than 2 references, or all references are equal.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> reference = 5.0 + torch.randn(1000, generator=gen)
        >>> # a canary at the reference median gives ~1 bit; one 4 sigma below gives ~16 bits
        >>> exposure_skewnorm(torch.tensor([5.0, 1.0]), reference).round(decimals=1)
        tensor([ 1.0000, 16.3000])
    """
    canary = _as_scores("canary_scores", canary_scores, 1)
    reference = _as_scores("reference_scores", reference_scores, 2)
    ref = np.sort(reference.detach().to("cpu", torch.float64).numpy())
    if ref[0] == ref[-1]:
        raise ValueError(
            f"reference_scores are all equal ({ref[0]}), so no skew-normal can be fitted; "
            f"score more, distinct reference candidates or use exposure_rank"
        )
    params = stats.skewnorm.fit(ref)
    values = canary.detach().to("cpu", torch.float64).numpy()
    with np.errstate(divide="ignore"):
        exposure = -np.log2(stats.skewnorm.cdf(values, *params))
    return torch.as_tensor(exposure, dtype=torch.float32, device=canary.device)
