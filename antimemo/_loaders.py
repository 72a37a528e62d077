"""What a rebuilt DataLoader keeps from the user's one (torch only)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

__all__ = ["worker_kwargs"]


def worker_kwargs(loader: DataLoader) -> dict[str, Any]:
    """The worker settings of ``loader``, for a ``DataLoader`` rebuilt with another sampler.

    Example:
        >>> sorted(worker_kwargs(DataLoader(range(4), num_workers=0)))
        ['multiprocessing_context', 'num_workers', 'persistent_workers', 'pin_memory', 'timeout', 'worker_init_fn']
    """
    kwargs: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return kwargs
