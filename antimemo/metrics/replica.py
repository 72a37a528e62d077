"""Image replication, diversity and fidelity as DDP-synced ``torchmetrics.Metric`` classes.

- :class:`ReplicaRate`: top-1 similarity of each generated image to the training images
  (:func:`antimemo.functional.replica.replica_scores`), the fraction above a threshold, its
  percentiles and the matched indices.
- :class:`GenerationDiversity`: Vendi score and mean pairwise distance of the generations'
  embeddings (:mod:`antimemo.functional.diversity`).
- :class:`FeatureFrechetDistance`: torchmetrics' ``FrechetInceptionDistance`` with a
  user-chosen feature extractor (no Inception download): the Fréchet distance in that feature
  space. Only the extractor is supplied here; the statistics and the distance are torchmetrics'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from antimemo.functional.diversity import mean_pairwise_distance, vendi_score
from antimemo.functional.replica import (
    SIMILARITIES,
    build_faiss_index,
    carlini_scores,
    check_images,
    check_replica_threshold,
    embed,
    nearest_neighbors,
)

__all__ = ["DEFAULT_THRESHOLDS", "FeatureFrechetDistance", "GenerationDiversity", "ReplicaRate"]

def _cat(state: list[Tensor] | Tensor, empty: Tensor) -> Tensor:
    """A ``cat`` state as one tensor (a list before sync, a tensor after it)."""
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if state else empty


#: Threshold used when ``ReplicaRate(threshold=None)``: SSCD-style cosine 0.5 (Somepalli et al.),
#: Carlini et al.'s ``l2 <= 0.15`` (score ``-l2 >= -0.15``), and Carlini's ratio ``< 1``.
DEFAULT_THRESHOLDS = {"cosine": 0.5, "l2": -0.15, "carlini": 0.0}


class ReplicaRate(Metric):
    """How many generated images replicate a training image.

    For each generated image, the top-1 score against ``reference`` (higher = closer; see
    :mod:`antimemo.functional.replica` for the exact definitions):

    - ``similarity="cosine"``: cosine of ``embedder`` features (``None``: the weights-free
      centred-pixel embedding); the field's threshold is 0.5 with SSCD features. With the pixel
      embedding a much higher threshold (e.g. 0.9) is needed, because any two images of the
      same digit or object correlate.
    - ``"l2"``: ``-sqrt(mean((x - y)^2))``; default threshold ``-0.15``.
    - ``"carlini"``: ``1 - r`` with Carlini et al.'s adaptive ratio ``r`` (tiled ``l2`` over a
      4x4 grid, relative to ``alpha = 0.5`` times the mean over the ``k = 50`` nearest training
      images); default threshold 0 (``r < 1``).

    :meth:`compute` returns ``rate`` (fraction with score ``> threshold``), ``mean``, ``p50``,
    ``p95``, ``p99`` (linear-interpolated percentiles of the top-1 score; the p95 is the
    headline figure of Somepalli et al. 2023), ``scores`` ``[N]`` and ``indices`` ``[N]`` (the
    matched reference rows). The states are ``cat`` lists, so under DDP ``compute()`` sees the
    union of all ranks' generations (in rank order).

    Args:
        reference: training images ``[R, C, H, W]`` in ``[0, 1]`` (embedded / indexed once here).
        similarity: ``"cosine"``, ``"l2"`` or ``"carlini"``.
        threshold: replica threshold on the score; ``None``: :data:`DEFAULT_THRESHOLDS`. A
            finite number in the score range of ``similarity``: ``[-1, 1)`` for ``"cosine"``,
            ``[-1, 0)`` for ``"l2"`` (minus the distance: ``l2 <= 0.15`` is ``-0.15``),
            ``[1 - 1/alpha, 1)`` for ``"carlini"``
            (:func:`~antimemo.functional.replica.check_replica_threshold`).
        embedder: ``nn.Module`` ``[B, C, H, W] -> [B, D]`` for ``"cosine"`` (kept outside the
            metric's state; it runs in eval mode without gradients).
        k, alpha, grid: parameters of ``"carlini"``.
        exact: ``True``: exhaustive FAISS search; ``False``: an approximate index for large
            reference sets, ``index_kind``.
        index_kind: the approximate index: ``"hnsw"`` (``IndexHNSWFlat``) or ``"ivf"``
            (``IndexIVFFlat``, ``nlist = 4 sqrt(R)`` cells; choose ``nprobe`` with
            :func:`~antimemo.functional.replica.calibrate_nprobe` on :attr:`index`).
        nprobe: IVF cells visited per search (``index_kind="ivf"`` only).
        percentiles: the percentiles reported (as ``p{q}``).
        **kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> ref = torch.rand(50, 1, 16, 16)
        >>> metric = ReplicaRate(ref, similarity="cosine", threshold=0.9)
        >>> metric.update(torch.cat([ref[:3], torch.rand(1, 1, 16, 16)]))
        >>> out = metric.compute()
        >>> float(out["rate"]), out["indices"][:3].tolist()
        (0.75, [0, 1, 2])
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    scores: list[Tensor]
    indices: list[Tensor]

    def __init__(
        self,
        reference: Tensor,
        similarity: str = "cosine",
        threshold: float | None = None,
        embedder: nn.Module | None = None,
        *,
        k: int = 50,
        alpha: float = 0.5,
        grid: Sequence[int] = (4, 4),
        exact: bool = True,
        index_kind: str = "hnsw",
        nprobe: int = 16,
        percentiles: Sequence[float] = (50, 95, 99),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if index_kind not in ("hnsw", "ivf"):
            raise ValueError(f"index_kind must be 'hnsw' or 'ivf' (the approximate index of exact=False), got {index_kind!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        check_images(reference, "reference")
        if reference.shape[0] == 0:
            raise ValueError("reference is empty: pass the training images, [R, C, H, W] with R >= 1")
        if embedder is not None and not isinstance(embedder, nn.Module):
            raise TypeError(f"embedder must be a torch.nn.Module or None, got {type(embedder).__name__}")
        if embedder is not None and similarity != "cosine":
            raise ValueError(f"embedder is used only by similarity='cosine', got similarity={similarity!r}")
        if threshold is None:
            threshold = DEFAULT_THRESHOLDS[similarity]
        threshold = check_replica_threshold(threshold, similarity, alpha if similarity == "carlini" else 0.5)
        for q in percentiles:
            if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 100:
                raise ValueError(f"percentiles must be numbers in [0, 100], got {tuple(percentiles)!r}")
        self.similarity = similarity
        self.threshold = float(threshold)
        self.k, self.alpha, self.grid, self.exact = k, alpha, tuple(grid), bool(exact)
        self.percentiles = tuple(float(q) for q in percentiles)
        self._embedder = (embedder,)  # a tuple: not registered as a submodule, not in state_dict
        self._reference = reference.detach().to("cpu", torch.float32)
        self.reference_shape = tuple(reference.shape[1:])
        self.index_kind = index_kind
        approx = {"kind": index_kind, "nprobe": nprobe}
        if similarity == "cosine":
            self._reference_embeddings = embed(self._reference, embedder)
            self._index = build_faiss_index(self._reference_embeddings, "ip", exact=self.exact, **approx)
        else:
            self._index = build_faiss_index(self._reference.flatten(1), "l2", exact=self.exact, **approx)
        if similarity == "carlini":  # validate the knobs now rather than at the first update
            carlini_scores(self._reference[:1], self._reference, k, alpha, self.grid, index=self._index)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    @property
    def index(self) -> Any:
        """The FAISS index searched by :meth:`update` (over the reference embeddings for
        ``"cosine"``, over the flattened pixels otherwise)."""
        return self._index

    @property
    def reference_rows(self) -> Tensor:
        """The ``[R, D]`` rows :attr:`index` holds, in order (for
        :func:`~antimemo.functional.replica.calibrate_nprobe`)."""
        if self.similarity == "cosine":
            return self._reference_embeddings
        return self._reference.flatten(1)

    @property
    def embedder(self) -> nn.Module | None:
        """The embedder of ``"cosine"`` (``None``: pixel embedding)."""
        return self._embedder[0]

    @property
    def num_reference(self) -> int:
        """Number of reference images."""
        return int(self._reference.shape[0])

    def update(self, generated: Tensor) -> None:
        """Score a batch of generated images ``[N, C, H, W]`` in ``[0, 1]`` against the reference.

        Raises:
            TypeError / ValueError: not a float ``[N, C, H, W]`` tensor, ``[C, H, W]`` other than
                the reference's, or values outside ``[0, 1]``.
        """
        check_images(generated, "generated", like=self._reference)
        x = generated.detach().to("cpu", torch.float32)
        if self.similarity == "cosine":
            s, i = nearest_neighbors(embed(x, self.embedder), None, 1, "ip", index=self._index)
            s, i = s[:, 0], i[:, 0]
        elif self.similarity == "l2":
            d, i = nearest_neighbors(x.flatten(1), None, 1, "l2", index=self._index)
            s, i = -(d[:, 0].clamp_min(0) / x[0].numel()).sqrt(), i[:, 0]
        else:
            s, i, _ = carlini_scores(x, self._reference, self.k, self.alpha, self.grid, index=self._index)
        device = self.device
        self.scores.append(s.to(device))
        self.indices.append(i.to(device))

    def compute(self) -> dict[str, Tensor]:
        """``rate``, ``mean``, ``p50``/``p95``/``p99``, ``scores`` and ``indices`` of all generations so far."""
        scores = _cat(self.scores, torch.zeros(0))
        indices = _cat(self.indices, torch.zeros(0, dtype=torch.long))
        out: dict[str, Tensor] = {}
        if scores.numel() == 0:
            nan = torch.tensor(float("nan"))
            out.update(rate=nan, mean=nan, **{f"p{q:g}": nan for q in self.percentiles})
        else:
            s = scores.double()
            out["rate"] = (s > self.threshold).double().mean().float()
            out["mean"] = s.mean().float()
            qs = torch.quantile(s, torch.tensor([q / 100 for q in self.percentiles], dtype=torch.float64))
            out.update({f"p{q:g}": v.float() for q, v in zip(self.percentiles, qs)})
        out["scores"] = scores
        out["indices"] = indices.long()
        return out


class GenerationDiversity(Metric):
    """Diversity of generated images: Vendi score and mean pairwise cosine distance of embeddings.

    Args:
        embedder: ``nn.Module`` ``[B, C, H, W] -> [B, D]``; ``None``: the pixel embedding.
        **kwargs: passed to ``torchmetrics.Metric``.

    :meth:`compute` returns ``vendi`` (in ``[1, N]``) and ``pairwise_distance`` (mean
    ``1 - cos`` over pairs). The embeddings are a ``cat`` state, so both are exact under DDP.

    Example:
        >>> d = GenerationDiversity()
        >>> x = torch.rand(1, 1, 8, 8)
        >>> d.update(x.repeat(4, 1, 1, 1))
        >>> round(float(d.compute()["vendi"]), 3)
        1.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    embeddings: list[Tensor]

    def __init__(self, embedder: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if embedder is not None and not isinstance(embedder, nn.Module):
            raise TypeError(f"embedder must be a torch.nn.Module or None, got {type(embedder).__name__}")
        self._embedder = (embedder,)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")

    def update(self, generated: Tensor) -> None:
        """Embed and store a batch of generated images ``[N, C, H, W]`` in ``[0, 1]``."""
        check_images(generated, "generated")
        self.embeddings.append(embed(generated.detach().float().cpu(), self._embedder[0]).to(self.device))

    def compute(self) -> dict[str, Tensor]:
        """``vendi`` and ``pairwise_distance`` of all generations so far."""
        e = _cat(self.embeddings, torch.zeros(0, 1))
        return {"vendi": vendi_score(e), "pairwise_distance": mean_pairwise_distance(e)}


class _Features(nn.Module):
    """Feature extractor adapter for torchmetrics FID: eval mode, no grad, ``[B, D]`` float output."""

    def __init__(self, feature: nn.Module, num_features: int) -> None:
        super().__init__()
        self.feature = feature
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        was = self.feature.training
        self.feature.eval()
        try:
            with torch.no_grad():
                return self.feature(x).flatten(1).float()
        finally:
            self.feature.train(was)


class FeatureFrechetDistance(FrechetInceptionDistance):
    """torchmetrics' ``FrechetInceptionDistance`` in the feature space of your own extractor.

    Nothing is downloaded and ``torch-fidelity`` is not needed: torchmetrics uses a custom
    ``nn.Module`` as is. Update with ``update(images, real=True/False)`` (float images as your
    extractor expects them, e.g. ``[0, 1]``), then ``compute()`` is the Fréchet distance between
    the Gaussians fitted to the real and the generated features. Its value depends on the
    feature space: compare runs measured with the same extractor only. The sums behind the
    means and covariances are synced under DDP (torchmetrics' states).

    Args:
        feature: ``nn.Module`` ``[B, C, H, W] -> [B, D]``.
        num_features: ``D``; ``None``: read ``feature.num_features`` or probe with one input of
            shape ``(1, *input_shape)``.
        input_shape: ``[C, H, W]`` of the probe input when ``num_features`` is unknown.
        **kwargs: passed to ``FrechetInceptionDistance`` (e.g. ``reset_real_features=False``).

    Example:
        >>> feat = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
        >>> fid = FeatureFrechetDistance(feat, input_shape=(1, 8, 8))
        >>> x = torch.rand(32, 1, 8, 8)
        >>> fid.update(x, real=True); fid.update(x, real=False)
        >>> abs(float(fid.compute())) < 1e-3
        True
    """

    def __init__(
        self,
        feature: nn.Module,
        num_features: int | None = None,
        input_shape: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(feature, nn.Module):
            raise TypeError(f"feature must be a torch.nn.Module [B, C, H, W] -> [B, D], got {type(feature).__name__}")
        if num_features is None:
            num_features = getattr(feature, "num_features", None)
        if num_features is None:
            if input_shape is None:
                raise ValueError(
                    "FeatureFrechetDistance needs the feature dimension: pass num_features=D, give the module a "
                    "num_features attribute, or pass input_shape=(C, H, W) to probe it"
                )
            probe = _Features(feature, 0)(torch.rand(1, *input_shape))
            num_features = int(probe.shape[1])
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be an integer >= 1, got {num_features!r}")
        super().__init__(feature=_Features(feature, int(num_features)), **kwargs)
