"""``WatermarkFilter``: keep watermarked (model-generated) items out of training, by adding one callback.

Recursive training on generated text collapses a model's distribution (Shumailov et al. 2024).
When the generated text carries the green-list watermark of :mod:`antimemo.watermark`, its items
can be found with the key alone and removed from the next model's training data.

Mechanism (Lightning 2.x). At ``setup("fit")`` the callback registers a transform at order 200 on
the trainer's train-loader chain (:class:`antimemo.callbacks._seams.LoaderSeam`): after
``DedupSampling`` (100), before ``DifferentialPrivacy`` (1000). Each time Lightning builds the
train loader the transform scores every item of the loader's dataset with
:func:`~antimemo.watermark.detect_watermark` (once per dataset object; the scores are cached) and
flags those with ``z > z_threshold`` (or ``p < p_threshold``). Then:

- ``policy="drop"``: the loader is rebuilt over ``torch.utils.data.Subset(dataset, kept)`` (the
  unflagged items, in dataset order) with the same batch size, collate function, workers and
  shuffling. ``DifferentialPrivacy`` Poisson-samples the loader's dataset, so under DP it samples
  exactly the kept items and accounts with ``N = len(kept)``.
- ``policy="downweight"``: the loader keeps every item but samples with a
  ``WeightedRandomSampler`` (weight 1 for unflagged items, ``flagged_weight`` for flagged ones,
  ``len(dataset)`` draws with replacement per epoch, seeded). Refused with
  ``DifferentialPrivacy``: the accountant assumes Poisson sampling of every item at one rate.

``teardown("fit")`` unregisters the transform. The callback logs ``watermark/filtered_fraction``
(flagged items / all items) at the end of every training epoch.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import (
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    WeightedRandomSampler,
)

from antimemo._checks import check_int, is_number
from antimemo._loaders import worker_kwargs
from antimemo.callbacks._interactions import CompositionError, check_composition, declare
from antimemo.callbacks._seams import loader_seam
from antimemo.watermark import _check_gamma, _check_key, _check_width, detect_watermark

__all__ = ["WatermarkFilter"]

POLICIES = ("drop", "downweight")


class WatermarkFilter(pl.Callback):
    """Drop or down-weight the training items that carry a green-list watermark.

    Args:
        gamma: green fraction used when the text was generated, in ``(0, 1)``.
        key: the watermark's secret integer key.
        context_width: previous tokens that seeded the green lists, ``>= 1``.
        policy: ``"drop"`` (train on the unflagged items only) or ``"downweight"`` (sample flagged
            items with weight ``flagged_weight``).
        z_threshold: flag an item when its z-score is above this (default 4.0 when neither
            threshold is given: about 3e-5 false positives per clean item).
        p_threshold: flag an item when its p-value is below this, in ``(0, 1)``; give at most
            one of ``z_threshold`` and ``p_threshold``.
        flagged_weight: sampling weight of a flagged item under ``"downweight"``, in ``[0, 1)``.
        ignore_repeated: score each (context, token) n-gram once per item
            (:func:`~antimemo.watermark.detect_watermark`).
        token_key: key of the token ids in dict items (an item may also be a 1-D tensor); an
            ``"attention_mask"`` entry of a dict item is used when present.
        seed: seed of the ``"downweight"`` sampler (the global RNG is never used).

    Attributes (after the train loader was built): ``z_scores``, ``p_values`` (float64 ``[N]``),
    ``flagged`` (bool ``[N]``), ``kept_indices`` (list of the unflagged item indices) and
    ``filtered_fraction``.

    Example:
        >>> cb = WatermarkFilter(gamma=0.25, key=42, policy="drop", p_threshold=1e-4)
        >>> cb.policy, cb.z_threshold is None, cb.p_threshold
        ('drop', True, 0.0001)
    """

    declaration = declare("sampler", domain="lm", note="train-loader chain, order 200")

    def __init__(
        self,
        gamma: float,
        key: int,
        context_width: int = 1,
        policy: str = "drop",
        *,
        z_threshold: float | None = None,
        p_threshold: float | None = None,
        flagged_weight: float = 0.1,
        ignore_repeated: bool = False,
        token_key: str = "input_ids",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.gamma = _check_gamma(gamma)
        self.key = _check_key(key)
        self.context_width = _check_width(context_width)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}; e.g. policy='drop'")
        if z_threshold is not None and p_threshold is not None:
            raise ValueError(
                f"give z_threshold or p_threshold, not both (got z_threshold={z_threshold!r}, "
                f"p_threshold={p_threshold!r}); e.g. z_threshold=4.0"
            )
        if z_threshold is not None and not is_number(z_threshold):
            raise ValueError(f"z_threshold must be a finite number, got {z_threshold!r}; e.g. z_threshold=4.0")
        if p_threshold is not None and (not is_number(p_threshold) or not 0.0 < float(p_threshold) < 1.0):
            raise ValueError(f"p_threshold must be a number in (0, 1), got {p_threshold!r}; e.g. p_threshold=1e-4")
        if z_threshold is None and p_threshold is None:
            z_threshold = 4.0
        if not is_number(flagged_weight) or not 0.0 <= float(flagged_weight) < 1.0:
            raise ValueError(
                f"flagged_weight must be a number in [0, 1) (the sampling weight of a flagged item), got "
                f"{flagged_weight!r}; e.g. flagged_weight=0.1, or policy='drop' to remove flagged items"
            )
        if flagged_weight != 0.1 and policy != "downweight":
            raise ValueError(f"flagged_weight applies only to policy='downweight', got policy={policy!r}")
        if not isinstance(ignore_repeated, bool):
            raise TypeError(f"ignore_repeated must be a bool, got {ignore_repeated!r}")
        if not isinstance(token_key, str):
            raise TypeError(f"token_key must be a str (the key of the token ids in dict items), got {token_key!r}")
        self.policy = policy
        self.z_threshold = None if z_threshold is None else float(z_threshold)
        self.p_threshold = None if p_threshold is None else float(p_threshold)
        self.flagged_weight = float(flagged_weight)
        self.ignore_repeated = ignore_repeated
        self.token_key = token_key
        self.seed = check_int("seed", seed, 0, "e.g. seed=0")
        self.z_scores: torch.Tensor | None = None
        self.p_values: torch.Tensor | None = None
        self.flagged: torch.Tensor | None = None
        self.kept_indices: list[int] | None = None
        self._scored_for: Any = None
        self._handle: Any = None

    # ------------------------------------------------------------------ installation
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Register the filter on the trainer's train-loader chain (stage ``"fit"`` only)."""
        if stage != "fit":
            return
        check_composition(trainer)  # DP + downweight and DedupSampling are refused there (antimemo/callbacks/_interactions.py)
        if self._handle is not None:
            self._handle.remove()
        self._handle = loader_seam(trainer).register(self, 200, self._transform)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Unregister from the train-loader chain."""
        if stage == "fit" and self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ------------------------------------------------------------------ scoring
    @property
    def filtered_fraction(self) -> float | None:
        """Flagged items / all items of the train dataset (``None`` before the loader was built)."""
        if self.flagged is None:
            return None
        return float(self.flagged.float().mean()) if self.flagged.numel() else 0.0

    def _tokens_of(self, item: Any, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = None
        if isinstance(item, dict):
            if self.token_key not in item:
                raise KeyError(
                    f"WatermarkFilter: train item {index} has no {self.token_key!r} (keys: {sorted(map(str, item))}); "
                    "pass token_key= the key of its token ids"
                )
            ids, mask = item[self.token_key], item.get("attention_mask")
        else:
            ids = item
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(
                f"WatermarkFilter: train item {index} must hold a 1-D integer tensor of token ids (a dict with "
                f"{self.token_key!r} or the tensor itself), got {tuple(ids.shape)} {ids.dtype}"
            )
        if mask is not None:
            mask = torch.as_tensor(mask).reshape(ids.shape)
        return ids.to(torch.int64), mask

    def score(self, dataset: Any) -> None:
        """Score every item of ``dataset`` and set ``z_scores``, ``p_values``, ``flagged``, ``kept_indices``."""
        n = len(dataset)
        z = torch.zeros(n, dtype=torch.float64)
        p = torch.ones(n, dtype=torch.float64)
        by_length: dict[int, list[tuple[int, torch.Tensor, torch.Tensor | None]]] = {}
        for i in range(n):
            ids, mask = self._tokens_of(dataset[i], i)
            by_length.setdefault(int(ids.shape[0]), []).append((i, ids, mask))
        for group in by_length.values():
            for start in range(0, len(group), 1024):
                chunk = group[start : start + 1024]
                idx = torch.tensor([i for i, _, _ in chunk])
                ids = torch.stack([t for _, t, _ in chunk])
                masks = None
                if any(m is not None for _, _, m in chunk):
                    masks = torch.stack([torch.ones_like(t) if m is None else m for _, t, m in chunk])
                zc, pc = detect_watermark(
                    ids, self.gamma, self.key, self.context_width, self.ignore_repeated, attention_mask=masks
                )
                z[idx], p[idx] = zc, pc
        flagged = z > self.z_threshold if self.z_threshold is not None else p < self.p_threshold
        self.z_scores, self.p_values, self.flagged = z, p, flagged
        self.kept_indices = [int(i) for i in torch.nonzero(~flagged).flatten()]
        self._scored_for = dataset

    # ------------------------------------------------------------------ the loader transform
    def _transform(self, loader: Any) -> DataLoader:
        if not isinstance(loader, DataLoader):
            raise TypeError(
                "WatermarkFilter needs train_dataloader() (or fit(train_dataloaders=...)) to give one "
                f"torch.utils.data.DataLoader, got {type(loader).__name__}; for several loaders, filter each dataset "
                "yourself with antimemo.watermark.detect_watermark"
            )
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"WatermarkFilter needs a map-style dataset (len and indexing), got the IterableDataset "
                f"{type(dataset).__name__}; filter the stream yourself with antimemo.watermark.detect_watermark"
            )
        if loader.batch_size is None:
            raise TypeError(
                "WatermarkFilter rebuilds the train DataLoader and needs DataLoader(batch_size=...), got a loader "
                "with a custom batch_sampler"
            )
        sampler = loader.sampler
        if type(sampler).__name__ == "DedupSampler":
            raise CompositionError(
                "DedupSampling + WatermarkFilter are refused together: WatermarkFilter would rebuild the train loader "
                "over a subset and discard DedupSampling's sampler (its epoch order and resumption state). Fix: "
                "remove the watermarked items from the dataset first (antimemo.watermark.detect_watermark), then "
                "deduplicate with DedupSampling"
            )
        if not isinstance(sampler, (RandomSampler, SequentialSampler)):
            rank_zero_warn(
                f"WatermarkFilter replaces the train DataLoader's sampler {type(sampler).__name__} (a random or "
                "sequential order is kept)"
            )
        if self._scored_for is not dataset:
            self.score(dataset)
        assert self.flagged is not None and self.kept_indices is not None
        shuffle = not isinstance(sampler, SequentialSampler)
        generator = getattr(sampler, "generator", None) if isinstance(sampler, RandomSampler) else None
        if self.policy == "drop":
            if not self.kept_indices:
                raise ValueError(
                    f"WatermarkFilter flagged all {len(dataset)} train items as watermarked: nothing left to train "
                    "on. Check gamma, key and context_width, or raise z_threshold / lower p_threshold"
                )
            new_dataset: Any = Subset(dataset, self.kept_indices)
            new_sampler: Any = RandomSampler(new_dataset, generator=generator) if shuffle else SequentialSampler(new_dataset)
        else:
            weights = torch.where(self.flagged, self.flagged_weight, 1.0).to(torch.float64)
            if not bool((weights > 0).any()):
                raise ValueError(
                    "WatermarkFilter flagged every train item and flagged_weight=0: nothing left to sample; raise "
                    "flagged_weight or z_threshold"
                )
            new_dataset = dataset
            new_sampler = WeightedRandomSampler(
                weights, num_samples=len(dataset), replacement=True,
                generator=torch.Generator().manual_seed(self.seed),
            )  # fmt: skip
        kwargs = worker_kwargs(loader)
        return DataLoader(
            new_dataset,
            batch_size=loader.batch_size,
            sampler=new_sampler,
            drop_last=loader.drop_last,
            collate_fn=loader.collate_fn,
            **kwargs,
        )

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to train if the train loader did not go through the filter."""
        loader_seam(trainer).check_applied(self, "watermarked items would be trained on as usual")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``watermark/filtered_fraction``."""
        fraction = self.filtered_fraction
        if fraction is not None:
            pl_module.log("watermark/filtered_fraction", fraction, rank_zero_only=True)
