"""Diversity of a set of generations: Vendi score and mean pairwise distance.

Both take embeddings ``[N, D]`` (e.g. :func:`antimemo.functional.replica.embed` of the images).
A model that copies a few training images produces sets with low diversity.

- Vendi score (Friedman and Dieng, 2023) with the cosine kernel: ``K = X X^T / N`` for unit rows
  ``X``; with ``lambda`` its eigenvalues, ``VS = exp(-sum_i lambda_i log lambda_i)``, the
  "effective number of distinct items", in ``[1, N]`` (1: all identical; ``N``: orthogonal).
- Mean pairwise distance: ``mean_{i < j} d(x_i, x_j)`` with ``d = 1 - cos`` (``"cosine"``) or
  the Euclidean distance (``"l2"``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["mean_pairwise_distance", "vendi_score"]


def _check(embeddings: Tensor, name: str = "embeddings") -> Tensor:
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ValueError(
            f"{name} must be a float tensor [N, D], got "
            f"{tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__}"
        )
    return embeddings


def vendi_score(embeddings: Tensor) -> Tensor:
    """Vendi score (order 1) of rows under the cosine kernel.

    Args:
        embeddings: ``[N, D]`` float rows (normalised here; zero rows count as distinct from
            everything, with a self-similarity of 1).

    Returns:
        A scalar tensor in ``[1, N]`` (``nan`` for ``N = 0``).

    Example:
        >>> round(float(vendi_score(torch.eye(4))), 4)
        4.0
        >>> round(float(vendi_score(torch.ones(5, 3))), 4)
        1.0
    """
    x = _check(embeddings).double()
    n = x.shape[0]
    if n == 0:
        return torch.tensor(float("nan"))
    x = nn.functional.normalize(x, dim=1)
    k = x @ x.T
    k.fill_diagonal_(1.0)
    lam = torch.linalg.eigvalsh(k / n).clamp_min(0)
    lam = lam[lam > 1e-12]
    return torch.exp(-(lam * lam.log()).sum()).float()


def mean_pairwise_distance(embeddings: Tensor, metric: str = "cosine") -> Tensor:
    """Mean distance over all pairs ``i < j``.

    Args:
        embeddings: ``[N, D]`` float rows.
        metric: ``"cosine"`` (``1 - cos``) or ``"l2"`` (Euclidean).

    Returns:
        A scalar tensor (``nan`` for fewer than two rows).

    Example:
        >>> float(mean_pairwise_distance(torch.tensor([[1.0, 0.0], [0.0, 1.0]])))
        1.0
    """
    x = _check(embeddings).double()
    n = x.shape[0]
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    if n < 2:
        return torch.tensor(float("nan"))
    if metric == "cosine":
        u = nn.functional.normalize(x, dim=1)
        d = 1.0 - u @ u.T
    else:
        d = torch.cdist(x, x)
    iu = torch.triu_indices(n, n, offset=1)
    return d[iu[0], iu[1]].mean().float()
