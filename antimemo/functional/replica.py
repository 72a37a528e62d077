"""Image replication: similarity of generated images to training images, nearest neighbours.

Three similarities, each "higher = closer to a training image", so that one threshold rule
("a generation is a replica when its top-1 score is greater than ``threshold``") covers all:

- ``"cosine"``: cosine similarity of embeddings, ``<e(x), e(y)> / (|e(x)| |e(y)|)``, in
  ``[-1, 1]``. The embedder is any ``nn.Module`` (``[B, C, H, W] -> [B, D]``; the field uses SSCD
  features with threshold 0.5, Somepalli et al. 2023) or, by default, the weights-free
  :func:`pixel_embedding` (adaptive average pooling to ``16 x 16`` per channel, minus the image's
  mean, unit norm: a centred-pixel correlation that ignores brightness offsets).
- ``"l2"``: minus the normalised RMS pixel distance, ``-sqrt(mean((x - y)^2))`` on images in
  ``[0, 1]`` (Carlini et al. 2023's ``l2``; their verification threshold is ``l2 <= 0.15``, i.e.
  score ``>= -0.15``).
- ``"carlini"``: Carlini et al.'s adaptive ratio with the tiled distance. With
  ``d(x, y) = max over the tiles of a grid (4 x 4 by default) of the per-tile normalised RMS
  distance`` and ``S`` the ``k`` (default 50) training images nearest to the generation ``x``
  in plain normalised ``l2`` (the generation's own neighbours, as in the AMG scripts; the
  nearest one included), the ratio is
  ``r(x) = min_{y in S} d(x, y) / (alpha * mean_{y in S} d(x, y))`` with ``alpha = 0.5``, and
  the score is ``1 - r(x)``: 1 for an exact copy, ``> 0`` exactly when Carlini's rule
  ``r < 1`` flags a memorised image. The top-1 match is ``argmin_{y in S} d(x, y)``. With
  ``grid=(1, 1)`` this is Carlini's CIFAR-10 rule on plain ``l2``.

Nearest neighbours come from FAISS (``faiss-cpu``): ``IndexFlatIP`` / ``IndexFlatL2`` (exact,
the default) or ``IndexHNSWFlat`` (approximate, for large reference sets), through
:func:`nearest_neighbors`; ``backend="torch"`` is a chunked brute force with the same results
(used to check FAISS and by the benchmark).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from antimemo._checks import check_int, is_number
from antimemo._faiss import import_faiss
from antimemo._pixels import PixelEmbedder

__all__ = [
    "SIMILARITIES",
    "NprobeCalibration",
    "build_faiss_index",
    "calibrate_nprobe",
    "carlini_scores",
    "check_images",
    "check_replica_threshold",
    "cosine_similarity_matrix",
    "embed",
    "nearest_neighbors",
    "normalized_l2",
    "pixel_embedding",
    "replica_penalty",
    "replica_scores",
    "tiled_l2",
]

#: Similarities understood by :func:`replica_scores` and :class:`~antimemo.metrics.ReplicaRate`.
SIMILARITIES = ("cosine", "l2", "carlini")


def _threshold_range(similarity: str, alpha: float) -> tuple[float, float, str]:
    """``(low, high, typical)``: a replica threshold must be in ``[low, high)``."""
    if similarity == "cosine":
        return -1.0, 1.0, "typical: 0.5 with SSCD features (Somepalli et al.), about 0.9 with the pixel embedding"
    if similarity == "l2":
        return -1.0, 0.0, "typical: -0.15 (Carlini et al.'s l2 <= 0.15)"
    return 1.0 - 1.0 / alpha, 1.0, "typical: 0.0 (Carlini et al.'s ratio r < 1)"


def check_replica_threshold(threshold: Any, similarity: str, alpha: float = 0.5, name: str = "threshold") -> float:
    """Check a replica threshold for ``similarity`` and return it as a ``float``.

    A generation is a replica when its top-1 score is ``> threshold``, so a threshold at or
    above the largest possible score flags nothing and one below the smallest flags everything.
    The valid ranges are the score ranges of the similarities (images in ``[0, 1]``):

    - ``"cosine"``: ``[-1, 1)`` (typical 0.5 with SSCD features, about 0.9 with the pixel
      embedding);
    - ``"l2"``: ``[-1, 0)``: the score is *minus* the normalised RMS distance, so Carlini et
      al.'s ``l2 <= 0.15`` is ``threshold=-0.15``;
    - ``"carlini"``: ``[1 - 1 / alpha, 1)`` (``[-1, 1)`` for ``alpha = 0.5``; typical 0.0,
      Carlini's ``r < 1``).

    Args:
        threshold: the value to check: a finite real number (not a bool, NaN or inf).
        similarity: ``"cosine"``, ``"l2"`` or ``"carlini"``.
        alpha: Carlini's ratio scale (sets the lower end of ``"carlini"``).
        name: the argument's name in the message.

    Raises:
        ValueError: naming the argument, the value, the valid range and a typical value.

    Example:
        >>> check_replica_threshold(0.5, "cosine")
        0.5
        >>> check_replica_threshold(0.15, "l2")
        Traceback (most recent call last):
        ...
        ValueError: threshold=0.15 is outside [-1, 0) for similarity='l2' (the score is minus the normalised RMS distance, so l2 <= 0.15 is threshold=-0.15); typical: -0.15 (Carlini et al.'s l2 <= 0.15)
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if not is_number(alpha) or not alpha > 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}; Carlini et al. use alpha=0.5")
    low, high, typical = _threshold_range(similarity, float(alpha))
    if not is_number(threshold):
        raise ValueError(
            f"{name} must be a finite number for similarity={similarity!r} (in [{low:g}, {high:g})), got {threshold!r}; "
            f"{typical}"
        )
    t = float(threshold)
    if not low <= t < high:
        why = {
            "cosine": "cosine similarities lie in [-1, 1]; at 1 or above nothing is a replica",
            "l2": f"the score is minus the normalised RMS distance, so l2 <= {abs(t):g} is threshold={-abs(t):g}",
            "carlini": f"the score 1 - r lies in [{low:g}, 1] for alpha={float(alpha):g}; at 1 or above nothing is a replica",
        }[similarity]
        raise ValueError(f"{name}={threshold!r} is outside [{low:g}, {high:g}) for similarity={similarity!r} ({why}); {typical}")
    return t


def check_images(images: Any, name: str, like: Tensor | None = None, like_name: str = "reference") -> Tensor:
    """Check that ``images`` is a float ``[N, C, H, W]`` tensor in ``[0, 1]`` (optionally shaped like ``like``).

    Args:
        images: the tensor to check.
        name: its argument name, for the error message.
        like: a tensor whose ``[C, H, W]`` the images must share.
        like_name: the name of ``like`` in the message.

    Returns:
        ``images`` (unchanged).

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: wrong rank, other ``[C, H, W]`` than ``like``, or values outside ``[0, 1]``.

    Example:
        >>> check_images(torch.rand(2, 1, 8, 8), "generated").shape
        torch.Size([2, 1, 8, 8])
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, C, H, W], got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor with pixels in [0, 1], got dtype {images.dtype}; "
            "convert uint8 images with images.float() / 255"
        )
    if images.dim() != 4:
        raise ValueError(
            f"{name} must have shape [N, C, H, W], got {tuple(images.shape)}; add a batch dimension "
            "with images.unsqueeze(0) or a channel one with images.unsqueeze(1)"
        )
    if like is not None and tuple(images.shape[1:]) != tuple(like.shape[1:]):
        raise ValueError(
            f"{name} images have shape [C, H, W] = {list(images.shape[1:])} but the {like_name} images have "
            f"{list(like.shape[1:])}; resize one set (e.g. torch.nn.functional.interpolate) so both match"
        )
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"{name} must hold pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; map [-1, 1] model "
                "outputs with (x + 1) / 2 and clamp, or divide uint8 values by 255"
            )
    return images


def pixel_embedding(images: Tensor, size: int = 16) -> Tensor:
    """Weights-free embedding: pool to ``size x size`` per channel, subtract the mean, unit norm.

    The same function as the image dedup index's default
    (:class:`antimemo.dedup.images.PixelEmbedder`), so replicas and duplicates are judged alike.

    Args:
        images: float ``[B, C, H, W]``.
        size: pooled side.

    Returns:
        ``[B, C * size * size]`` unit rows (zero rows for constant images).

    Example:
        >>> x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> round(float(pixel_embedding(x)[0].norm()), 5), tuple(pixel_embedding(x).shape)
        (1.0, (2, 256))
    """
    return PixelEmbedder(size)(images)


def cosine_similarity_matrix(queries: Tensor, reference: Tensor) -> Tensor:
    """All cosine similarities ``[Q, R]`` between rows of ``queries`` ``[Q, D]`` and ``reference`` ``[R, D]``.

    Zero rows have similarity 0 with everything.

    Example:
        >>> cosine_similarity_matrix(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        tensor([[1., 0.]])
    """
    q = nn.functional.normalize(queries.float(), dim=1)
    r = nn.functional.normalize(reference.float(), dim=1)
    return q @ r.T


def _flat(images: Tensor) -> Tensor:
    return images.detach().float().flatten(1)


def normalized_l2(a: Tensor, b: Tensor, chunk: int = 256) -> Tensor:
    """Pairwise normalised RMS pixel distance ``sqrt(mean((a_i - b_j)^2))``, shape ``[A, B]``.

    Example:
        >>> normalized_l2(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5))
        tensor([[0.5000]])
    """
    chunk = check_int("chunk", chunk, 1, "e.g. chunk=256 rows per block")
    x, y = _flat(a), _flat(b)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"a and b must have the same number of pixels per image, got shapes {tuple(a.shape)} and {tuple(b.shape)}; "
            "resize one set so both match"
        )
    d = x.shape[1]
    out = []
    for s in range(0, x.shape[0], chunk):
        out.append((torch.cdist(x[s : s + chunk].double(), y.double()) ** 2 / d).sqrt().float())
    return torch.cat(out) if out else torch.zeros(0, y.shape[0])


def _tiles(images: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[N, T, C * th * tw]`` tiles of a ``gh x gw`` grid (images cropped to a multiple of the grid)."""
    gh, gw = grid
    n, c, h, w = images.shape
    th, tw = h // gh, w // gw
    if th == 0 or tw == 0:
        raise ValueError(f"grid={tuple(grid)} has more tiles than pixels for images of size {h}x{w}; use a coarser grid")
    x = images[:, :, : th * gh, : tw * gw].float().reshape(n, c, gh, th, gw, tw)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * th * tw)


def _check_grid(grid: Any) -> tuple[int, int]:
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
    ):
        raise ValueError(f"grid must be two integers >= 1 (rows, columns of tiles), got {grid!r}; Carlini et al. use (4, 4)")
    return int(grid[0]), int(grid[1])


def tiled_l2(a: Tensor, b: Tensor, grid: Sequence[int] = (4, 4)) -> Tensor:
    """Pairwise tiled distance: the max over tiles of the per-tile normalised RMS distance, ``[A, B]``.

    Images are split into a ``grid[0] x grid[1]`` grid of non-overlapping tiles (Carlini et al.
    2023 use 4 x 4; pixels beyond a multiple of the grid are ignored).

    Example:
        >>> a = torch.zeros(1, 1, 4, 4); b = a.clone(); b[0, 0, 0, 0] = 1.0
        >>> tiled_l2(a, b, grid=(2, 2))  # one tile of 4 pixels differs by 1 in one pixel
        tensor([[0.5000]])
    """
    g = _check_grid(grid)
    ta, tb = _tiles(a.detach(), g), _tiles(b.detach(), g)
    d = ta.shape[2]
    # [A, B, T]: per-tile squared distances through one cdist per tile
    per_tile = torch.stack(
        [torch.cdist(ta[:, t].double(), tb[:, t].double()) ** 2 / d for t in range(ta.shape[1])], dim=2
    )
    return per_tile.amax(dim=2).sqrt().float()


# ------------------------------------------------------------------------- nearest neighbours


def nearest_neighbors(
    queries: Tensor | np.ndarray,
    reference: Tensor | np.ndarray,
    k: int = 1,
    metric: str = "ip",
    *,
    exact: bool = True,
    backend: str = "faiss",
    hnsw_m: int = 32,
    ef_search: int = 128,
    chunk: int = 1024,
    index: Any = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest reference rows of each query row.

    Args:
        queries: ``[Q, D]`` float rows.
        reference: ``[R, D]`` float rows (ignored when ``index`` is given).
        k: neighbours per query (at most ``R``).
        metric: ``"ip"`` (inner product, largest first; cosine for unit rows) or ``"l2"``
            (squared Euclidean distance, smallest first).
        exact: ``True``: exhaustive search (``IndexFlatIP`` / ``IndexFlatL2``); ``False``:
            ``IndexHNSWFlat`` (approximate; ``hnsw_m`` links per node, ``ef_search`` candidates).
        backend: ``"faiss"`` or ``"torch"`` (chunked brute-force matrix product, always exact).
        hnsw_m: HNSW graph degree (approximate search only).
        ef_search: HNSW search breadth (approximate search only): higher is slower and closer
            to exact.
        chunk: queries per block for the torch backend.
        index: a prebuilt FAISS index over ``reference`` (see :func:`build_faiss_index`), reused
            across calls.

    Returns:
        ``(scores, indices)``: ``float32 [Q, k]`` inner products or squared L2 distances and
        ``int64 [Q, k]`` reference indices, best first.

    Example:
        >>> r = torch.eye(3)
        >>> s, i = nearest_neighbors(torch.tensor([[0.0, 0.9, 0.1]]), r, k=2)
        >>> i.tolist(), [round(v, 2) for v in s[0].tolist()]
        ([[1, 2]], [0.9, 0.1])
    """
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' (inner product) or 'l2' (squared distance), got {metric!r}")
    if backend not in ("faiss", "torch"):
        raise ValueError(f"backend must be 'faiss' or 'torch', got {backend!r}")
    k = check_int("k", k, 1, "e.g. k=1 for the top-1 match")
    chunk = check_int("chunk", chunk, 1, "e.g. chunk=1024 queries per block")
    ef_search = check_int("ef_search", ef_search, 1, "e.g. ef_search=128")
    q = torch.as_tensor(queries).detach().float().cpu()
    if q.dim() != 2:
        raise ValueError(f"queries must be [Q, D], got shape {tuple(q.shape)}")
    if backend == "torch":
        ref = torch.as_tensor(reference).detach().float().cpu()
        if ref.dim() != 2 or ref.shape[1] != q.shape[1]:
            raise ValueError(f"reference must be [R, {q.shape[1]}], got shape {tuple(ref.shape)}")
        if k > ref.shape[0]:
            raise ValueError(f"k={k} is larger than the {ref.shape[0]} reference rows; lower k")
        scores, ids = [], []
        ref_sq = (ref * ref).sum(1)
        for s in range(0, q.shape[0], chunk):
            block = q[s : s + chunk]
            prod = block @ ref.T
            if metric == "ip":
                v, i = prod.topk(k, dim=1, largest=True)
            else:
                dist = ((block * block).sum(1, keepdim=True) - 2 * prod + ref_sq).clamp_min_(0)
                v, i = dist.topk(k, dim=1, largest=False)
            scores.append(v)
            ids.append(i)
        if not scores:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
        return torch.cat(scores), torch.cat(ids)
    if index is None:
        index = build_faiss_index(reference, metric, exact=exact, hnsw_m=hnsw_m)
    if k > index.ntotal:
        raise ValueError(f"k={k} is larger than the {index.ntotal} reference rows; lower k")
    if index.d != q.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dims but the reference has {index.d}; embed both alike")
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(int(ef_search), k)
    if q.shape[0] == 0:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    d, i = index.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k)
    return torch.from_numpy(d.astype(np.float32)), torch.from_numpy(i.astype(np.int64))


def build_faiss_index(
    reference: Tensor | np.ndarray,
    metric: str = "ip",
    *,
    exact: bool = True,
    hnsw_m: int = 32,
    kind: str = "hnsw",
    nlist: int | None = None,
    nprobe: int = 16,
    seed: int = 0,
) -> Any:
    """A FAISS index over ``reference`` rows: ``IndexFlat{IP,L2}`` (exact), or an approximate
    ``IndexHNSWFlat`` (``kind="hnsw"``) or ``IndexIVFFlat`` (``kind="ivf"``).

    IVF: ``nlist`` k-means cells (default ``4 * sqrt(R)``, at most ``R // 39``), trained on a
    seeded random sample of ``min(R, 64 * nlist)`` rows; a search visits the ``nprobe`` nearest
    cells. It is the fast choice for replica search against large reference sets: a replica is
    much closer to its source than to anything else, so it falls in one of the few probed cells
    (see docs/benchmarks.md for its measured recall).

    Example:
        >>> build_faiss_index(torch.eye(4)).ntotal
        4
        >>> build_faiss_index(torch.randn(2000, 8), exact=False, kind="ivf", nlist=16, nprobe=4).nprobe
        4
    """
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' (inner product) or 'l2' (squared distance), got {metric!r}")
    faiss = import_faiss("build_faiss_index")
    ref = np.ascontiguousarray(torch.as_tensor(reference).detach().float().cpu().numpy(), dtype=np.float32)
    if ref.ndim != 2 or ref.shape[0] == 0:
        raise ValueError(f"reference must be a non-empty [R, D] array, got shape {ref.shape}")
    if kind not in ("hnsw", "ivf"):
        raise ValueError(f"kind must be 'hnsw' or 'ivf' (the approximate index), got {kind!r}")
    fmetric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    d = ref.shape[1]
    if exact:
        index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, check_int("hnsw_m", hnsw_m, 2, "e.g. 32"), fmetric)
    else:
        r = ref.shape[0]
        if nlist is None:
            nlist = max(1, min(int(4 * r**0.5), r // 39))
        nlist = check_int("nlist", nlist, 1, "e.g. nlist=4 * sqrt(R)")
        if nlist > r:
            raise ValueError(f"nlist={nlist} exceeds the {r} reference rows; use nlist <= R (e.g. 4 * sqrt(R))")
        quantizer = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, fmetric)
        rows = np.random.default_rng(seed).permutation(r)[: min(r, 64 * nlist)]
        index.train(ref[np.sort(rows)])
        index.nprobe = min(check_int("nprobe", nprobe, 1, "e.g. nprobe=16"), nlist)
    index.add(ref)
    return index


# ---------------------------------------------------------------------------------- scores


def carlini_scores(
    generated: Tensor,
    reference: Tensor,
    k: int = 50,
    alpha: float = 0.5,
    grid: Sequence[int] = (4, 4),
    *,
    exact: bool = True,
    backend: str = "faiss",
    index: Any = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Carlini et al.'s adaptive tiled-distance ratio of each generation (see the module docstring).

    Args:
        generated: ``[N, C, H, W]`` in ``[0, 1]``.
        reference: ``[R, C, H, W]`` training images in ``[0, 1]``.
        k: neighbourhood size ``|S|`` (capped at ``R``); Carlini et al. use 50.
        alpha: the ratio's scale; Carlini et al. use 0.5.
        grid: tile grid of the distance; ``(1, 1)`` is plain normalised ``l2``.
        exact: exact (default) or HNSW neighbour search in plain ``l2``.
        backend: ``"faiss"`` or ``"torch"``.
        index: a prebuilt ``l2`` FAISS index over the flattened reference pixels.

    Returns:
        ``(score, index, ratio)``: ``score = 1 - ratio`` ``[N]`` (1 for an exact copy), the
        top-1 reference index ``[N]`` and the ratio ``[N]`` (``< 1`` = memorised).

    Example:
        >>> ref = torch.rand(20, 1, 8, 8)
        >>> s, i, r = carlini_scores(ref[3:4].clone(), ref, k=5, grid=(2, 2))
        >>> float(s[0]), int(i[0])
        (1.0, 3)
    """
    if not is_number(alpha) or not alpha > 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}; Carlini et al. use alpha=0.5")
    g = _check_grid(grid)
    if index is None:  # with a prebuilt index (ReplicaRate) the caller has checked the images
        check_images(reference, "reference")
        check_images(generated, "generated", like=reference)
        if reference.shape[0] == 0:
            raise ValueError("reference is empty: need at least one training image to compare with")
    kk = min(check_int("k", k, 1, "Carlini et al. use k=50"), reference.shape[0])
    _, nbr = nearest_neighbors(_flat(generated), _flat(reference), kk, "l2", exact=exact, backend=backend, index=index)
    if generated.shape[0] == 0:
        empty = torch.zeros(0)
        return empty, torch.zeros(0, dtype=torch.long), empty
    gt = _tiles(generated.detach(), g).double()  # [N, T, d]
    rt = _tiles(reference.detach(), g).double()[nbr]  # [N, k, T, d]
    per_tile = ((rt - gt[:, None]) ** 2).mean(dim=3)  # [N, k, T]
    dist = per_tile.amax(dim=2).sqrt()  # [N, k]
    best, pos = dist.min(dim=1)
    denom = alpha * dist.mean(dim=1)
    ratio = torch.where(denom > 0, best / denom.clamp_min(1e-300), torch.zeros_like(best))
    return (1.0 - ratio).float(), nbr.gather(1, pos[:, None]).squeeze(1), ratio.float()


def replica_scores(
    generated: Tensor,
    reference: Tensor,
    similarity: str = "cosine",
    embedder: nn.Module | None = None,
    *,
    k: int = 50,
    alpha: float = 0.5,
    grid: Sequence[int] = (4, 4),
    exact: bool = True,
    backend: str = "faiss",
) -> tuple[Tensor, Tensor]:
    """Top-1 similarity of each generated image to the reference (training) images, and its index.

    Args:
        generated: ``[N, C, H, W]`` float images in ``[0, 1]``.
        reference: ``[R, C, H, W]`` float images in ``[0, 1]``, same ``[C, H, W]``.
        similarity: ``"cosine"`` (embeddings), ``"l2"`` (minus normalised RMS distance) or
            ``"carlini"`` (``1 - `` adaptive tiled ratio); see the module docstring.
        embedder: ``nn.Module`` for ``"cosine"`` (``None``: :func:`pixel_embedding`); run in
            eval mode without gradients, mode restored.
        k, alpha, grid: parameters of ``"carlini"``.
        exact: exact (default) or approximate (HNSW) FAISS search.
        backend: ``"faiss"`` or ``"torch"`` brute force.

    Returns:
        ``(scores [N], indices [N])``: higher score = closer.

    Example:
        >>> ref = torch.rand(10, 1, 16, 16)
        >>> s, i = replica_scores(ref[[4, 7]], ref)
        >>> [round(v, 4) for v in s.tolist()], i.tolist()
        ([1.0, 1.0], [4, 7])
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    check_images(reference, "reference")
    check_images(generated, "generated", like=reference)
    if reference.shape[0] == 0:
        raise ValueError("reference is empty: need at least one training image to compare with")
    if similarity == "carlini":
        s, i, _ = carlini_scores(generated, reference, k, alpha, grid, exact=exact, backend=backend)
        return s, i
    if similarity == "l2":
        d, i = nearest_neighbors(_flat(generated), _flat(reference), 1, "l2", exact=exact, backend=backend)
        return -(d[:, 0].clamp_min(0) / generated[0].numel()).sqrt(), i[:, 0]
    eg, er = embed(generated, embedder), embed(reference, embedder)
    s, i = nearest_neighbors(eg, er, 1, "ip", exact=exact, backend=backend)
    return s[:, 0], i[:, 0]


def embed(images: Tensor, embedder: nn.Module | None = None, batch_size: int = 256) -> Tensor:
    """Unit-norm embeddings ``[N, D]`` of images (``None``: :func:`pixel_embedding`), no grad, mode restored.

    Example:
        >>> embed(torch.rand(3, 1, 8, 8)).shape
        torch.Size([3, 256])
    """
    batch_size = check_int("batch_size", batch_size, 1, "e.g. batch_size=256")
    if embedder is None:
        return pixel_embedding(images.detach())
    if not isinstance(embedder, nn.Module):
        raise TypeError(f"embedder must be a torch.nn.Module or None, got {type(embedder).__name__}")
    was = embedder.training
    embedder.eval()
    try:
        device = next((p.device for p in embedder.parameters()), images.device)
        out = []
        with torch.no_grad():
            for s in range(0, images.shape[0], batch_size):
                e = embedder(images[s : s + batch_size].to(device))
                if not isinstance(e, Tensor) or e.shape[0] != min(batch_size, images.shape[0] - s):
                    raise ValueError(f"embedder must return a tensor [B, D] for a batch of images, got {type(e).__name__}")
                out.append(e.detach().float().flatten(1).cpu())
    finally:
        embedder.train(was)
    if not out:
        return torch.zeros(0, 1)
    return nn.functional.normalize(torch.cat(out), dim=1)


# --------------------------------------------------------------------------- training penalty


def replica_penalty(
    pred_x0: Tensor,
    target_x0: Tensor,
    sigma: Tensor,
    threshold: float = 0.5,
    min_noise: float = 0.8,
) -> Tensor:
    """Per-sample replica penalty of a diffusion training step (differentiable in ``pred_x0``).

    For sample ``i`` with noise level ``sigma_i = sqrt(1 - alphabar_{t_i})``:

    ``p_i = [sigma_i >= min_noise] * relu(cos_c(pred_x0_i, target_x0_i) - threshold)``

    where ``cos_c`` is the cosine similarity of the two images' pixels after subtracting each
    image's mean (the Pearson correlation of the pixels, as :func:`pixel_embedding` at full
    resolution). At such noise levels a generalising model predicts a blurred posterior mean,
    while a memorising one reconstructs its training target; the penalty pushes the
    correlation back under ``threshold``. A callback scales the batch mean ``mean_i p_i`` by its
    strength (:class:`~antimemo.callbacks.ReplicaPenalty`).

    Args:
        pred_x0: ``[B, C, H, W]`` predicted clean images (any scale; cosine is scale-free).
        target_x0: ``[B, C, H, W]`` training targets.
        sigma: ``[B]`` noise standard deviations in ``[0, 1]`` (one per sample; any shape with
            ``B`` elements, e.g. ``[B, 1, 1, 1]``, is flattened).
        threshold: correlation above which the penalty is active, in ``[-1, 1)``.
        min_noise: penalise only samples with ``sigma >= min_noise``, in ``[0, 1]``.

    Returns:
        ``[B]`` penalties (zero where inactive).

    Example:
        >>> x = torch.rand(2, 1, 4, 4)
        >>> [round(v, 4) for v in replica_penalty(x, x, torch.tensor([0.9, 0.1]), threshold=0.5).tolist()]
        [0.5, 0.0]
    """
    if not is_number(threshold) or not -1.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be a correlation in [-1, 1), got {threshold!r}; e.g. threshold=0.5")
    if not is_number(min_noise) or not 0.0 <= min_noise <= 1.0:
        raise ValueError(f"min_noise must be a noise level sigma in [0, 1], got {min_noise!r}; e.g. min_noise=0.8")
    if pred_x0.shape != target_x0.shape or pred_x0.dim() < 2:
        raise ValueError(f"pred_x0 and target_x0 must have the same shape [B, ...], got {tuple(pred_x0.shape)} and {tuple(target_x0.shape)}")
    if not isinstance(sigma, Tensor) or sigma.numel() != pred_x0.shape[0] or sigma.is_complex():
        got = f"shape {tuple(sigma.shape)}" if isinstance(sigma, Tensor) else type(sigma).__name__
        raise ValueError(
            f"sigma must be a tensor [B] with one noise level per sample (B = {pred_x0.shape[0]}), got {got}; "
            "pass sqrt(1 - alphas_cumprod[timesteps]) (DiffusionStep.sigma)"
        )
    sigma = sigma.reshape(-1)
    p = pred_x0.flatten(1)
    t = target_x0.detach().flatten(1).to(p.dtype)
    p = p - p.mean(dim=1, keepdim=True)
    t = t - t.mean(dim=1, keepdim=True)
    cos = (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1)).clamp_min(1e-12)
    active = (sigma.to(p.device) >= min_noise).to(p.dtype)
    return active * torch.relu(cos - threshold)


from antimemo.functional.replica_ivf import NprobeCalibration, calibrate_nprobe  # noqa: E402  (re-export)
