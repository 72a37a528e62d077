"""Connected components: a sparse union-find and canonical cluster ids."""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as _scipy_cc

__all__ = ["UnionFind", "canonical_cluster_ids", "connected_components"]


class UnionFind:
    """Union-find over integer keys, created on first use; the root is the smallest key.

    Keeping the smallest key as root makes the result independent of the order of unions.

    Example:
        >>> uf = UnionFind()
        >>> uf.union(5, 2); uf.union(9, 5)
        >>> uf.find(9), uf.find(7)
        (2, 7)
    """

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        """Return the root (smallest member) of ``x``'s set.

        Args:
            x: an integer key (a key never seen is its own set).

        Returns:
            The root key.
        """
        parent = self.parent
        root = x
        while True:
            p = parent.get(root, root)
            if p == root:
                break
            root = p
        while x != root:  # path compression
            nxt = parent.get(x, x)
            parent[x] = root
            x = nxt
        return root

    def union(self, x: int, y: int) -> None:
        """Merge the sets of ``x`` and ``y``.

        Args:
            x: a key.
            y: another key.
        """
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return
        if rx < ry:
            self.parent[ry] = rx
        else:
            self.parent[rx] = ry


def canonical_cluster_ids(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters ``0, 1, ...`` in the order of their first example.

    Args:
        labels: any integer label per example (equal label = same cluster).

    Returns:
        ``int64`` cluster ids; cluster 0 contains example 0, and so on.

    Example:
        >>> canonical_cluster_ids(np.array([7, 3, 7, 9])).tolist()
        [0, 1, 0, 2]
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.shape[0], dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.shape[0])
    return rank[inverse.reshape(-1)]


def connected_components(num_nodes: int, pairs: np.ndarray) -> np.ndarray:
    """Canonical cluster ids of the connected components of an undirected graph.

    Args:
        num_nodes: number of nodes ``N``.
        pairs: ``int`` array ``[E, 2]`` of edges.

    Returns:
        ``int64`` cluster id per node (see :func:`canonical_cluster_ids`).

    Example:
        >>> connected_components(5, np.array([[3, 1], [4, 3]])).tolist()
        [0, 1, 2, 1, 1]
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if pairs.shape[0] == 0:
        return np.arange(num_nodes, dtype=np.int64)
    graph = coo_matrix(
        (np.ones(pairs.shape[0], dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(num_nodes, num_nodes)
    )
    _, labels = _scipy_cc(graph, directed=False)
    return canonical_cluster_ids(labels)
