"""Choosing ``nprobe`` for an IVF replica index from measured replica recall.

An ``IndexIVFFlat`` (:func:`~antimemo.functional.replica.build_faiss_index` with
``kind="ivf"``) visits only ``nprobe`` of its ``nlist`` cells per query. How many it needs
before every replica is still found depends on the embeddings: on clustered image features a
few cells suffice (42x faster than brute force at 1M rows in docs/benchmarks.md), on random
vectors almost all are needed. :func:`calibrate_nprobe` measures it on your own data instead of
guessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from antimemo._checks import is_number

__all__ = ["NprobeCalibration", "calibrate_nprobe"]


@dataclass
class NprobeCalibration:
    """What :func:`calibrate_nprobe` measured.

    Attributes:
        nprobe: the smallest tried ``nprobe`` whose replica recall reached ``target_recall``
            (now set on the index).
        recall: ``{nprobe: replica recall}`` for every value tried, in the order tried.
        replica_queries: how many queries the exact search puts at or past the threshold (the
            denominator of the recall).
    """

    nprobe: int
    recall: dict[int, float] = field(default_factory=dict)
    replica_queries: int = 0


def _rows(x: Tensor | np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    a = np.ascontiguousarray(torch.as_tensor(x).detach().float().cpu().numpy(), dtype=np.float32)
    if a.ndim != 2 or (dim is not None and a.shape[1] != dim):
        want = f"[N, {dim}]" if dim is not None else "[N, D]"
        raise ValueError(f"{name} must be a 2-D float array {want}, got shape {a.shape}")
    return a


def calibrate_nprobe(
    index: Any,
    queries: Tensor | np.ndarray,
    reference: Tensor | np.ndarray,
    threshold: float,
    *,
    target_recall: float = 1.0,
    candidates: Sequence[int] | None = None,
) -> NprobeCalibration:
    """Set ``index.nprobe`` to the smallest value that finds the exact top-1 of every replica query.

    The exact top-1 of each query comes from a brute-force FAISS flat index over ``reference``
    (the rows the IVF index holds, in the same order). The *replica queries* are those whose
    exact top-1 passes ``threshold``: inner product ``>= threshold`` for an inner-product index
    (cosine on unit rows), squared L2 distance ``<= threshold`` for an L2 index. For each
    candidate ``nprobe`` in increasing order the IVF index is searched, and its *replica recall*
    is the fraction of replica queries whose IVF top-1 is the exact top-1 (the same row, or a
    row with the same score: ties). The first candidate reaching ``target_recall`` is kept.

    Use queries that contain replicas, e.g. light augmentations of training images, or
    generations of a model that copies; queries far from every reference row say nothing about
    recall. The recall holds for queries like these, so keep a margin (e.g. twice the value).

    Args:
        index: a FAISS ``IndexIVF*`` built over ``reference`` (``build_faiss_index(reference,
            exact=False, kind="ivf")``).
        queries: ``[Q, D]`` query embeddings.
        reference: ``[R, D]`` the rows in the index, in the order they were added.
        threshold: the replica threshold of the similarity (e.g. 0.5 for SSCD cosine): a finite
            number, in ``[-1, 1]`` when the reference rows are unit vectors of an inner-product
            index, ``>= 0`` (a squared distance) for an L2 index.
        target_recall: the replica recall to reach, in ``(0, 1]``.
        candidates: ``nprobe`` values to try, increasing (default ``1, 2, 4, ...`` up to
            ``nlist``, and ``nlist`` itself, which is exhaustive).

    Returns:
        :class:`NprobeCalibration`; ``index.nprobe`` is set to its ``nprobe``.

    Raises:
        ValueError: not an IVF index, shapes that do not match, ``target_recall`` outside
            ``(0, 1]``, bad candidates, no query passing ``threshold``, or no candidate reaching
            ``target_recall``.

    Example:
        >>> import torch
        >>> from antimemo.functional.replica import build_faiss_index
        >>> g = torch.Generator().manual_seed(0)
        >>> centres = torch.nn.functional.normalize(torch.randn(20, 16, generator=g), dim=1)
        >>> ref = torch.nn.functional.normalize(centres.repeat(100, 1) + 0.1 * torch.randn(2000, 16, generator=g), dim=1)
        >>> queries = torch.nn.functional.normalize(ref[:50] + 0.01 * torch.randn(50, 16, generator=g), dim=1)
        >>> index = build_faiss_index(ref, exact=False, kind="ivf", nlist=16, nprobe=1)
        >>> result = calibrate_nprobe(index, queries, ref, threshold=0.9)
        >>> result.recall[result.nprobe], index.nprobe == result.nprobe
        (1.0, True)
    """
    from antimemo._faiss import import_faiss

    faiss = import_faiss("calibrate_nprobe")
    if not hasattr(index, "nprobe") or not hasattr(index, "nlist"):
        raise ValueError(
            f"index must be a FAISS IVF index (with nlist and nprobe), got {type(index).__name__}; "
            "build one with build_faiss_index(reference, exact=False, kind='ivf')"
        )
    if isinstance(target_recall, bool) or not isinstance(target_recall, (int, float)) or not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be a number in (0, 1], got {target_recall!r}; 1.0 finds every replica")
    inner = index.metric_type == faiss.METRIC_INNER_PRODUCT
    if not is_number(threshold):
        raise ValueError(
            f"threshold must be a finite number (the replica threshold: an inner product for this "
            f"{'inner-product' if inner else 'L2'} index), got {threshold!r}; e.g. threshold=0.5 for SSCD cosine"
        )
    q = _rows(queries, "queries", index.d)
    ref = _rows(reference, "reference", index.d)
    if ref.shape[0] != index.ntotal:
        raise ValueError(
            f"reference has {ref.shape[0]} rows but the index holds {index.ntotal}; pass the rows the "
            "index was built from, in the same order"
        )
    if not inner and threshold < 0:
        raise ValueError(
            f"threshold={threshold!r} is negative, but an L2 index compares squared distances (>= 0): a replica "
            "has squared distance <= threshold; e.g. threshold=0.1 (2 - 2 cos for unit rows: cos >= 0.95)"
        )
    if inner and ref.shape[0] and np.abs(np.linalg.norm(ref, axis=1) - 1.0).max() < 1e-3 and not -1.0 <= threshold <= 1.0:
        raise ValueError(
            f"threshold={threshold!r} is outside [-1, 1], but the reference rows are unit vectors, so the inner "
            "product is a cosine similarity in [-1, 1]; e.g. threshold=0.5 for SSCD cosine, 0.9 for the pixel embedding"
        )
    nlist = int(index.nlist)
    if candidates is None:
        values, p = [], 1
        while p < nlist:
            values.append(p)
            p *= 2
        values.append(nlist)
    else:
        values = list(candidates)
        valid = all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 1 <= c <= nlist for c in values)
        if not values or not valid or values != sorted(set(values)):
            raise ValueError(
                f"candidates must be increasing distinct integers in [1, nlist={nlist}], got {list(candidates)!r}"
            )
        values = [int(c) for c in values]
    flat = faiss.IndexFlatIP(index.d) if inner else faiss.IndexFlatL2(index.d)
    flat.add(ref)
    exact_score, exact_id = flat.search(q, 1)
    replica = exact_score[:, 0] >= threshold if inner else exact_score[:, 0] <= threshold
    count = int(replica.sum())
    if count == 0:
        best = float(exact_score[:, 0].max() if inner else exact_score[:, 0].min())
        raise ValueError(
            f"no query passes threshold={threshold} (the best exact top-1 score is {best:.4f}), so replica "
            "recall is undefined; calibrate with queries that include replicas (e.g. light augmentations "
            "of reference images) or check the threshold"
        )
    previous = index.nprobe
    result = NprobeCalibration(nprobe=-1, replica_queries=count)
    for nprobe in values:
        index.nprobe = nprobe
        score, ids = index.search(q[replica], 1)
        same = (ids[:, 0] == exact_id[replica, 0]) | np.isclose(score[:, 0], exact_score[replica, 0], rtol=0, atol=1e-6)
        result.recall[nprobe] = float(same.mean())
        if result.recall[nprobe] >= target_recall:
            result.nprobe = nprobe
            return result
    index.nprobe = previous
    raise ValueError(
        f"no nprobe in {values} reaches replica recall {target_recall} (measured {result.recall}); "
        "try larger candidates, up to nlist, which is exhaustive"
    )
