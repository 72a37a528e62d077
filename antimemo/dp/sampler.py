"""Poisson sampling for DP-SGD: a ``BatchSampler`` and an empty-batch-safe collate function.

DP-SGD's accounting (Opacus' RDP / PRV / GDP accountants) assumes that every step's batch is a
*Poisson* sample: each record of the training set is in the batch independently with
probability ``q`` (the sample rate), so batch sizes vary and a batch can be empty.
:class:`PoissonBatchSampler` draws exactly such batches, also under data parallelism: the
``N`` records are split into ``world_size`` disjoint shards (record ``i`` belongs to rank
``i % world_size``) and every rank includes each record of its shard independently with
probability ``q``, so the union over ranks is a Poisson sample of the whole set at rate ``q``.
Every rank yields the same number of batches per epoch (``int(1 / q)``, Opacus' convention),
empty ones included, so the ranks always take the same number of optimizer steps. Batch ``t``
(counted over the whole run, across epochs and resumes) uses its own random stream
``mix_seed(seed, rank, t)``, so no inclusion mask is ever reused.

No Lightning import here (a lower layer of :mod:`antimemo.callbacks.dp`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

__all__ = ["EmptySafeCollate", "PoissonBatchSampler", "mix_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*parts: int) -> int:
    """Hash integers into one 63-bit seed (splitmix64 chain), for independent generator streams.

    Args:
        *parts: integers (seed, rank, epoch, step, a stream tag...).

    Returns:
        An integer in ``[0, 2**63)`` usable with ``torch.Generator.manual_seed``.

    Example:
        >>> mix_seed(0, 1) != mix_seed(1, 0)
        True
        >>> 0 <= mix_seed(123, 4, 5) < 2**63
        True
    """
    z = 0
    for p in parts:
        z = _splitmix64(z ^ (int(p) & _MASK64))
    return z >> 1


class PoissonBatchSampler(BatchSampler):
    """Batches of independently included records (Poisson sampling) at ``sample_rate``.

    Each iteration (one epoch) yields ``steps`` lists of dataset indices. In each list every
    record of this rank's shard ``range(rank, num_samples, world_size)`` appears independently
    with probability ``sample_rate``; lists can be empty. The ``t``-th list this sampler draws
    (``t`` counts from ``start_draw`` over all epochs) uses
    ``torch.Generator().manual_seed(mix_seed(seed, rank, t))``, or the given ``generator``
    (e.g. a cryptographically secure one), so runs are reproducible, ranks are independent, and
    a run resumed with ``start_draw`` = the steps already taken never repeats a mask.

    It subclasses :class:`torch.utils.data.BatchSampler` so that Lightning can re-instantiate it
    when it injects a ``DistributedSampler`` under DDP. That injected ``sampler`` is *not* used
    for sampling (a ``DistributedSampler`` pads its shards with repeated records, which would
    put one record in two ranks' batches); it is only checked to agree with ``rank`` and
    ``world_size``.

    Args:
        sampler: ignored for sampling (kept for Lightning's re-instantiation); a
            ``DistributedSampler`` must agree with ``rank`` / ``world_size``.
        batch_size: the expected *per-rank* batch size ``sample_rate * num_samples / world_size``
            rounded, informational only (``len(batch)`` varies).
        drop_last: must be ``False`` (Poisson batches are never dropped).
        num_samples: number of records ``N`` in the (whole) training set.
        sample_rate: inclusion probability ``q`` in ``(0, 1]``.
        steps: batches per epoch; ``None`` means ``int(1 / sample_rate)``.
        rank: this process' rank.
        world_size: number of processes.
        seed: base seed of the per-rank, per-draw streams.
        start_draw: index of the first draw (the number of steps already taken on resume).
        generator: a generator to use instead of the seeded ones (``secure_mode``).

    Example:
        >>> s = PoissonBatchSampler(num_samples=100, sample_rate=0.1, seed=0)
        >>> len(s)
        10
        >>> batches = list(s)
        >>> len(batches), all(0 <= i < 100 for b in batches for i in b)
        (10, True)
    """

    def __init__(
        self,
        sampler: Sampler | None = None,
        batch_size: int = 1,
        drop_last: bool = False,
        *,
        num_samples: int,
        sample_rate: float,
        steps: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_draw: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1 or math.isnan(sample_rate):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        if steps is None:
            steps = int(1 / sample_rate)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1 or None for int(1 / sample_rate), got {steps!r}")
        if drop_last:
            raise ValueError("drop_last must be False: Poisson batches have random sizes and are never dropped")
        if isinstance(sampler, DistributedSampler) and (
            sampler.num_replicas != world_size or sampler.rank != rank
        ):
            raise ValueError(
                f"the injected DistributedSampler has num_replicas={sampler.num_replicas}, rank={sampler.rank} but "
                f"this PoissonBatchSampler was built for world_size={world_size}, rank={rank}"
            )
        # no super().__init__: BatchSampler's checks do not apply to Poisson batches
        self.sampler = sampler
        self.batch_size = max(1, int(batch_size))
        self.drop_last = False
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.generator = generator
        self.draws = int(start_draw)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch (informational: the random streams are per draw, not per epoch).

        Args:
            epoch: epoch number.
        """
        self.epoch = int(epoch)

    def shard(self) -> torch.Tensor:
        """This rank's record indices ``range(rank, num_samples, world_size)``.

        Example:
            >>> PoissonBatchSampler(num_samples=5, sample_rate=0.5, rank=1, world_size=2).shard().tolist()
            [1, 3]
        """
        return torch.arange(self.rank, self.num_samples, self.world_size)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        shard = self.shard()
        for _ in range(self.steps):
            gen = self.generator
            if gen is None:
                gen = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, self.draws))
            self.draws += 1
            mask = torch.rand(len(shard), generator=gen) < self.sample_rate
            yield shard[mask].tolist()


def _empty_like(value: Any, path: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            raise TypeError(
                f"cannot build an empty batch: collated field {path or '<batch>'} is a 0-d tensor with no batch "
                "dimension; return per-sample tensors from the dataset so that collate stacks them"
            )
        return value[:0]
    if isinstance(value, Mapping):
        return type(value)({k: _empty_like(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_empty_like(v, f"{path}[{i}]") for i, v in enumerate(value)))
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and not isinstance(value[0], (torch.Tensor, Mapping, list, tuple)):
            return type(value)()  # a collated list of per-sample scalars/strings (batch of 1)
        return type(value)(_empty_like(v, f"{path}[{i}]") for i, v in enumerate(value))
    raise TypeError(
        f"cannot build an empty batch: collated field {path or '<batch>'} has type {type(value).__name__}; "
        "only tensors, mappings, lists and tuples are supported (a Poisson batch can be empty)"
    )


class EmptySafeCollate:
    """Wrap a collate function so that an empty list of samples gives a zero-length batch.

    Poisson sampling produces empty batches now and then, which ``default_collate`` cannot
    handle. For an empty list this collates ``[dataset[0]]`` and slices every tensor to
    length 0 along dim 0, so the batch has the usual structure (dict keys, dtypes, trailing
    shapes) and a batch size of 0; no record's *data* enters the batch.

    Args:
        collate_fn: the loader's collate function.
        dataset: the map-style dataset (``dataset[0]`` gives the structure).

    Example:
        >>> from torch.utils.data import default_collate
        >>> ds = [{"input_ids": torch.arange(4)}] * 3
        >>> collate = EmptySafeCollate(default_collate, ds)
        >>> collate([])["input_ids"].shape
        torch.Size([0, 4])
        >>> collate([ds[0], ds[1]])["input_ids"].shape
        torch.Size([2, 4])
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Dataset | Sequence[Any]) -> None:
        if not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable, got {collate_fn!r}")
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __call__(self, samples: list[Any]) -> Any:
        if len(samples) > 0:
            return self.collate_fn(samples)
        return _empty_like(self.collate_fn([self.dataset[0]]), "")
