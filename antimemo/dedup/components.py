"""Distributed connected components: large-star / small-star (Kiveris et al. 2014) over hash partitions.

An undirected graph is a set of edges stored as ``int64 [E, 2]`` rows ``(hi, lo)`` with
``hi > lo``, split into partitions. One round is two map/shuffle/reduce steps:

- **large-star**: every edge is sent to both endpoints; a node ``u`` with neighbours ``N(u)`` and
  ``m = min(N(u) | {u})`` links every neighbour ``v > u`` to ``m``;
- **small-star**: every edge is sent to its larger endpoint; a node ``u`` with smaller neighbours
  ``S`` and ``m = min(S)`` links ``u`` and every ``v`` in ``S`` to ``m``.

Each step keeps the components and the reduce of one node sees only that node's edges, so a
partition needs memory for its own edges only; the driver sees two change counts per round. When
a round changes nothing, every component is a star around its smallest node: the edges are
``(member, smallest member)``, one per member that is not the smallest. The number of rounds grows
with the logarithm of the component diameter (squared in the worst case of the proof).

:func:`star_components` runs the same steps in this process (tests, small graphs);
:func:`ray_star_components` runs them as Ray tasks, one reduce task per partition, with the
edges kept in Ray's object store. The step functions import only numpy; Ray is imported through
:func:`antimemo._extras.require` when the Ray driver runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "hash_partition",
    "large_star",
    "ray_remote",
    "ray_star_components",
    "small_star",
    "split_rows",
    "star_components",
]

_MIX = np.uint64(0x9E3779B97F4A7C15)
_EMPTY = np.zeros((0, 2), dtype=np.int64)


def hash_partition(keys: np.ndarray, parts: int) -> np.ndarray:
    """Partition of each key: a multiplicative hash of the key (as ``uint64``) modulo ``parts``.

    Args:
        keys: integer keys (any integer dtype; negative values are taken modulo ``2**64``).
        parts: number of partitions.

    Returns:
        ``int64`` partition ids in ``[0, parts)``.

    Example:
        >>> p = hash_partition(np.arange(1000), 4)
        >>> sorted(set(p.tolist())), bool(np.bincount(p).min() > 150)
        ([0, 1, 2, 3], True)
    """
    h = np.asarray(keys).astype(np.int64).view(np.uint64) * _MIX
    h ^= h >> np.uint64(31)
    return (h % np.uint64(parts)).astype(np.int64)


def split_rows(arrays: tuple, part_ids: np.ndarray, parts: int) -> list[tuple]:
    """Split row-aligned arrays into ``parts`` tuples by partition id (rows keep their order).

    Args:
        arrays: arrays with the same first dimension.
        part_ids: ``int64`` partition of each row.
        parts: number of partitions.

    Returns:
        ``parts`` tuples of arrays.

    Example:
        >>> [t[0].tolist() for t in split_rows((np.array([5, 6, 7]),), np.array([1, 0, 1]), 2)]
        [[6], [5, 7]]
    """
    order = np.argsort(part_ids, kind="stable")
    bounds = np.searchsorted(part_ids[order], np.arange(parts + 1))
    return [tuple(a[order[bounds[j] : bounds[j + 1]]] for a in arrays) for j in range(parts)]


def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and size of each run of equal values in sorted ``keys``."""
    if keys.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], np.flatnonzero(keys[1:] != keys[:-1]) + 1))
    sizes = np.diff(np.concatenate((starts, [keys.shape[0]])))
    return starts, sizes


def _by_node(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique rows ``(u, v)`` sorted by ``u`` then ``v``, with the start and size of each ``u``'s run."""
    pairs = np.unique(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=0)
    u, v = pairs[:, 0], pairs[:, 1]
    return (u, v, *_groups(u))


def large_star(pairs: np.ndarray) -> tuple[np.ndarray, int]:
    """Large-star step on the directed pairs ``(u, v)`` held by ``u``'s partition.

    Args:
        pairs: ``int64 [E, 2]``, both directions of every edge whose endpoint ``u`` is here.

    Returns:
        ``(edges, changes)``: the new edges ``(v, m(u))`` for ``v > u`` as ``(hi, lo)`` rows, and
        how many of them point to another node than ``u`` (0 for every node at a fixed point).

    Example:
        >>> e, c = large_star(np.array([[1, 0], [1, 2], [1, 3], [2, 1], [3, 1], [0, 1]]))
        >>> sorted(map(tuple, e.tolist())), c
        ([(1, 0), (2, 0), (3, 0)], 2)
    """
    u, v, starts, sizes = _by_node(pairs)
    if u.shape[0] == 0:
        return _EMPTY, 0
    m = np.minimum(np.minimum.reduceat(v, starts), u[starts])
    m_row = np.repeat(m, sizes)
    up = v > u
    out = np.stack([v[up], m_row[up]], axis=1)
    return out, int((m_row[up] != u[up]).sum())


def small_star(pairs: np.ndarray) -> tuple[np.ndarray, int]:
    """Small-star step on the edges ``(u, v)``, ``v < u``, held by ``u``'s partition.

    Args:
        pairs: ``int64 [E, 2]`` rows ``(hi, lo)``.

    Returns:
        ``(edges, changes)``: ``(u, m)`` and ``(v, m)`` for the other smaller neighbours ``v``,
        with ``m`` the smallest neighbour; ``changes`` counts the nodes with two or more smaller
        neighbours (0 at a fixed point).

    Example:
        >>> e, c = small_star(np.array([[5, 1], [5, 2], [4, 3]]))
        >>> sorted(map(tuple, e.tolist())), c
        ([(2, 1), (4, 3), (5, 1)], 1)
    """
    u, v, starts, sizes = _by_node(pairs)
    if u.shape[0] == 0:
        return _EMPTY, 0
    m = v[starts]  # rows are sorted by (u, v): the first neighbour is the smallest
    m_row = np.repeat(m, sizes)
    other = v != m_row
    out = np.concatenate([np.stack([u[starts], m], axis=1), np.stack([v[other], m_row[other]], axis=1)])
    return out, int((sizes >= 2).sum())


def _normalise(edges: np.ndarray) -> np.ndarray:
    """Rows ``(hi, lo)`` without self-loops."""
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    e = e[e[:, 0] != e[:, 1]]
    return np.stack([e.max(axis=1), e.min(axis=1)], axis=1)


def _both_directions(edges: np.ndarray) -> np.ndarray:
    return np.concatenate([edges, edges[:, ::-1]])


def star_components(edges: np.ndarray, parts: int = 4, max_rounds: int = 200) -> tuple[np.ndarray, int]:
    """Large-star / small-star in this process over ``parts`` hash partitions (the Ray algorithm, serially).

    Args:
        edges: ``int [E, 2]`` undirected edges (any orientation; self-loops ignored).
        parts: number of partitions.
        max_rounds: raise if the rounds do not converge within this many (they always do).

    Returns:
        ``(stars, rounds)``: ``int64 [K, 2]`` rows ``(member, smallest member of its component)``,
        one per node that is not the smallest of its component, sorted; and the rounds run.

    Example:
        >>> stars, _ = star_components(np.array([[3, 1], [4, 3], [7, 6]]))
        >>> stars.tolist()
        [[3, 1], [4, 1], [7, 6]]
    """
    parted = [e for (e,) in split_rows((_normalise(edges),), hash_partition(_normalise(edges)[:, 0], parts), parts)]
    for rounds in range(1, max_rounds + 1):
        both = [_both_directions(p) for p in parted]
        shuffled = _shuffle_local(both, parts)
        res = [large_star(p) for p in shuffled]
        changes = sum(c for _, c in res)
        shuffled = _shuffle_local([e for e, _ in res], parts)
        res = [small_star(p) for p in shuffled]
        changes += sum(c for _, c in res)
        parted = [e for e, _ in res]
        if changes == 0:
            out = np.concatenate(parted) if parted else _EMPTY
            return out[np.lexsort((out[:, 1], out[:, 0]))], rounds
    raise RuntimeError(f"large-star/small-star did not converge in max_rounds={max_rounds} rounds")


def _shuffle_local(parted: list[np.ndarray], parts: int) -> list[np.ndarray]:
    out: list[list[np.ndarray]] = [[] for _ in range(parts)]
    for p in parted:
        for j, (chunk,) in enumerate(split_rows((p,), hash_partition(p[:, 0], parts), parts)):
            out[j].append(chunk)
    return [np.concatenate(c) if c else _EMPTY for c in out]


# --------------------------------------------------------------------------------------------
# Ray tasks


_REMOTE: dict[tuple, Any] = {}


def ray_remote(fn: Callable) -> Any:
    """``ray.remote(fn)``, created once per process (``fn`` must be a module-level function).

    Example:
        >>> callable(ray_remote)
        True
    """
    key = (fn.__module__, fn.__qualname__)
    if key not in _REMOTE:
        from antimemo._extras import require

        ray = require("ray", "the Ray dedup engine")
        _REMOTE[key] = ray.remote(fn)
    return _REMOTE[key]


def returns_list(refs: Any, n: int) -> list:
    """The object refs of a task called with ``num_returns=n`` as a list (Ray returns one bare ref for 1)."""
    return list(refs) if n > 1 else [refs]


def _split_edges_task(edges: np.ndarray, parts: int, both: bool) -> tuple:
    e = _both_directions(edges) if both else edges
    pieces = [c for (c,) in split_rows((e,), hash_partition(e[:, 0], parts), parts)]
    return tuple(pieces) if parts > 1 else pieces[0]


def _large_star_task(*chunks: np.ndarray) -> tuple[np.ndarray, int]:
    return large_star(np.concatenate(chunks) if chunks else _EMPTY)


def _small_star_task(*chunks: np.ndarray) -> tuple[np.ndarray, int]:
    return small_star(np.concatenate(chunks) if chunks else _EMPTY)


def _star_step(edge_refs: list, parts: int, both: bool, reduce_fn: Callable) -> tuple[list, list]:
    split = ray_remote(_split_edges_task)
    splits = [returns_list(split.options(num_returns=parts).remote(r, parts, both), parts) for r in edge_refs]
    reduce = ray_remote(reduce_fn)
    outs = [reduce.options(num_returns=2).remote(*[s[j] for s in splits]) for j in range(parts)]
    return [o[0] for o in outs], [o[1] for o in outs]


def ray_star_components(edge_refs: list, parts: int, max_rounds: int = 200, progress: bool = True) -> tuple[list, int]:
    """Large-star / small-star as Ray tasks on edges held in the object store.

    Args:
        edge_refs: object refs of ``int64 [E_i, 2]`` arrays of ``(hi, lo)`` edges (``hi > lo``).
        parts: hash partitions (reduce tasks per step).
        max_rounds: raise if not converged after this many rounds.
        progress: show a tqdm bar of the rounds with the last round's change count.

    Returns:
        ``(star_refs, rounds)``: ``parts`` refs of ``(member, smallest member)`` edge arrays.

    Raises:
        RuntimeError: no convergence within ``max_rounds``.
    """
    import ray
    from tqdm.auto import tqdm

    refs = list(edge_refs)
    with tqdm(desc="dedup[ray]: connected components", unit="round", disable=not progress) as bar:
        for rounds in range(1, max_rounds + 1):
            refs, c1 = _star_step(refs, parts, True, _large_star_task)
            refs, c2 = _star_step(refs, parts, False, _small_star_task)
            changes = int(sum(ray.get(c1)) + sum(ray.get(c2)))
            bar.update(1)
            bar.set_postfix(changes=changes)
            if changes == 0:
                return refs, rounds
    raise RuntimeError(f"large-star/small-star did not converge in max_rounds={max_rounds} rounds")
