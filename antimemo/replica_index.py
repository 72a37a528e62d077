"""Replica search at scale: a sharded FAISS index (Flat, IVF-Flat or IVF-PQ) built by Ray workers.

One process holds about a billion 64-d float vectors only as compressed codes, and builds them
slowly. :class:`ShardedReplicaIndex` splits the reference rows into ``num_shards`` contiguous
ranges, one FAISS index per range, built by one worker each (``engine="ray"``, or one after the
other in this process with ``engine="local"``: both write byte-identical shard files), and answers
a query with the top-``k`` merged across shards (:func:`merge_topk`).

**Shared training.** The coarse quantizer (IVF cells) and the PQ codebooks are trained once, on
a seeded sample of ``train_size`` rows, in the driver; every worker receives the same trained,
empty index and only *adds* its rows. So a row is encoded the same way in whichever shard it
lands, and distances from different shards are comparable: the merged top-``k`` of a sharded
``"Flat"`` index equals the top-``k`` of one exact index (``tests/test_replica_shards.py``).

**Metric.** As in :func:`antimemo.functional.replica.nearest_neighbors`: ``"ip"`` (inner product,
larger is closer; cosine on unit rows, which :func:`~antimemo.functional.replica.embed` returns)
or ``"l2"`` (squared Euclidean distance, smaller is closer).

**Ids.** Global: row ``i`` of the source has id ``i``; shard ``s`` holds rows
``[offset_s, offset_s + ntotal_s)``. ``-1`` marks a missing result (fewer than ``k`` rows in the
probed cells).

**Files.** ``out_dir/manifest.json`` (format, metric, dim, factory string, seed, per shard: file,
rows, id offset, SHA-256 and the digest of its trained quantizer/codebooks) and one
``shard-XXXXX.faiss`` per shard (``faiss.serialize_index`` bytes, never pickle). Every file is
written atomically and the manifest last, so an interrupted build leaves no loadable index.
:meth:`ShardedReplicaIndex.load` checks every checksum *before* FAISS parses a byte, and refuses
shards whose dimension, metric, row count or trained codebooks disagree with the manifest.

**Sources** (``vectors_source``): a float array ``[N, D]`` (numpy or torch), ``.npy`` files (a
list of paths or a glob pattern; each worker memory-maps only its rows, read with
``allow_pickle=False``), or any picklable object with ``num_rows``, ``dim`` and
``read(start, stop) -> float32 [stop - start, D]`` (e.g. :class:`ClusteredRows`, or a reader of
your own embedding store). Workers read ``chunk_size`` rows at a time, so a worker's memory is its
shard's codes plus one chunk.

Example:
    >>> import tempfile
    >>> rows = ClusteredRows(num_rows=3000, dim=16, clusters=20, seed=0)
    >>> index = ShardedReplicaIndex.build(rows, tempfile.mkdtemp(), num_shards=3, index="IVF16,Flat",
    ...                                   train_size=1000, progress=False)
    >>> index.ntotal, index.num_shards, round(index.bytes_per_vector())  # 64 B of floats + 8 B id + centroids
    (3000, 3, 73)
    >>> scores, ids = index.search(rows.read(10, 12), k=1, nprobe=16)
    >>> ids[:, 0].tolist()
    [10, 11]
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from antimemo._atomic import atomic_write_bytes, atomic_write_text
from antimemo._checks import check_int, is_int
from antimemo._faiss import import_faiss

__all__ = [
    "ArrayRows",
    "ClusteredRows",
    "CorruptShardError",
    "NpyRows",
    "ShardedReplicaIndex",
    "default_factory",
    "merge_topk",
]

FORMAT = "antimemo-sharded-replica-index"
VERSION = 1
MANIFEST = "manifest.json"
METRICS = ("ip", "l2")
#: Factory strings accepted: exact, IVF with full vectors, IVF with PQ codes (``x{nbits}``), IVF with scalar quantisation.
_FACTORY = re.compile(r"^(Flat|IVF[1-9][0-9]*,(Flat|PQ[1-9][0-9]*(x[1-9][0-9]?)?|SQ(4|6|8|fp16)))$")


class CorruptShardError(ValueError):
    """A shard file or the manifest of a :class:`ShardedReplicaIndex` is missing, modified or inconsistent."""


# ------------------------------------------------------------------------------------- sources


def _as_rows(block: Any, dim: int, start: int, stop: int, what: str) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(block), dtype=np.float32)
    if a.shape != (stop - start, dim):
        raise ValueError(
            f"{what}.read({start}, {stop}) returned shape {a.shape}, expected ({stop - start}, {dim}); "
            "read(start, stop) must return the rows [start, stop) as a float array [stop - start, dim]"
        )
    if a.size and not np.isfinite(a).all():
        raise ValueError(f"{what}.read({start}, {stop}) returned NaN or inf values; clean the embeddings first")
    return a


class ArrayRows:
    """Rows of an in-memory float array ``[N, D]`` (numpy or torch).

    Example:
        >>> ArrayRows(np.zeros((4, 2))).read(1, 3).shape
        (2, 2)
    """

    def __init__(self, array: Any) -> None:
        if hasattr(array, "detach"):  # a torch tensor, without importing torch
            array = array.detach().cpu().numpy()
        a = np.asarray(array)
        if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0 or a.dtype.kind not in "fiu":
            raise ValueError(
                f"vectors_source array must be a non-empty float array [N, D], got shape {a.shape} dtype {a.dtype}"
            )
        self.array = a
        self.num_rows, self.dim = int(a.shape[0]), int(a.shape[1])

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(self.array[start:stop], dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.array[rows], dtype=np.float32)


class NpyRows:
    """Rows of ``.npy`` files (2-D float arrays of one width), concatenated in the order given.

    Files are memory-mapped with ``allow_pickle=False``; only the rows read are paged in.

    Args:
        paths: ``.npy`` paths, or one glob pattern (sorted), e.g. ``"emb/part-*.npy"``.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> np.save(os.path.join(d, "a.npy"), np.ones((3, 2), np.float32))
        >>> np.save(os.path.join(d, "b.npy"), np.zeros((2, 2), np.float32))
        >>> src = NpyRows(os.path.join(d, "*.npy"))
        >>> src.num_rows, src.read(2, 4).tolist()
        (5, [[1.0, 1.0], [0.0, 0.0]])
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
        if isinstance(paths, (str, os.PathLike)):
            pattern = str(paths)
            files = sorted(_glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
            if not files:
                raise ValueError(f"vectors_source={pattern!r} matches no file; check the glob pattern")
        else:
            files = [str(p) for p in paths]
            if not files:
                raise ValueError("vectors_source is an empty list of .npy paths; pass at least one file")
        self.paths = files
        sizes, dim = [], None
        for p in files:
            if not Path(p).is_file():
                raise ValueError(f"vectors_source file {p!r} does not exist")
            try:
                a = np.load(p, mmap_mode="r", allow_pickle=False)
            except ValueError as err:
                raise ValueError(f"vectors_source file {p!r} is not a plain .npy array ({err})") from err
            if a.ndim != 2 or a.dtype.kind not in "fiu" or a.shape[1] == 0:
                raise ValueError(f"vectors_source file {p!r} must hold a 2-D float array [N, D], got shape {a.shape} dtype {a.dtype}")
            if dim is not None and a.shape[1] != dim:
                raise ValueError(f"vectors_source file {p!r} has {a.shape[1]} columns but {files[0]!r} has {dim}; all files must share D")
            dim = int(a.shape[1])
            sizes.append(int(a.shape[0]))
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_rows, self.dim = int(self.offsets[-1]), int(dim or 0)
        if self.num_rows == 0:
            raise ValueError(f"vectors_source files {files!r} hold no rows")

    def read(self, start: int, stop: int) -> np.ndarray:
        out = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for f in range(max(first, 0), len(self.paths)):
            lo, hi = int(self.offsets[f]), int(self.offsets[f + 1])
            if lo >= stop:
                break
            a = np.load(self.paths[f], mmap_mode="r", allow_pickle=False)
            out.append(np.asarray(a[max(start, lo) - lo : min(stop, hi) - lo], dtype=np.float32))
        return np.ascontiguousarray(np.concatenate(out) if out else np.zeros((0, self.dim), np.float32))


class ClusteredRows:
    """Deterministic synthetic embeddings: unit vectors around ``clusters`` random centres.

    Row ``i`` is ``normalize(c_{z_i} + spread * e_i / sqrt(dim))`` with the centres ``c``, the
    cluster ``z_i`` and the noise ``e_i`` drawn from generators seeded by ``(seed, block)`` for
    blocks of 65,536 rows, so any range is generated alone, identically in every process (for
    tests, examples and the 10M-row benchmark; nothing is downloaded or stored).

    Example:
        >>> rows = ClusteredRows(num_rows=100_000, dim=8, clusters=4, seed=1)
        >>> bool(np.array_equal(rows.read(70_000, 70_002), rows.read(69_999, 70_002)[1:]))
        True
    """

    BLOCK = 65536

    def __init__(self, num_rows: int, dim: int, clusters: int = 1000, spread: float = 0.5, seed: int = 0) -> None:
        self.num_rows = check_int("num_rows", num_rows, 1, "e.g. num_rows=1_000_000")
        self.dim = check_int("dim", dim, 1, "e.g. dim=64")
        self.clusters = check_int("clusters", clusters, 1, "e.g. clusters=1000")
        self.spread = float(spread)
        self.seed = check_int("seed", seed, 0, "e.g. seed=0")
        c = np.random.default_rng([self.seed, 2**31]).standard_normal((self.clusters, self.dim))
        self.centres = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)

    def _block(self, b: int) -> np.ndarray:
        n = min(self.BLOCK, self.num_rows - b * self.BLOCK)
        rng = np.random.default_rng([self.seed, b])
        z = rng.integers(0, self.clusters, n)
        x = self.centres[z] + rng.standard_normal((n, self.dim), dtype=np.float32) * np.float32(self.spread / math.sqrt(self.dim))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, int(start)), min(self.num_rows, int(stop))
        if stop <= start:
            return np.zeros((0, self.dim), np.float32)
        out = [self._block(b) for b in range(start // self.BLOCK, (stop - 1) // self.BLOCK + 1)]
        first = (start // self.BLOCK) * self.BLOCK
        return np.ascontiguousarray(np.concatenate(out)[start - first : stop - first], dtype=np.float32)


def _source(vectors_source: Any) -> Any:
    if isinstance(vectors_source, (str, os.PathLike)) or (
        isinstance(vectors_source, (list, tuple)) and vectors_source and all(isinstance(p, (str, os.PathLike)) for p in vectors_source)
    ):
        return NpyRows(vectors_source)
    if isinstance(vectors_source, np.ndarray) or hasattr(vectors_source, "detach"):
        return ArrayRows(vectors_source)
    if all(hasattr(vectors_source, a) for a in ("num_rows", "dim", "read")):
        n, d = vectors_source.num_rows, vectors_source.dim
        if not is_int(n) or n < 1 or not is_int(d) or d < 1:
            raise ValueError(f"vectors_source.num_rows and .dim must be integers >= 1, got num_rows={n!r}, dim={d!r}")
        return vectors_source
    raise TypeError(
        f"vectors_source must be a float array [N, D], .npy path(s) or a glob pattern, or an object with num_rows, "
        f"dim and read(start, stop); got {type(vectors_source).__name__}"
    )


# ------------------------------------------------------------------------------- index helpers


def default_factory(num_rows: int, dim: int) -> str:
    """``"IVF{nlist},PQ{m}"``: ``nlist = 4 sqrt(N)`` cells (at most ``N / 39``), ``m`` = the largest divisor of ``dim`` <= ``dim / 2``.

    Two dimensions per 8-bit sub-quantizer: ``m`` bytes of code per vector (plus the 8-byte id
    an IVF list stores), e.g. 32 + 8 = 40 bytes for a 64-d float vector of 256 bytes. Measured in
    docs/benchmarks.md ("Replica search at scale"): at 10M clustered 64-d rows, 32-byte codes
    found every replica, 16-byte codes (``dim / 4``) only 82% of them.

    Example:
        >>> default_factory(10_000_000, 64)
        'IVF12649,PQ32'
    """
    nlist = max(1, min(int(4 * math.sqrt(num_rows)), num_rows // 39))
    m = max(q for q in range(1, max(1, dim // 2) + 1) if dim % q == 0)
    return f"IVF{nlist},PQ{m}"


def _check_factory(index: Any, dim: int) -> str:
    if not isinstance(index, str) or not _FACTORY.match(index):
        raise ValueError(
            f"index must be a FAISS factory string 'Flat', 'IVF{{nlist}},Flat', 'IVF{{nlist}},PQ{{m}}[x{{nbits}}]' or "
            f"'IVF{{nlist}},SQ8', got {index!r}; e.g. index='IVF4096,PQ32' (default_factory(N, D) picks one)"
        )
    pq = re.search(r"PQ([0-9]+)", index)
    if pq and dim % int(pq.group(1)):
        raise ValueError(f"index={index!r}: PQ{pq.group(1)} needs the dimension {dim} to be a multiple of {pq.group(1)}; e.g. PQ{max(1, dim // 2)}")
    return index


def _ivf(index: Any) -> Any:
    faiss = import_faiss("ShardedReplicaIndex")
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    return faiss.downcast_index(ivf)  # the concrete class (IndexIVFPQ, ...), with its pq / sq


def _trained_digest(index: Any) -> str:
    """SHA-256 of what training fixed: the factory type, dimension, metric, IVF centroids and codebooks."""
    faiss = import_faiss("ShardedReplicaIndex")
    h = hashlib.sha256(f"{type(index).__name__}|{index.d}|{index.metric_type}".encode())
    ivf = _ivf(index)
    if ivf is not None:
        h.update(np.ascontiguousarray(ivf.quantizer.reconstruct_n(0, ivf.nlist)).tobytes())
        for attr, field in (("pq", "centroids"), ("sq", "trained")):
            sub = getattr(ivf, attr, None)
            if sub is not None:
                h.update(faiss.vector_to_array(getattr(sub, field)).tobytes())
    return h.hexdigest()


def _serialize(index: Any) -> bytes:
    return import_faiss("ShardedReplicaIndex").serialize_index(index).tobytes()


def _deserialize(data: bytes) -> Any:
    return import_faiss("ShardedReplicaIndex").deserialize_index(np.frombuffer(data, dtype=np.uint8))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def merge_topk(distances: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-``k`` results (global ids) into one top-``k`` per query.

    Best first: largest inner product (``"ip"``) or smallest squared distance (``"l2"``); ties
    go to the smaller id, so the merge does not depend on the order of the shards. Missing
    results (id ``-1``) sort last and stay ``-1``.

    Args:
        distances: one ``[Q, k_s]`` array per shard.
        ids: the matching global ids, ``int64 [Q, k_s]``.
        k: results to keep.
        metric: ``"ip"`` or ``"l2"``.

    Returns:
        ``(distances float32 [Q, k], ids int64 [Q, k])``.

    Example:
        >>> d, i = merge_topk([np.array([[0.9, 0.1]]), np.array([[0.5, 0.4]])],
        ...                   [np.array([[3, 1]]), np.array([[7, 8]])], k=3, metric="ip")
        >>> i.tolist(), [round(float(v), 2) for v in d[0]]
        ([[3, 7, 8]], [0.9, 0.5, 0.4])
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be 'ip' (inner product) or 'l2' (squared distance), got {metric!r}")
    k = check_int("k", k, 1, "e.g. k=10")
    d = np.concatenate([np.asarray(x, dtype=np.float32) for x in distances], axis=1)
    i = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids], axis=1)
    missing = i < 0
    key = -d.astype(np.float64) if metric == "ip" else d.astype(np.float64)
    key[missing] = np.inf
    tie = np.where(missing, np.iinfo(np.int64).max, i)
    order = np.lexsort((tie, key), axis=1)[:, :k] if d.size else np.zeros((d.shape[0], 0), np.int64)
    out_d = np.take_along_axis(d, order, axis=1)
    out_i = np.take_along_axis(i, order, axis=1)
    if out_i.shape[1] < k:  # fewer candidates than k in all shards together
        pad = k - out_i.shape[1]
        out_i = np.pad(out_i, ((0, 0), (0, pad)), constant_values=-1)
        out_d = np.pad(out_d, ((0, 0), (0, pad)), constant_values=np.nan)
    bad = out_i < 0
    out_d[bad] = -np.inf if metric == "ip" else np.inf
    return out_d.astype(np.float32), out_i


# ------------------------------------------------------------------------------- shard worker


def _build_shard(source: Any, lo: int, hi: int, offset: int, trained: bytes, path: str, chunk_size: int, report: Any) -> dict:
    """Add rows ``[lo, hi)`` of ``source`` (global ids from ``offset``) to the trained index; write it atomically."""
    index = _deserialize(trained)
    for s in range(lo, hi, chunk_size):
        e = min(hi, s + chunk_size)
        index.add(_as_rows(source.read(s, e), index.d, s, e, "vectors_source"))
        report(e - s)
    data = _serialize(index)
    atomic_write_bytes(path, data)
    return {"file": Path(path).name, "rows": int(index.ntotal), "offset": int(offset), "sha256": _sha256(data), "trained": _trained_digest(index)}


def _ray_shard_task(ray: Any) -> Any:
    @ray.remote(num_cpus=1)
    def shard_task(source, lo, hi, offset, trained, path, chunk_size, progress):  # type: ignore[no-untyped-def]
        def report(n: int) -> None:
            progress.add.remote(n)

        return _build_shard(source, lo, hi, offset, trained, path, chunk_size, report)

    return shard_task


def _ray_progress(ray: Any) -> Any:
    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self) -> None:
            self.done = 0

        def add(self, n: int) -> None:
            self.done += int(n)

        def total(self) -> int:
            return self.done

    return Progress.remote()


# ------------------------------------------------------------------------------------- the index


class ShardedReplicaIndex:
    """A reference set of embeddings split into FAISS shards that share one trained quantizer.

    Build with :meth:`build`, reopen with :meth:`load`; :meth:`search` returns global ids.

    Attributes:
        metric: ``"ip"`` or ``"l2"``.
        dim: embedding dimension.
        factory: the FAISS factory string (``"Flat"``, ``"IVF4096,PQ32"``, ...).
        shards: the loaded FAISS indexes, in id order.
        offsets: the global id of each shard's first row.
        manifest: the manifest dictionary (as written to ``manifest.json``).
    """

    def __init__(self, shards: list[Any], manifest: dict) -> None:
        self.shards = shards
        self.manifest = manifest
        self.metric = manifest["metric"]
        self.dim = int(manifest["dim"])
        self.factory = manifest["factory"]
        self.offsets = [int(s["offset"]) for s in manifest["shards"]]

    # ---------------------------------------------------------------------------- properties
    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def ntotal(self) -> int:
        return int(sum(s.ntotal for s in self.shards))

    def nbytes(self) -> int:
        """Serialized size of all shards (what the index takes on disk and, about, in memory)."""
        return int(sum(s["bytes"] for s in self.manifest["shards"]))

    def bytes_per_vector(self) -> float:
        """Bytes per stored vector, everything included (codes, ids, the quantizer replicated per shard)."""
        return self.nbytes() / max(1, self.ntotal)

    def __repr__(self) -> str:
        return f"ShardedReplicaIndex(factory={self.factory!r}, metric={self.metric!r}, dim={self.dim}, ntotal={self.ntotal}, num_shards={self.num_shards})"

    # ---------------------------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        vectors_source: Any,
        out_dir: str | os.PathLike,
        *,
        num_shards: int,
        index: str | None = None,
        metric: str = "ip",
        train_size: int | None = None,
        seed: int = 0,
        engine: str = "local",
        address: str | None = None,
        chunk_size: int = 65536,
        progress: bool = True,
    ) -> ShardedReplicaIndex:
        """Train once, add each shard's rows in a worker, write the shards and the manifest, return the index.

        Args:
            vectors_source: the reference embeddings (see the module docstring): an array
                ``[N, D]``, ``.npy`` path(s) / a glob, or an object with ``num_rows``, ``dim`` and
                ``read(start, stop)``.
            out_dir: directory for the shard files and ``manifest.json`` (created; must not
                already hold a manifest). With ``engine="ray"`` on a cluster it must be storage
                every node can write (a shared filesystem).
            num_shards: number of shards = workers, ``1 <= num_shards <= N``; shard ``s`` holds a
                contiguous range of about ``N / num_shards`` rows.
            index: FAISS factory string: ``"Flat"`` (exact), ``"IVF{nlist},Flat"``,
                ``"IVF{nlist},PQ{m}"`` (``m`` bytes per vector; ``x{nbits}`` optional) or
                ``"IVF{nlist},SQ8"``; default :func:`default_factory`.
            metric: ``"ip"`` (cosine on unit rows) or ``"l2"`` (squared distance).
            train_size: rows sampled (seeded, without replacement) to train the quantizer and
                codebooks; default ``min(N, max(64 * nlist, 9984))`` (FAISS wants >= 39 points
                per centroid). Ignored for ``"Flat"``.
            seed: seeds the training sample and FAISS' k-means.
            engine: ``"local"`` (shards built one after another in this process) or ``"ray"``
                (one Ray task per shard; ``pip install 'antimemo[ray]'``). Both write the same files.
            address: Ray cluster address (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``); ``None``
                uses this process's Ray session if ``ray.init`` was already called, else starts a
                private local one (shut down afterwards). Only with ``engine="ray"``.
            chunk_size: rows a worker reads and adds at a time (bounds its memory).
            progress: show a tqdm bar of rows added (Ray workers report to the driver).

        Returns:
            The built :class:`ShardedReplicaIndex` (shards loaded from the files written).

        Raises:
            ValueError: a bad argument (naming it and the fix), or a source that returns rows of
                the wrong shape or non-finite values.
            FileExistsError: ``out_dir`` already holds an index.
        """
        faiss = import_faiss("ShardedReplicaIndex.build")
        if engine not in ("local", "ray"):
            raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
        if address is not None and engine != "ray":
            raise ValueError(f"address={address!r} joins a Ray cluster, so it needs engine='ray' (got engine={engine!r})")
        if metric not in METRICS:
            raise ValueError(f"metric must be 'ip' (inner product; cosine on unit rows) or 'l2' (squared distance), got {metric!r}")
        src = _source(vectors_source)
        n, d = int(src.num_rows), int(src.dim)
        num_shards = check_int("num_shards", num_shards, 1, "e.g. num_shards=8 (one per worker)")
        if num_shards > n:
            raise ValueError(f"num_shards={num_shards} exceeds the {n} rows of vectors_source; use num_shards <= {n}")
        chunk_size = check_int("chunk_size", chunk_size, 1, "e.g. chunk_size=65536 rows")
        seed = check_int("seed", seed, 0, "e.g. seed=0")
        factory = _check_factory(default_factory(n, d) if index is None else index, d)
        out = Path(out_dir)
        if (out / MANIFEST).exists():
            raise FileExistsError(f"out_dir={str(out)!r} already holds an index ({MANIFEST}); choose an empty directory or delete it")
        out.mkdir(parents=True, exist_ok=True)

        fmetric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        trained_index = faiss.index_factory(d, factory, fmetric)
        ivf = _ivf(trained_index)
        used_train = 0
        if not trained_index.is_trained:
            nlist = int(ivf.nlist) if ivf is not None else 1
            need = max(nlist, 2 ** int(ivf.pq.nbits) if getattr(ivf, "pq", None) is not None else 1)
            if train_size is None:
                train_size = min(n, max(64 * nlist, 9984))
            train_size = check_int("train_size", train_size, 1, f"e.g. train_size={min(n, 64 * nlist)}")
            if train_size > n:
                raise ValueError(f"train_size={train_size} exceeds the {n} rows of vectors_source; use train_size <= {n}")
            if train_size < need:
                raise ValueError(
                    f"train_size={train_size} is too small for index={factory!r}: it needs at least {need} rows "
                    f"(one per IVF cell / PQ centroid), 39x that for good centroids; e.g. train_size={min(n, 64 * nlist)}"
                )
            if ivf is not None:
                ivf.cp.seed = seed
                if getattr(ivf, "pq", None) is not None:
                    ivf.pq.cp.seed = seed
                    # the factory turns on polysemous training (code reordering for Hamming filtering),
                    # which replica search does not use and which costs minutes on a small CPU
                    ivf.do_polysemous_training = False
            used_train = train_size
            sample = _sample(src, train_size, seed, chunk_size)
            t0 = time.perf_counter()
            trained_index.train(sample)
            del sample
            train_seconds = time.perf_counter() - t0
        else:
            train_seconds = 0.0
        trained = _serialize(trained_index)
        bounds = np.linspace(0, n, num_shards + 1).round().astype(np.int64)
        jobs = []
        for s in range(num_shards):
            lo, hi = int(bounds[s]), int(bounds[s + 1])
            part, plo, phi = (ArrayRows(src.array[lo:hi]), 0, hi - lo) if isinstance(src, ArrayRows) else (src, lo, hi)
            jobs.append((part, plo, phi, lo, str(out / f"shard-{s:05d}.faiss")))

        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"replica index: adding ({engine}, {num_shards} shards)", unit="row", disable=not progress)
        t0 = time.perf_counter()
        try:
            if engine == "local":
                results = [_build_shard(p, a, b, off, trained, path, chunk_size, bar.update) for p, a, b, off, path in jobs]
            else:
                results = _run_ray(jobs, trained, chunk_size, bar, address)
        finally:
            bar.close()
        add_seconds = time.perf_counter() - t0
        for r, data_path in zip(results, (j[4] for j in jobs)):
            r["bytes"] = int(Path(data_path).stat().st_size)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "metric": metric,
            "dim": d,
            "factory": factory,
            "ntotal": n,
            "seed": seed,
            "train_size": used_train,
            "engine": engine,
            "train_seconds": round(train_seconds, 3),
            "add_seconds": round(add_seconds, 3),
            "shards": results,
        }
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
        return cls.load(out)

    # --------------------------------------------------------------------------------- search
    def search(self, queries: Any, k: int = 10, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of every query over all shards, merged (:func:`merge_topk`).

        Args:
            queries: float ``[Q, D]`` (numpy or torch), embedded like the reference rows.
            k: neighbours per query.
            nprobe: IVF cells visited per shard for this search (IVF indexes only; ``None``:
                the shards' own value, FAISS' default 1). Higher is slower and closer to exact.

        Returns:
            ``(distances float32 [Q, k], ids int64 [Q, k])``, best first: inner products
            (``"ip"``) or squared distances (``"l2"``), global row ids (``-1``: none found).
        """
        if hasattr(queries, "detach"):
            queries = queries.detach().cpu().numpy()
        q = np.asarray(queries)
        if q.ndim != 2 or q.dtype.kind not in "fiu":
            raise ValueError(f"queries must be a float array [Q, {self.dim}], got shape {q.shape} dtype {q.dtype}")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have {q.shape[1]} dims but the index holds {self.dim}-d vectors; embed the queries like the reference rows")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.size and not np.isfinite(q).all():
            raise ValueError("queries hold NaN or inf values; clean the embeddings first")
        k = check_int("k", k, 1, "e.g. k=10")
        ivfs = [_ivf(s) for s in self.shards]
        if nprobe is not None:
            if any(v is None for v in ivfs):
                raise ValueError(f"nprobe={nprobe!r} applies to IVF indexes, but this index is {self.factory!r} (exact); drop nprobe")
            nprobe = check_int("nprobe", nprobe, 1, "e.g. nprobe=16")
        dists, ids = [], []
        for shard, ivf, offset in zip(self.shards, ivfs, self.offsets):
            kept = ivf.nprobe if ivf is not None else None
            if nprobe is not None:
                ivf.nprobe = min(nprobe, int(ivf.nlist))
            try:
                dd, ii = shard.search(q, min(k, int(shard.ntotal)))
            finally:
                if kept is not None:
                    ivf.nprobe = kept  # searching leaves the shard (and its saved bytes) unchanged
            dists.append(dd)
            ids.append(np.where(ii >= 0, ii + offset, -1))
        return merge_topk(dists, ids, k, self.metric)

    # ----------------------------------------------------------------------------- save / load
    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the shards and the manifest to ``out_dir`` (a new index directory); returns it."""
        out = Path(out_dir)
        if (out / MANIFEST).exists():
            raise FileExistsError(f"out_dir={str(out)!r} already holds an index ({MANIFEST}); choose an empty directory or delete it")
        out.mkdir(parents=True, exist_ok=True)
        entries = []
        for shard, entry in zip(self.shards, self.manifest["shards"]):
            data = _serialize(shard)
            atomic_write_bytes(out / entry["file"], data)
            entries.append({**entry, "sha256": _sha256(data), "bytes": len(data)})
        atomic_write_text(out / MANIFEST, json.dumps({**self.manifest, "shards": entries}, indent=1))
        return out

    @classmethod
    def load(cls, index_dir: str | os.PathLike) -> ShardedReplicaIndex:
        """Open an index written by :meth:`build` or :meth:`save`, checking every file first.

        Raises:
            CorruptShardError: no or unreadable manifest, a missing shard, a checksum mismatch
                (a modified or truncated file), or a shard whose dimension, metric, rows or
                trained codebooks disagree with the manifest (e.g. a shard from another index).
        """
        faiss = import_faiss("ShardedReplicaIndex.load")
        root = Path(index_dir)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise CorruptShardError(f"{str(root)!r} is not a sharded replica index: {MANIFEST} is missing (was the build interrupted?)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise CorruptShardError(f"{str(mpath)!r} is not valid JSON (truncated/corrupt): {err}") from err
        _check_manifest(manifest, mpath)
        fmetric = faiss.METRIC_INNER_PRODUCT if manifest["metric"] == "ip" else faiss.METRIC_L2
        shards, digests = [], set()
        expected_offset = 0
        for s, entry in enumerate(manifest["shards"]):
            path = root / entry["file"]
            if Path(entry["file"]).name != entry["file"] or not path.is_file():
                raise CorruptShardError(f"shard {s} file {entry['file']!r} is missing from {str(root)!r}")
            data = path.read_bytes()
            if _sha256(data) != entry["sha256"]:
                raise CorruptShardError(
                    f"shard {s} ({str(path)!r}) does not match its SHA-256 in {MANIFEST}: the file was modified or "
                    "truncated; rebuild the index or restore the file"
                )
            try:
                shard = _deserialize(data)
            except RuntimeError as err:  # pragma: no cover - the checksum catches corruption first
                raise CorruptShardError(f"shard {s} ({str(path)!r}) is not a FAISS index: {err}") from err
            problems = []
            if shard.d != manifest["dim"]:
                problems.append(f"dimension {shard.d} != {manifest['dim']}")
            if shard.metric_type != fmetric:
                problems.append(f"metric type {shard.metric_type} != {manifest['metric']!r}")
            if shard.ntotal != entry["rows"]:
                problems.append(f"{shard.ntotal} rows != {entry['rows']}")
            if entry["offset"] != expected_offset:
                problems.append(f"id offset {entry['offset']} != {expected_offset} (shards must cover the ids contiguously)")
            digest = _trained_digest(shard)
            if digest != entry["trained"]:
                problems.append("trained quantizer/codebooks differ from the manifest's")
            if problems:
                raise CorruptShardError(f"shard {s} ({str(path)!r}) does not fit the manifest: " + "; ".join(problems))
            digests.add(digest)
            expected_offset += int(entry["rows"])
            shards.append(shard)
        if len(digests) != 1:
            raise CorruptShardError(
                f"the shards of {str(root)!r} were trained separately (different quantizers/codebooks), so their distances "
                "are not comparable; rebuild with ShardedReplicaIndex.build, which trains once for all shards"
            )
        if expected_offset != manifest["ntotal"]:
            raise CorruptShardError(f"the shards hold {expected_offset} rows but {MANIFEST} says ntotal={manifest['ntotal']}")
        return cls(shards, manifest)


def _check_manifest(m: Any, path: Path) -> None:
    def bad(why: str) -> CorruptShardError:
        return CorruptShardError(f"{str(path)!r} is not a valid sharded replica index manifest: {why}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise bad(f"format is not {FORMAT!r}")
    if m.get("version") != VERSION:
        raise bad(f"version {m.get('version')!r} is not {VERSION} (written by another antimemo version?)")
    if m.get("metric") not in METRICS:
        raise bad(f"metric {m.get('metric')!r} is not 'ip' or 'l2'")
    if not is_int(m.get("dim")) or m["dim"] < 1 or not is_int(m.get("ntotal")):
        raise bad("dim / ntotal are not integers")
    if not isinstance(m.get("factory"), str) or not _FACTORY.match(m["factory"]):
        raise bad(f"factory {m.get('factory')!r} is not a supported FAISS factory string")
    shards = m.get("shards")
    keys = {"file": str, "rows": int, "offset": int, "sha256": str, "trained": str, "bytes": int}
    if not isinstance(shards, list) or not shards:
        raise bad("no shards listed")
    for s in shards:
        if not isinstance(s, dict) or any(not isinstance(s.get(k), t) or isinstance(s.get(k), bool) for k, t in keys.items()):
            raise bad(f"a shard entry lacks one of {sorted(keys)} or has a wrong type: {s!r}")


def _sample(src: Any, size: int, seed: int, chunk_size: int) -> np.ndarray:
    """``size`` distinct rows drawn with ``default_rng(seed)``, in row order (reads only the chunks that hold them)."""
    n = int(src.num_rows)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)) if size < n else np.arange(n)
    if hasattr(src, "take"):
        return _as_rows(src.take(rows), int(src.dim), 0, size, "vectors_source")
    out = np.empty((size, int(src.dim)), np.float32)
    pos = 0
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        a, b = np.searchsorted(rows, [s, e])
        if b > a:
            block = _as_rows(src.read(s, e), int(src.dim), s, e, "vectors_source")
            out[pos : pos + b - a] = block[rows[a:b] - s]
            pos += b - a
    return out


def _run_ray(jobs: list, trained: bytes, chunk_size: int, bar: Any, address: str | None) -> list[dict]:
    from antimemo._extras import require

    ray = require("ray", "ShardedReplicaIndex.build(engine='ray')")
    started = False
    if not ray.is_initialized():
        try:
            # address=None starts a private local Ray instance ("local"), never one another job left running
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            if address is None:
                raise
            raise ConnectionError(
                f"could not join the Ray cluster at address={address!r}: {err}; start it with `ray start --head` on the "
                "head node, or check the address (auto, HOST:6379, ray://HOST:10001)"
            ) from err
        started = True
    try:
        task = _ray_shard_task(ray)
        progress = _ray_progress(ray)
        trained_ref = ray.put(trained)
        futures = [task.remote(p, a, b, off, trained_ref, path, chunk_size, progress) for p, a, b, off, path in jobs]
        pending = list(futures)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            bar.update(ray.get(progress.total.remote()) - bar.n)
        results = ray.get(futures)
        bar.update(ray.get(progress.total.remote()) - bar.n)
        ray.kill(progress)
        return results
    finally:
        if started:
            ray.shutdown()
