"""The Poisson-sampling train loader of DP-SGD (no Lightning)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler, Subset

from antimemo._loaders import worker_kwargs
from antimemo.dp.sampler import EmptySafeCollate, PoissonBatchSampler

__all__ = ["poisson_loader"]


def poisson_loader(
    loader: Any,
    *,
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
    start_draw: int = 0,
    generator: torch.Generator | None = None,
    kept_indices: torch.Tensor | None = None,
) -> tuple[DataLoader, float, int]:
    """Rebuild ``loader`` to draw Poisson batches: every example in with probability ``q`` per step.

    Same dataset (or its ``kept_indices`` subset, e.g. the examples a deduplication keeps),
    collate function and worker settings; ``q = batch_size * world_size / N`` and ``int(1/q)``
    batches per epoch.

    Returns:
        ``(loader, q, N)``.

    Raises:
        TypeError / ValueError: a loader DP cannot Poisson-sample, naming the problem and the fix.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> new, q, n = poisson_loader(DataLoader(list(range(10)), batch_size=2))
        >>> q, n, type(new.batch_sampler).__name__
        (0.2, 10, 'PoissonBatchSampler')
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(
            "DifferentialPrivacy needs train_dataloader() to return one torch.utils.data.DataLoader (it replaces "
            f"its sampling by Poisson sampling), got {type(loader).__name__}"
        )
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            "DifferentialPrivacy needs a map-style training dataset (Poisson sampling draws indices), got the "
            f"IterableDataset {type(dataset).__name__}; pass a Dataset with __len__ and __getitem__ (e.g. "
            "torch.utils.data.TensorDataset, or a list of examples) to the train DataLoader"
        )
    if kept_indices is not None:
        dataset = Subset(dataset, [int(i) for i in kept_indices])
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the train dataset is empty: DifferentialPrivacy has nothing to sample")
    if loader.batch_size is None:
        raise ValueError(
            "the train DataLoader has batch_size=None (a custom batch_sampler); DifferentialPrivacy samples "
            "batches itself at rate q = batch_size * world_size / len(dataset) and needs DataLoader(batch_size=...)"
        )
    per_rank = int(loader.batch_size)
    q = per_rank * world_size / n
    if q > 1:
        raise ValueError(
            f"the train DataLoader's batch_size={per_rank} x world_size={world_size} exceeds the {n} training examples "
            f"(sample rate q = {q:.3g} > 1); lower the batch size to at most {n // world_size}"
        )
    sampler = getattr(loader, "sampler", None)
    if kept_indices is None and sampler is not None and not isinstance(sampler, (RandomSampler, SequentialSampler)):
        import warnings

        warnings.warn(
            f"DifferentialPrivacy replaces the train loader's {type(sampler).__name__} by Poisson sampling "
            f"(every example included with probability q={q:.4g} per step); its weighting/ordering is not used",
            UserWarning,
            stacklevel=2,
        )
    batch_sampler = PoissonBatchSampler(
        None,
        batch_size=per_rank,
        num_samples=n,
        sample_rate=q,
        rank=rank,
        world_size=world_size,
        seed=seed,
        start_draw=start_draw,
        generator=generator,
    )
    kwargs = worker_kwargs(loader)
    new = DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=EmptySafeCollate(loader.collate_fn, dataset), **kwargs)
    return new, q, n
