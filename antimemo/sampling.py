"""``DedupSampler``: sample a dataset so that each duplicate cluster counts once (Lightning-free).

Policies, given one cluster id per example (e.g. ``DuplicateIndex.cluster_ids``):

- ``"drop"``: keep one representative per cluster (its first example); each epoch is a
  permutation of the representatives.
- ``"cap"``: keep at most ``max_copies`` examples per cluster (its first ``max_copies``); each
  epoch is a permutation of the kept examples. ``"drop"`` is ``"cap"`` with ``max_copies=1``.
- ``"downweight"``: draw ``num_samples`` examples with replacement, example ``i`` with
  probability proportional to ``1 / |cluster(i)|``, so every cluster has the total weight of one
  example. Drawn exactly as "a cluster uniformly, then one of its members uniformly".

Distributed: every rank computes the same epoch order from ``torch.Generator().manual_seed(seed +
epoch)`` (never the global RNG), pads it by repeating its head to a multiple of ``num_replicas``,
and takes ``order[rank::num_replicas]``: the shards are disjoint positions of one global order.
``DedupSampler`` subclasses ``DistributedSampler`` so that Lightning
(``use_distributed_sampler=True``) recognises it as already sharded and does not wrap it again.

Resumption: :meth:`DedupSampler.state_dict` holds the epoch and the number of samples this rank
has yielded in it; after :meth:`DedupSampler.load_state_dict` the next iteration yields the rest
of that epoch's order, exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from antimemo._checks import check_int

__all__ = ["POLICIES", "DedupSampler"]

POLICIES = ("drop", "downweight", "cap")


def _as_cluster_ids(cluster_ids: Any) -> np.ndarray:
    ids = getattr(cluster_ids, "cluster_ids", cluster_ids)  # a DuplicateIndex works too
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim == 1 and arr.shape[0] == 0:
        raise ValueError("cluster_ids is empty: the dataset has no examples to sample")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(
            "cluster_ids must be a 1-D integer array with one cluster id per example (or a DuplicateIndex), "
            f"got {type(cluster_ids).__name__} with shape {arr.shape} and dtype {arr.dtype}"
        )
    return arr.astype(np.int64)


def check_policy(policy: Any, max_copies: Any) -> None:
    """Validate a policy and its ``max_copies`` (shared with the ``DedupSampling`` callback).

    Args:
        policy: one of :data:`POLICIES`.
        max_copies: copies kept per cluster by ``"cap"``.

    Raises:
        ValueError: naming the bad value and the valid ones.

    Example:
        >>> check_policy("cap", 2)
    """
    if policy not in POLICIES:
        raise ValueError(
            f"policy must be one of {POLICIES}, got {policy!r}: 'drop' keeps one example per duplicate cluster, "
            "'downweight' samples with weight 1/cluster_size, 'cap' keeps at most max_copies per cluster"
        )
    check_int("max_copies", max_copies, 1, "the number of copies per cluster kept by policy='cap', e.g. 2")


class DedupSampler(DistributedSampler):
    """A sampler that counts each duplicate cluster once: drop, cap or down-weight duplicates.

    Args:
        cluster_ids: one integer cluster id per example (equal id = duplicates), or a
            :class:`~antimemo.dedup.DuplicateIndex`.
        policy: ``"drop"``, ``"downweight"`` or ``"cap"`` (see the module docstring).
        max_copies: examples kept per cluster by ``"cap"``.
        seed: base seed; epoch ``e`` uses ``torch.Generator().manual_seed(seed + e)``.
        num_replicas: number of ranks (processes) sharing the epoch.
        rank: this process's rank in ``[0, num_replicas)``.
        num_samples: samples per epoch over all ranks for ``"downweight"`` (default: the number of
            clusters); ``"drop"`` and ``"cap"`` always use every kept example once.

    Example:
        >>> s = DedupSampler([0, 0, 0, 1, 2], policy="drop", seed=0)
        >>> sorted(s), len(s)  # one of the three copies of cluster 0 (its first, example 0)
        ([0, 3, 4], 3)
        >>> a = DedupSampler([0, 0, 0, 1, 2], policy="drop", num_replicas=2, rank=0)
        >>> b = DedupSampler([0, 0, 0, 1, 2], policy="drop", num_replicas=2, rank=1)
        >>> len(a), len(b)  # 3 examples padded to 4, two per rank
        (2, 2)
    """

    def __init__(
        self,
        cluster_ids: Any,
        policy: str = "downweight",
        max_copies: int = 1,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        num_samples: int | None = None,
    ) -> None:
        ids = _as_cluster_ids(cluster_ids)
        check_policy(policy, max_copies)
        check_int("seed", seed, 0, "e.g. seed=0")
        check_int("num_replicas", num_replicas, 1, "the world size, e.g. trainer.world_size")
        check_int("rank", rank, 0, "this process's global rank")
        if rank >= num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got rank={rank}")
        if num_samples is not None:
            if policy != "downweight":
                raise ValueError(
                    f"num_samples applies only to policy='downweight' (sampling with replacement), got "
                    f"num_samples={num_samples!r} with policy={policy!r}; 'drop' and 'cap' use every kept example once"
                )
            check_int("num_samples", num_samples, 1, "or None for one sample per cluster")
        # DistributedSampler's attributes (dataset, num_replicas, rank, epoch, seed, shuffle, ...)
        super().__init__(range(ids.shape[0]), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.cluster_ids = ids
        self.policy = policy
        self.max_copies = int(max_copies)
        _, first, sizes = np.unique(ids, return_index=True, return_counts=True)
        self.num_clusters = int(first.shape[0])
        # members of each cluster, contiguous and ascending: cluster c = members[starts[c]:starts[c]+sizes[c]]
        order = np.lexsort((np.arange(ids.shape[0]), ids))
        self._members = torch.from_numpy(order.astype(np.int64))
        self._sizes = torch.from_numpy(sizes.astype(np.int64))
        self._starts = torch.from_numpy(np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64))
        if policy == "downweight":
            self._pool = None
            self.total_size_unpadded = int(num_samples) if num_samples is not None else self.num_clusters
        else:
            keep = 1 if policy == "drop" else self.max_copies
            rank_in_cluster = np.arange(ids.shape[0]) - np.repeat(self._starts.numpy(), sizes)
            pool = np.sort(order[rank_in_cluster < keep])
            self._pool = torch.from_numpy(pool.astype(np.int64))
            self.total_size_unpadded = int(pool.shape[0])
        self.num_samples = math.ceil(self.total_size_unpadded / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self._resume_offset = 0
        self._yielded = 0

    @property
    def effective_size(self) -> int:
        """Distinct units per epoch: kept examples (``"drop"``/``"cap"``) or clusters (``"downweight"``)."""
        return self.num_clusters if self._pool is None else int(self._pool.shape[0])

    def kept_indices(self) -> torch.Tensor | None:
        """The examples ``"drop"`` / ``"cap"`` keep (the same every epoch), ascending; ``None`` for
        ``"downweight"``, which samples clusters with replacement.

        Example:
            >>> DedupSampler([0, 0, 1, 1, 1], policy="cap", max_copies=2).kept_indices().tolist()
            [0, 1, 2, 3]
            >>> DedupSampler([0, 0, 1], policy="downweight").kept_indices() is None
            True
        """
        return None if self._pool is None else self._pool.clone()

    def epoch_order(self, epoch: int | None = None) -> torch.Tensor:
        """The global order of one epoch (all ranks), before padding and sharding.

        Args:
            epoch: the epoch (default: the current one).

        Returns:
            ``LongTensor`` of example indices.

        Example:
            >>> DedupSampler([0, 1, 2], policy="drop", seed=0).epoch_order(0).sort().values.tolist()
            [0, 1, 2]
        """
        e = self.epoch if epoch is None else epoch
        g = torch.Generator().manual_seed(self.seed + e)
        if self._pool is not None:
            return self._pool[torch.randperm(self._pool.shape[0], generator=g)]
        n = self.total_size_unpadded
        cluster = torch.randint(0, self.num_clusters, (n,), generator=g)
        u = torch.rand(n, generator=g, dtype=torch.float64)
        within = torch.minimum((u * self._sizes[cluster]).long(), self._sizes[cluster] - 1)
        return self._members[self._starts[cluster] + within]

    def shard(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's indices for an epoch: the padded global order, ``[rank::num_replicas]``.

        Args:
            epoch: the epoch (default: the current one).

        Returns:
            ``LongTensor`` of length ``len(self)``.
        """
        order = self.epoch_order(epoch)
        pad = self.total_size - order.shape[0]
        if pad:
            order = torch.cat([order, order.repeat(math.ceil(pad / order.shape[0]))[:pad]])
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        shard = self.shard()
        start, self._resume_offset = self._resume_offset, 0
        self._yielded = start
        for i in shard[start:].tolist():
            self._yielded += 1
            yield i

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order. A new epoch starts from its beginning; the same epoch keeps a
        pending resume offset (Lightning calls this again right after a mid-epoch restore).

        Args:
            epoch: the epoch number.
        """
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume_offset = 0
            self._yielded = 0

    def state_dict(self, num_yielded: int | None = None) -> dict[str, Any]:
        """The sampler position: epoch and samples of this rank's shard already yielded.

        Args:
            num_yielded: override the count (the ``DedupSampling`` callback passes the samples
                actually trained on, which can lag behind a prefetching DataLoader).

        Returns:
            Plain Python values (loadable with ``torch.load(weights_only=True)``).

        Example:
            >>> s = DedupSampler([0, 1, 2, 3], policy="drop")
            >>> it = iter(s); _ = next(it)
            >>> s.state_dict()["num_yielded"]
            1
        """
        return {
            "epoch": int(self.epoch),
            "num_yielded": int(self._yielded if num_yielded is None else num_yielded),
            "policy": self.policy,
            "max_copies": self.max_copies,
            "seed": int(self.seed),
            "num_replicas": int(self.num_replicas),
            "num_examples": int(self.cluster_ids.shape[0]),
            "num_samples": int(self.num_samples),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields the rest of the saved epoch (or the next epoch if the
        saved one was complete).

        Args:
            state: from :meth:`state_dict`.

        Raises:
            ValueError: if the state was saved with another policy, seed, dataset size or world
                size, whose order would differ.

        Example:
            >>> full = list(DedupSampler([0, 1, 2, 3], policy="drop", seed=3))
            >>> s = DedupSampler([0, 1, 2, 3], policy="drop", seed=3)
            >>> s.load_state_dict({"epoch": 0, "num_yielded": 1})
            >>> list(s) == full[1:]
            True
        """
        for key, mine in (
            ("policy", self.policy),
            ("max_copies", self.max_copies),
            ("seed", int(self.seed)),
            ("num_examples", int(self.cluster_ids.shape[0])),
            ("num_replicas", int(self.num_replicas)),
            ("num_samples", int(self.num_samples)),
        ):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"cannot resume DedupSampler: the saved state has {key}={state[key]!r} but this sampler has "
                    f"{key}={mine!r}, so the epoch order would differ; resume with the same configuration"
                )
        epoch, done = int(state["epoch"]), int(state["num_yielded"])
        if done < 0:
            raise ValueError(f"num_yielded must be >= 0, got {done}")
        if done >= self.num_samples:  # the saved epoch was complete: the next one starts fresh
            epoch, done = epoch + 1, 0
        self.epoch = epoch
        self._resume_offset = done
        self._yielded = done
