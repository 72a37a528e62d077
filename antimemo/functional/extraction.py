"""Extraction (verbatim-regurgitation) scores for generated token suffixes.

Given ``N`` probes, each a training sequence split into a prefix and a true suffix, a model is
prompted with the prefix and decoded greedily; these functions compare the generated suffix with
the true one, one score per probe:

- :func:`exact_match`: 1.0 when all positions agree (Carlini et al., "Quantifying Memorization
  Across Neural Language Models", ICLR 2023, arXiv 2202.07646), else 0.0.
- :func:`token_match`: fraction of positions that agree (the Pythia memorization score,
  EleutherAI ``pythia/predictable-memorization/eval_memorization.py``).
- :func:`edit_similarity`: ``1 - Levenshtein(generated, target) / max(len)`` over token ids, a
  near-verbatim score that survives a single inserted or dropped token, which ``token_match``
  does not (a shift by one position makes every later position disagree).

All functions take integer token-id tensors of shape ``[N, S]`` on any device and are
vectorized over the batch; none of them imports Lightning.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["edit_similarity", "exact_match", "levenshtein_distance", "token_match"]


def _check_token_tensor(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of token ids with shape [N, S], got "
            f"{type(x).__name__}; wrap it with torch.as_tensor(...)"
        )
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(
            f"{name} must hold integer token ids, got dtype {x.dtype}; "
            f"pass token ids (e.g. a torch.long tensor), not logits or probabilities"
        )
    if x.ndim != 2:
        raise ValueError(
            f"{name} must have shape [N, S] (N probes, S suffix tokens), got shape "
            f"{tuple(x.shape)}; use x.unsqueeze(0) for a single probe"
        )


def _check_pair(generated: Tensor, target: Tensor, same_length: bool = True) -> None:
    _check_token_tensor("generated", generated)
    _check_token_tensor("target", target)
    if same_length and generated.shape != target.shape:
        raise ValueError(
            f"generated and target must have the same shape [N, S], got {tuple(generated.shape)} "
            f"and {tuple(target.shape)}; generate exactly as many tokens as the true suffix holds"
        )
    if generated.shape[0] != target.shape[0]:
        raise ValueError(
            f"generated and target must hold the same number of probes N, got {generated.shape[0]} "
            f"and {target.shape[0]}"
        )
    if generated.device != target.device:
        raise ValueError(
            f"generated and target must be on the same device, got {generated.device} and "
            f"{target.device}; move one with .to(other.device)"
        )


def exact_match(generated: Tensor, target: Tensor) -> Tensor:
    """Whether each generated suffix equals its true suffix token for token.

    This is the extractable-memorization criterion of Carlini et al. (ICLR 2023): a probe counts
    as memorized when greedy decoding from its prefix reproduces the whole suffix.

    Args:
        generated: integer token ids ``[N, S]`` produced by the model.
        target: integer token ids ``[N, S]`` of the true suffixes.

    Returns:
        A float32 tensor ``[N]`` with 1.0 where all ``S`` positions agree and 0.0 elsewhere.

    Raises:
        TypeError: if an input is not an integer tensor.
        ValueError: if the shapes differ or are not 2-D.

    Example:
        >>> exact_match(torch.tensor([[1, 2, 3], [1, 2, 4]]), torch.tensor([[1, 2, 3], [1, 2, 3]]))
        tensor([1., 0.])
    """
    _check_pair(generated, target)
    return (generated == target).all(dim=1).to(torch.float32)


def token_match(generated: Tensor, target: Tensor) -> Tensor:
    """Fraction of positions at which each generated suffix equals the true one.

    This is the Pythia memorization score (32-token context, 32 greedy tokens; score 1.0 means
    memorized).

    Args:
        generated: integer token ids ``[N, S]`` produced by the model.
        target: integer token ids ``[N, S]`` of the true suffixes.

    Returns:
        A float32 tensor ``[N]`` with ``#{j : generated[n, j] == target[n, j]} / S``.

    Raises:
        TypeError: if an input is not an integer tensor.
        ValueError: if the shapes differ, are not 2-D, or ``S == 0``.

    Example:
        >>> token_match(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 9, 3, 9]]))
        tensor([0.5000])
    """
    _check_pair(generated, target)
    if target.shape[1] == 0:
        raise ValueError("token_match needs at least one suffix token, got S = 0")
    return (generated == target).to(torch.float32).mean(dim=1)


def levenshtein_distance(generated: Tensor, target: Tensor) -> Tensor:
    """Levenshtein (edit) distance between token-id sequences, one per row.

    The distance is the least number of single-token insertions, deletions and substitutions
    that turn ``generated[n]`` into ``target[n]`` (each costs 1). The two inputs may have
    different lengths ``S1`` and ``S2``.

    The dynamic programme runs row by row over ``generated`` (``S1`` steps) and is vectorized over
    the batch and over ``target``. It tracks ``E[i, j] = D[i, j] - j``, for which the insertion
    chain ``D[i, j] = min(D[i, j - 1] + 1, ...)`` becomes a running minimum along the row
    (``np.minimum.accumulate``), so each row costs five array operations on ``[N, S2 + 1]``.
    It runs in NumPy on the CPU (inputs on another device are copied there, and the result is
    returned on the input device): these are tiny integer arrays, and NumPy's single-threaded
    kernels avoid the thread-pool overhead that dominates small tensor operations. About 0.05 s
    for ``N = 1000, S = 50``.

    Args:
        generated: integer token ids ``[N, S1]``.
        target: integer token ids ``[N, S2]``.

    Returns:
        A long tensor ``[N]`` of distances.

    Raises:
        TypeError: if an input is not an integer tensor.
        ValueError: if an input is not 2-D or the batch sizes differ.

    Example:
        >>> levenshtein_distance(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[2, 3, 4, 5]]))
        tensor([2])
    """
    _check_pair(generated, target, same_length=False)
    gen = generated.detach().cpu().numpy()
    tgt = target.detach().cpu().numpy()
    n, s1 = gen.shape
    s2 = tgt.shape[1]
    # E[i, j] = D[i, j] - j. Row 0: D[0, j] = j (j insertions), so E = 0.
    e = np.zeros((n, s2 + 1), dtype=np.int64)
    cand = np.empty((n, s2 + 1), dtype=np.int64)
    for i in range(1, s1 + 1):
        # substitution/match from the diagonal: D[i-1, j-1] + cost - j = E[i-1, j-1] + cost - 1
        diag = (gen[:, i - 1 : i] != tgt).astype(np.int64)
        diag += e[:, :-1]
        diag -= 1
        cand[:, 0] = i  # D[i, 0] = i deletions
        # deletion from the row above: D[i-1, j] + 1 - j = E[i-1, j] + 1
        np.minimum(e[:, 1:] + 1, diag, out=cand[:, 1:])
        # insertion along the row: D[i, j-1] + 1 - j = E[i, j-1], a running minimum
        e = np.minimum.accumulate(cand, axis=1)
    dist = e[:, s2] + s2
    return torch.from_numpy(dist).to(device=generated.device, dtype=torch.long)


def edit_similarity(generated: Tensor, target: Tensor) -> Tensor:
    """Normalized edit similarity ``1 - Levenshtein(generated, target) / max(len)`` per row.

    1.0 means identical, 0.0 means nothing in common beyond the length. A suffix with one token
    inserted near its start keeps a high similarity, while its :func:`token_match` collapses.

    Args:
        generated: integer token ids ``[N, S1]``.
        target: integer token ids ``[N, S2]`` (``S2`` may differ from ``S1``; the metric class
            requires them equal).

    Returns:
        A float32 tensor ``[N]`` in ``[0, 1]``.

    Raises:
        TypeError: if an input is not an integer tensor.
        ValueError: if an input is not 2-D, the batch sizes differ, or both lengths are 0.

    Example:
        >>> edit_similarity(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 9, 4]]))
        tensor([0.7500])
    """
    _check_pair(generated, target, same_length=False)
    longest = max(generated.shape[1], target.shape[1])
    if longest == 0:
        raise ValueError("edit_similarity needs at least one token, got S = 0 for both inputs")
    dist = levenshtein_distance(generated, target)
    return 1.0 - dist.to(torch.float32) / float(longest)
