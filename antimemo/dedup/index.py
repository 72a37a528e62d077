"""``DuplicateIndex``: duplicate clusters of a dataset, built from texts, token ids or images.

Text and token ids (:meth:`DuplicateIndex.from_texts`, :meth:`DuplicateIndex.from_token_ids`):

1. one streaming pass over the data in chunks (optionally in ``num_workers`` processes), from a
   sequence or a one-pass iterable: per example a content hash (BLAKE2b-64 of the raw bytes, for
   the fingerprint), a 128-bit exact-duplicate key (two polynomial folds of the normalised words'
   or tokens' hashes) and the LSH band keys of its MinHash signature
   (:mod:`antimemo.dedup.minhash`); the arrays kept per example take ``8 * bands + 32`` bytes
   (160 with the defaults) in flat numpy arrays, the signatures themselves are dropped after each
   chunk;
2. exact duplicates are grouped; one representative per group enters LSH;
3. representatives sharing a band key are candidates (buckets kept as two flat arrays); a second
   pass computes the shingle sets of the candidates only (one flat ``uint64`` array: 8 bytes per
   shingle of a candidate), and a candidate pair is merged
   when its exact Jaccard similarity (on 64-bit shingle hashes) is at least ``threshold``; pairs
   already connected are not compared again;
4. clusters are the connected components (union-find) of exact groups and verified pairs.

Images (:meth:`DuplicateIndex.from_images`): cosine similarity of embeddings through FAISS, see
:mod:`antimemo.dedup.images`.

The result is deterministic given the data and the parameters (``seed`` fixes the permutations);
``num_workers`` changes only the speed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from antimemo._checks import check_int
from antimemo.dedup.minhash import ShingleConfig, shingle_sets_chunk, sketch_chunk
from antimemo.dedup.normalize import content_hash, fingerprint, token_array

__all__ = ["CorruptIndexError", "DuplicateIndex", "dataset_content_hashes"]

#: Format tag of the files :meth:`DuplicateIndex.save` writes (``/2`` adds the integrity digests).
FORMAT = "antimemo.dedup.DuplicateIndex/2"
#: Format tag of the files written before the integrity digests (refused by :meth:`DuplicateIndex.load`).
OLD_FORMATS = ("antimemo.dedup.DuplicateIndex/1",)
KINDS = ("text", "tokens", "images", "custom")
INTEGRITY = "antimemo.dedup.integrity/1"
_REBUILD = (
    "rebuild it: `antimemo dedup <data> --out <path>` or "
    "`DuplicateIndex.from_texts(...)` / `from_token_ids(...)` / `from_images(...)` then `.save(path)`"
)


class CorruptIndexError(ValueError):
    """A :class:`DuplicateIndex` file that cannot be trusted: truncated, corrupt, edited, or not an index.

    The message starts with ``not a valid antimemo index (<reason>): <path>`` and says how to
    rebuild the file.

    Example:
        >>> issubclass(CorruptIndexError, ValueError)
        True
    """


def _corrupt(path: Path, reason: str, detail: str = "") -> CorruptIndexError:
    tail = f"; {detail}" if detail else ""
    return CorruptIndexError(f"not a valid antimemo index ({reason}): {str(path)!r}{tail}; {_REBUILD}")


def _array_digest(name: str, array: np.ndarray) -> str:
    """SHA-256 (hex) of one stored array: its name, dtype, shape and bytes (C order)."""
    h = hashlib.sha256()
    h.update(f"{INTEGRITY}\0{name}\0{array.dtype.str}\0{list(array.shape)}\0".encode())
    h.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return h.hexdigest()


def _integrity_record(arrays: dict[str, np.ndarray]) -> dict:
    """The integrity record saved with an index: per array (sorted by name) dtype, shape, SHA-256."""
    return {
        "scheme": INTEGRITY,
        "arrays": {
            name: {"dtype": arrays[name].dtype.str, "shape": list(arrays[name].shape), "sha256": _array_digest(name, arrays[name])}
            for name in sorted(arrays)
        },
    }


def _is_sequence(items: Any) -> bool:
    return hasattr(items, "__len__") and hasattr(items, "__getitem__") and not isinstance(items, (str, bytes))


def _check_sequence(items: Any, name: str) -> int:
    if not _is_sequence(items):
        raise TypeError(
            f"{name} must be a sequence with len() and indexing (list, tuple, array, dataset column), "
            f"got {type(items).__name__}; wrap an iterator with list(...)"
        )
    n = len(items)
    if n == 0:
        raise ValueError(f"{name} is empty: a duplicate index needs at least one example")
    return n


class _SequenceSource:
    """Random-access items (list, array, dataset column): read in chunks, candidates re-read by index."""

    def __init__(self, items: Any, name: str) -> None:
        self.items = items
        self.n: int | None = _check_sequence(items, name)

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, list]]:
        for s in range(0, self.n, chunk_size):
            yield s, _take(self.items, s, min(self.n, s + chunk_size))

    def take(self, idx: np.ndarray) -> list:
        return _take_indices(self.items, idx)

    def close(self) -> None:
        pass


class _StreamSource:
    """A one-pass iterable (generator, file reader): read once in chunks of ``chunk_size`` items.

    The raw bytes of every item (UTF-8 of a text, ``int64`` of a token sequence) are appended to a
    temporary file as they pass, so the verification pass can re-read the LSH candidates without
    iterating the source again; memory holds one chunk plus 8 bytes of file offset per item.
    """

    def __init__(self, items: Any, name: str, kind: str, spill_dir: str | os.PathLike | None) -> None:
        import tempfile

        self.name, self.kind = name, kind
        self._it = iter(items)
        self._tmp = tempfile.TemporaryDirectory(prefix="antimemo-dedup-", dir=spill_dir)
        self._file = open(os.path.join(self._tmp.name, "items.bin"), "w+b")  # noqa: SIM115 (closed in close())
        self._ends: list[np.ndarray] = []
        self._pos = 0
        self.n: int | None = None

    def _encode(self, item: Any, i: int) -> tuple[Any, bytes]:
        if self.kind == "text":
            if not isinstance(item, str):
                raise TypeError(
                    f"{self.name}[{i}] must be a str, got {type(item).__name__}; for token ids use "
                    "DuplicateIndex.from_token_ids(seqs)"
                )
            return item, item.encode("utf-8", "surrogatepass")
        arr = token_array(item, where=f"{self.name}[{i}]")
        return arr, arr.astype("<i8", copy=False).tobytes()

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, list]]:
        from itertools import islice

        base = 0
        while True:
            raw = list(islice(self._it, chunk_size))
            if not raw:
                break
            pairs = [self._encode(x, base + i) for i, x in enumerate(raw)]
            del raw
            sizes = np.fromiter((len(b) for _, b in pairs), dtype=np.int64, count=len(pairs))
            self._file.write(b"".join(b for _, b in pairs))
            self._ends.append(self._pos + np.cumsum(sizes))
            self._pos += int(sizes.sum())
            items = [x for x, _ in pairs]
            del pairs
            yield base, items
            base += len(items)
        self.n = base
        if base == 0:
            raise ValueError(f"{self.name} is empty: a duplicate index needs at least one example")
        self._file.flush()

    def take(self, idx: np.ndarray) -> list:
        ends = np.concatenate(self._ends) if len(self._ends) != 1 else self._ends[0]
        self._ends = [ends]
        f = self._file
        out = []
        for i in idx.tolist():
            start = int(ends[i - 1]) if i else 0
            f.seek(start)
            data = f.read(int(ends[i]) - start)
            if self.kind == "text":
                out.append(data.decode("utf-8", "surrogatepass"))
            else:
                out.append(np.frombuffer(data, dtype="<i8").astype(np.int64))
        return out

    def close(self) -> None:
        self._file.close()
        self._tmp.cleanup()


def _source(items: Any, name: str, kind: str, spill_dir: str | os.PathLike | None) -> _SequenceSource | _StreamSource:
    if _is_sequence(items):
        return _SequenceSource(items, name)
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(
            f"{name} must be a sequence (list, tuple, array, dataset column) or an iterable of "
            f"{'str' if kind == 'text' else 'token sequences'} (e.g. a generator reading a file), got "
            f"{type(items).__name__}"
        )
    return _StreamSource(items, name, kind, spill_dir)


def _take(items: Any, start: int, end: int) -> list:
    if isinstance(items, (list, tuple)):
        return list(items[start:end])
    if hasattr(items, "detach") and getattr(items, "ndim", 0) == 2:  # a 2-D tensor of token rows
        return list(items[start:end].detach().cpu().numpy())
    if isinstance(items, np.ndarray) and items.ndim == 2:
        return list(items[start:end])
    return [items[i] for i in range(start, end)]


def _take_indices(items: Any, idx: np.ndarray) -> list:
    return [items[int(i)] for i in idx]


def _map_chunks(
    fn: Callable[..., Any],
    jobs: Iterator[tuple],
    pool: ProcessPoolExecutor | None,
    num_workers: int,
) -> Iterator[Any]:
    """Run ``fn(*job)`` for each job, in order; at most ``2 * num_workers`` jobs in flight."""
    if pool is None:
        for job in jobs:
            yield fn(*job)
        return
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(fn, *job))
        if len(pending) >= 2 * num_workers:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _jaccard(x: np.ndarray, y: np.ndarray) -> float:
    inter = np.intersect1d(x, y, assume_unique=True).shape[0]
    union = x.shape[0] + y.shape[0] - inter
    return inter / union if union else 1.0


def sketch_params(kind: str, cfg: ShingleConfig, threshold: float, lsh_weights: tuple[float, float]) -> dict:
    """The build parameters a MinHash index records in :attr:`DuplicateIndex.params` (any engine).

    Args:
        kind: ``"text"`` or ``"tokens"``.
        cfg: the shingling and LSH parameters.
        threshold: the Jaccard threshold.
        lsh_weights: the ``(false_positive, false_negative)`` weights.

    Returns:
        A JSON-serialisable dict (engines add ``"stats"`` and their own keys).

    Example:
        >>> sketch_params("text", ShingleConfig(5, 128, 0, 16, 8), 0.8, (0.05, 0.95))["scheme"]
        'affine32'
    """
    return {
        "ngram": cfg.ngram,
        "num_perm": cfg.num_perm,
        "threshold": float(threshold),
        "lsh_weights": [float(w) for w in lsh_weights],
        "bands": cfg.bands,
        "rows": cfg.rows,
        "seed": cfg.seed,
        "scheme": "affine32",
        "normalization": "NFKC+casefold+whitespace" if kind == "text" else "none",
    }


def dataset_content_hashes(kind: str, items: Any, progress: bool = False) -> np.ndarray:
    """Per-example content hashes of a dataset, as :class:`DuplicateIndex` computes them.

    Args:
        kind: ``"text"`` (UTF-8 of the raw text), ``"tokens"`` (``int64`` little-endian bytes) or
            ``"images"`` (shape and ``float32`` pixels).
        items: a sequence of texts, token sequences or ``[C, H, W]`` float tensors.
        progress: show a tqdm progress bar.

    Returns:
        ``uint64 [N]``; their :func:`~antimemo.dedup.normalize.fingerprint` identifies the dataset.

    Example:
        >>> dataset_content_hashes("text", ["a", "a"]).tolist()[0] == content_hash(b"a")
        True
    """
    from tqdm.auto import tqdm

    n = len(items)
    out = np.empty(n, dtype=np.uint64)
    if kind == "images":
        from antimemo.dedup.images import image_content_hash

        fn: Callable[[Any, int], int] = lambda x, i: image_content_hash(x)  # noqa: E731
    elif kind == "text":

        def fn(x: Any, i: int) -> int:
            if not isinstance(x, str):
                raise TypeError(f"item {i} must be a str for a text index, got {type(x).__name__}")
            return content_hash(x.encode("utf-8", "surrogatepass"))

    elif kind == "tokens":
        fn = lambda x, i: content_hash(token_array(x, f"item {i}").astype("<i8", copy=False).tobytes())  # noqa: E731
    else:
        raise ValueError(f"kind must be 'text', 'tokens' or 'images', got {kind!r}")
    for i in tqdm(range(n), desc="dedup: hashing dataset", unit="ex", disable=not progress):
        out[i] = fn(items[i], i)
    return out


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, read with ``allow_pickle=False``; any parse failure is a
    :class:`CorruptIndexError`."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (PermissionError, FileNotFoundError, MemoryError):
        raise
    except Exception as err:  # BadZipFile, EOFError, ValueError (pickle / bad header), OSError, ...
        if isinstance(err, ValueError) and "pickle" in str(err):  # neither .npz nor .npy: numpy would unpickle
            detail = "it is not an .npz archive (numpy would read it as a pickle, which DuplicateIndex.load never does)"
        else:
            detail = f"{type(err).__name__}: {err}"
        raise _corrupt(path, "truncated/corrupt", detail) from err
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a lone .npy array
        raise _corrupt(path, "truncated/corrupt", "it is a single .npy array, not an .npz archive")
    arrays: dict[str, np.ndarray] = {}
    with loaded as z:
        for name in z.files:
            try:
                arrays[name] = z[name]
            except ValueError as err:
                if "allow_pickle" in str(err) or "pickled" in str(err):
                    raise _corrupt(
                        path, "truncated/corrupt",
                        f"array {name!r} contains pickled Python objects, which DuplicateIndex.load never unpickles",
                    ) from err
                raise _corrupt(path, "truncated/corrupt", f"array {name!r}: {type(err).__name__}: {err}") from err
            except MemoryError:
                raise
            except Exception as err:  # BadZipFile (bad CRC), EOFError, zlib.error, OSError ...
                raise _corrupt(path, "truncated/corrupt", f"array {name!r}: {type(err).__name__}: {err}") from err
    return arrays


def _verify_integrity(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Check every array against the file's integrity record; raise naming what differs."""
    raw = arrays["integrity"]
    try:
        record = json.loads(str(raw[()])) if raw.dtype.kind == "U" and raw.shape == () else None
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or record.get("scheme") != INTEGRITY or not isinstance(record.get("arrays"), dict):
        raise _corrupt(path, "bad integrity record", "the 'integrity' array is not a JSON integrity record")
    expected = record["arrays"]
    stored = {k: v for k, v in arrays.items() if k != "integrity"}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        raise _corrupt(
            path, "modified after it was saved",
            (f"missing arrays {missing}" if missing else "") + (" and " if missing and extra else "")
            + (f"unexpected arrays {extra}" if extra else ""),
        )
    bad = []
    for name in sorted(stored):
        entry = expected[name]
        a = stored[name]
        if not isinstance(entry, dict) or entry.get("sha256") != _array_digest(name, a):
            bad.append(name)
    if bad:
        raise _corrupt(
            path, "modified after it was saved",
            f"array(s) {bad} do not match their SHA-256 integrity digest (edited, or damaged on disk)",
        )


class DuplicateIndex:
    """Duplicate clusters of a dataset: ``cluster_ids[i] == cluster_ids[j]`` means ``i``, ``j`` are duplicates.

    Build it with :meth:`from_texts`, :meth:`from_token_ids` or :meth:`from_images`, or wrap
    cluster ids computed elsewhere with the constructor. Cluster ids are canonical: ``0, 1, ...``
    in the order of each cluster's first example, so cluster 0 holds example 0.

    Args:
        cluster_ids: one integer label per example (relabelled canonically).
        content_hashes: optional ``uint64`` content hash per example; gives the index a
            :attr:`fingerprint` so that it can be checked against a dataset.
        kind: ``"text"``, ``"tokens"``, ``"images"`` or ``"custom"``.
        params: the build parameters (stored in the saved file).

    Example:
        >>> idx = DuplicateIndex.from_texts(["a b c", "A  b C", "x y z"], progress=False)
        >>> idx.cluster_ids.tolist(), idx.cluster_sizes.tolist()
        ([0, 0, 1], [2, 1])
        >>> round(idx.duplicate_fraction, 3)
        0.333
    """

    def __init__(
        self,
        cluster_ids: Any,
        content_hashes: Any = None,
        kind: str = "custom",
        params: dict | None = None,
    ) -> None:
        labels = np.asarray(cluster_ids)
        if labels.ndim != 1 or labels.shape[0] == 0 or labels.dtype.kind not in "iu":
            raise ValueError(
                "cluster_ids must be a non-empty 1-D integer array (one cluster label per example), "
                f"got shape {labels.shape} and dtype {labels.dtype}"
            )
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        from antimemo.dedup.clusters import canonical_cluster_ids

        self._cluster_ids = canonical_cluster_ids(labels)
        self._cluster_ids.setflags(write=False)
        self._sizes = np.bincount(self._cluster_ids).astype(np.int64)
        self._sizes.setflags(write=False)
        if content_hashes is not None:
            ch = np.asarray(content_hashes, dtype=np.uint64)
            if ch.shape != labels.shape:
                raise ValueError(
                    f"content_hashes must have one entry per example ({labels.shape[0]}), got shape {ch.shape}"
                )
            ch = ch.copy()
            ch.setflags(write=False)
            self._content = ch
            self._fingerprint: str | None = fingerprint(ch)
        else:
            self._content = None
            self._fingerprint = None
        self.kind = kind
        self.params = dict(params or {})

    # ------------------------------------------------------------------ attributes
    @property
    def cluster_ids(self) -> np.ndarray:
        """``int64 [N]`` canonical cluster id per example (read-only)."""
        return self._cluster_ids

    @property
    def cluster_sizes(self) -> np.ndarray:
        """``int64 [num_clusters]``: ``cluster_sizes[c]`` is the number of examples in cluster ``c``."""
        return self._sizes

    @property
    def content_hashes(self) -> np.ndarray | None:
        """``uint64 [N]`` content hash per example, or ``None`` for an index without fingerprint."""
        return self._content

    @property
    def fingerprint(self) -> str | None:
        """Hex fingerprint of the dataset the index was built from (``None`` if unknown)."""
        return self._fingerprint

    @property
    def num_examples(self) -> int:
        """Number of examples ``N``."""
        return int(self._cluster_ids.shape[0])

    @property
    def num_clusters(self) -> int:
        """Number of clusters (examples left after keeping one per cluster)."""
        return int(self._sizes.shape[0])

    @property
    def duplicate_fraction(self) -> float:
        """``(N - num_clusters) / N``: the fraction of examples that are extra copies."""
        return (self.num_examples - self.num_clusters) / self.num_examples

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (
            f"DuplicateIndex(kind={self.kind!r}, examples={self.num_examples}, clusters={self.num_clusters}, "
            f"duplicate_fraction={self.duplicate_fraction:.4f})"
        )

    def example_weights(self) -> np.ndarray:
        """``1 / cluster_size`` per example: each cluster's weights sum to one.

        Returns:
            ``float64 [N]``.

        Example:
            >>> DuplicateIndex([0, 0, 1]).example_weights().tolist()
            [0.5, 0.5, 1.0]
        """
        return 1.0 / self._sizes[self._cluster_ids]

    def members(self, cluster: int) -> np.ndarray:
        """Indices of the examples of one cluster, ascending.

        Args:
            cluster: a cluster id.

        Returns:
            ``int64`` array.

        Example:
            >>> DuplicateIndex([5, 7, 5]).members(0).tolist()
            [0, 2]
        """
        return np.flatnonzero(self._cluster_ids == cluster)

    def summary(self, top_k: int = 5) -> dict:
        """Summary statistics.

        Args:
            top_k: number of largest clusters to list.

        Returns:
            ``{"kind", "examples", "clusters", "duplicate_fraction", "examples_in_duplicate_clusters",
            "largest_clusters": [{"cluster", "size", "first_examples"}], "fingerprint"}``; the
            largest clusters are sorted by size, then by cluster id.

        Example:
            >>> DuplicateIndex([0, 1, 0, 0]).summary(top_k=1)["largest_clusters"]
            [{'cluster': 0, 'size': 3, 'first_examples': [0, 2, 3]}]
        """
        order = np.lexsort((np.arange(self.num_clusters), -self._sizes))[:top_k]
        largest = []
        for c in order.tolist():
            if self._sizes[c] < 2 and largest:
                break
            largest.append(
                {"cluster": int(c), "size": int(self._sizes[c]), "first_examples": self.members(c)[:5].tolist()}
            )
        return {
            "kind": self.kind,
            "examples": self.num_examples,
            "clusters": self.num_clusters,
            "duplicate_fraction": self.duplicate_fraction,
            "examples_in_duplicate_clusters": int(self._sizes[self._sizes > 1].sum()),
            "largest_clusters": largest,
            "fingerprint": self._fingerprint,
        }

    def format_summary(self, top_k: int = 5) -> str:
        """The :meth:`summary` as text lines (what ``antimemo dedup`` prints).

        Args:
            top_k: number of largest clusters to list.

        Returns:
            A multi-line string.

        Example:
            >>> print(DuplicateIndex([0, 0, 1]).format_summary().splitlines()[1])
            examples: 3
        """
        s = self.summary(top_k)
        lines = [
            f"kind: {s['kind']}",
            f"examples: {s['examples']}",
            f"clusters: {s['clusters']}",
            f"duplicate fraction: {s['duplicate_fraction']:.4f} "
            f"({s['examples'] - s['clusters']} extra copies; {s['examples_in_duplicate_clusters']} examples "
            "in clusters of size >= 2)",
            "largest clusters:",
        ]
        for c in s["largest_clusters"]:
            lines.append(f"  cluster {c['cluster']}: size {c['size']}, examples {c['first_examples']}")
        lines.append(f"fingerprint: {s['fingerprint']}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ dataset check
    def check_matches(self, content_hashes: Any, what: str = "the dataset") -> None:
        """Raise a ValueError if the index was not built from a dataset with these content hashes.

        Args:
            content_hashes: ``uint64 [M]`` from :func:`dataset_content_hashes` (or ``None`` to
                check nothing but the presence of a fingerprint).
            what: how the dataset is named in the error.

        Raises:
            ValueError: on a length mismatch or a fingerprint mismatch (naming the first differing
                example).

        Example:
            >>> idx = DuplicateIndex.from_texts(["a", "b"], progress=False)
            >>> idx.check_matches(dataset_content_hashes("text", ["a", "b"]))
        """
        ch = np.asarray(content_hashes, dtype=np.uint64)
        if ch.shape[0] != self.num_examples:
            raise ValueError(
                f"the DuplicateIndex has {self.num_examples} examples but {what} has {ch.shape[0]}: the index "
                "was built from other data; rebuild it from this dataset (or pass index=None to DedupSampling "
                "to build it at fit start)"
            )
        if self._content is None:
            raise ValueError(
                "this DuplicateIndex has no content hashes, so its fingerprint cannot be checked; build it with "
                "DuplicateIndex.from_texts/from_token_ids/from_images, or skip the check (DedupSampling("
                "check_fingerprint=False) checks only the length)"
            )
        if fingerprint(ch) != self._fingerprint:
            first = int(np.flatnonzero(ch != self._content)[0])
            raise ValueError(
                f"the DuplicateIndex (kind={self.kind!r}, fingerprint {self._fingerprint}) does not match {what} "
                f"(fingerprint {fingerprint(ch)}): example {first} differs (same length {self.num_examples}); "
                "rebuild the index from this dataset in this order"
            )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to ``path`` as an uncompressed ``.npz`` (no pickle; metadata as JSON).

        The file holds ``cluster_ids`` (``<i8``), ``content_hashes`` (``<u8``, when known),
        ``metadata`` (a JSON string) and ``integrity`` (a JSON string: the SHA-256 of every other
        array's name, dtype, shape and bytes), which :meth:`load` verifies. The write is atomic:
        a temporary file in the same directory, ``fsync``-ed, then renamed over ``path``, so a
        failed save (disk full, killed process) leaves the previous file intact.

        Args:
            path: file path (parent directories are created; no suffix is added).

        Returns:
            The path written.

        Raises:
            IsADirectoryError: ``path`` is an existing directory.

        Example:
            >>> import tempfile, os
            >>> p = DuplicateIndex([0, 0, 1]).save(os.path.join(tempfile.mkdtemp(), "idx.npz"))
            >>> DuplicateIndex.load(p).cluster_sizes.tolist()
            [2, 1]
        """
        from antimemo import __version__

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "kind": self.kind,
            "num_examples": self.num_examples,
            "fingerprint": self._fingerprint,
            "params": self.params,
            "antimemo_version": __version__,
        }
        arrays: dict[str, np.ndarray] = {
            "cluster_ids": np.asarray(self._cluster_ids, dtype="<i8"),
            "metadata": np.array(json.dumps(meta, sort_keys=True)),
        }
        if self._content is not None:
            arrays["content_hashes"] = np.asarray(self._content, dtype="<u8")
        arrays["integrity"] = np.array(json.dumps(_integrity_record(arrays), sort_keys=True))
        from antimemo._atomic import atomic_open

        with atomic_open(path, "wb") as f:  # temp file + fsync + rename: a failed save keeps the old file
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DuplicateIndex:
        """Read an index written by :meth:`save` (``np.load(allow_pickle=False)``: never unpickles).

        Every array is checked against the file's integrity record (SHA-256 of its name, dtype,
        shape and bytes), then the metadata against the arrays (format, kind, length,
        fingerprint). Files written before the integrity record existed (format
        ``antimemo.dedup.DuplicateIndex/1``) are refused: rebuild them.

        Args:
            path: the file.

        Returns:
            The index.

        Raises:
            FileNotFoundError: no file at ``path``.
            CorruptIndexError: (a ``ValueError``) the file is truncated or corrupt, is not an
                antimemo index, holds pickled objects, was modified after it was saved (an
                array does not match its digest), or has arrays of the wrong dtype or shape.

        Example:
            >>> import tempfile, os
            >>> p = DuplicateIndex([3, 3]).save(os.path.join(tempfile.mkdtemp(), "i.npz"))
            >>> len(DuplicateIndex.load(p))
            2
        """
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(
                f"{str(path)!r} is a directory, not a DuplicateIndex file; pass the path of the .npz file "
                "written by index.save(path) or `antimemo dedup ... --out`"
            )
        if not path.is_file():
            raise FileNotFoundError(f"no DuplicateIndex file at {str(path)!r}; write one with index.save(path)")
        arrays = _read_arrays(path)
        required = {"cluster_ids", "metadata"}
        if not required <= set(arrays):
            raise _corrupt(
                path, "not a DuplicateIndex file",
                f"it holds the arrays {sorted(arrays)}, expected 'cluster_ids', 'metadata' and 'integrity'",
            )
        meta_arr = arrays["metadata"]
        if meta_arr.dtype.kind != "U" or meta_arr.shape != ():
            raise _corrupt(path, "bad metadata", f"'metadata' must be a JSON string, got dtype {meta_arr.dtype} shape {meta_arr.shape}")
        try:
            meta = json.loads(str(meta_arr[()]))
        except json.JSONDecodeError:
            meta = None
        if "integrity" not in arrays:
            fmt = meta.get("format") if isinstance(meta, dict) else None
            if fmt in OLD_FORMATS:
                raise _corrupt(
                    path, f"format {fmt!r} has no integrity digest",
                    "it was written by an older antimemo and cannot be checked for edits, so it is refused",
                )
            raise _corrupt(path, "no integrity record", "the 'integrity' array is missing (the file was modified)")
        _verify_integrity(path, arrays)
        if not isinstance(meta, dict):
            raise _corrupt(path, "bad metadata", "'metadata' is not a JSON object")
        if meta.get("format") != FORMAT:
            raise _corrupt(path, "unknown format", f"format {meta.get('format')!r}, expected {FORMAT!r}")
        cluster_ids = arrays["cluster_ids"]
        if cluster_ids.dtype != np.dtype("<i8") or cluster_ids.ndim != 1 or cluster_ids.shape[0] == 0:
            raise _corrupt(
                path, "bad cluster_ids",
                f"'cluster_ids' must be a non-empty 1-D int64 array, got dtype {cluster_ids.dtype} shape {cluster_ids.shape}",
            )
        content = arrays.get("content_hashes")
        if content is not None and (content.dtype != np.dtype("<u8") or content.shape != cluster_ids.shape):
            raise _corrupt(
                path, "bad content_hashes",
                f"'content_hashes' must be uint64 with one entry per example {cluster_ids.shape}, got dtype "
                f"{content.dtype} shape {content.shape}",
            )
        if meta.get("kind") not in KINDS:
            raise _corrupt(path, "bad metadata", f"kind {meta.get('kind')!r} is not one of {KINDS}")
        if cluster_ids.min() < 0:
            raise _corrupt(path, "bad cluster_ids", f"cluster id {int(cluster_ids.min())} is negative")
        params = meta.get("params")
        idx = cls(cluster_ids, content, kind=meta["kind"], params=params if isinstance(params, dict) else None)
        if idx.fingerprint != meta.get("fingerprint") or idx.num_examples != meta.get("num_examples"):
            raise _corrupt(
                path, "metadata does not match the arrays",
                f"its metadata says {meta.get('num_examples')} examples with fingerprint {meta.get('fingerprint')} "
                f"but the arrays give {idx.num_examples} and {idx.fingerprint}",
            )
        return idx

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        *,
        ngram: int = 5,
        num_perm: int = 128,
        threshold: float = 0.8,
        lsh_weights: tuple[float, float] = (0.05, 0.95),
        seed: int = 0,
        chunk_size: int = 2048,
        num_workers: int = 1,
        progress: bool = True,
        spill_dir: str | os.PathLike | None = None,
    ) -> DuplicateIndex:
        """Index a list of texts: exact duplicates after normalisation plus MinHash-LSH near duplicates.

        Args:
            texts: a sequence of ``str`` (``len`` and indexing: read once in chunks, then the LSH
                candidates by index), or any iterable of ``str`` such as a generator reading files
                (consumed once, ``chunk_size`` texts at a time; the texts pass through a temporary
                file in ``spill_dir`` so the candidates can be re-read). Either way the result is
                the same, and memory does not hold the whole corpus.
            ngram: words per shingle (5 as in Lee et al. 2022).
            num_perm: MinHash permutations.
            threshold: Jaccard similarity of shingle sets at or above which two texts are near
                duplicates.
            lsh_weights: ``(false_positive, false_negative)`` weights for choosing bands and rows
                (:func:`antimemo.dedup.lsh.optimal_params`).
            seed: seed of the MinHash permutations.
            chunk_size: texts per chunk (bounds the memory of one step).
            num_workers: processes (spawned) for the chunked passes; the result does not depend on it.
            progress: show tqdm progress bars.
            spill_dir: existing directory for the temporary file of a one-pass iterable (``None``:
                the system temporary directory); unused for a sequence. The file takes the
                texts' UTF-8 size and is deleted when the build ends.

        Returns:
            The index (``kind="text"``).

        Example:
            >>> base = " ".join(f"w{i}" for i in range(100))
            >>> near = base.replace("w50", "v50")  # 5 of 96 shingles change: J = 91 / 101 = 0.90
            >>> far = " ".join(f"w{i}" for i in range(0, 200, 2))
            >>> DuplicateIndex.from_texts([base, far, near.upper()], progress=False).cluster_ids.tolist()
            [0, 1, 0]
        """
        return cls._build_sketched("text", texts, "texts", ngram, num_perm, threshold, lsh_weights, seed,
                                   chunk_size, num_workers, progress, spill_dir)

    @classmethod
    def from_token_ids(
        cls,
        seqs: Iterable[Any],
        *,
        ngram: int = 5,
        num_perm: int = 128,
        threshold: float = 0.8,
        lsh_weights: tuple[float, float] = (0.05, 0.95),
        seed: int = 0,
        chunk_size: int = 2048,
        num_workers: int = 1,
        progress: bool = True,
        spill_dir: str | os.PathLike | None = None,
    ) -> DuplicateIndex:
        """Index already tokenized sequences: exact duplicates plus MinHash-LSH on token n-grams.

        Args:
            seqs: a sequence of 1-D integer sequences (lists, arrays, LongTensors, or the rows of
                a 2-D tensor), or any iterable of them (consumed once, see :meth:`from_texts`).
            ngram: tokens per shingle.
            num_perm: MinHash permutations.
            threshold: Jaccard threshold of shingle sets.
            lsh_weights: ``(false_positive, false_negative)`` weights for bands and rows.
            seed: seed of the MinHash permutations.
            chunk_size: sequences per chunk.
            num_workers: processes for the chunked passes; the result does not depend on it.
            progress: show tqdm progress bars.
            spill_dir: directory for the temporary file of a one-pass iterable (8 bytes per token).

        Returns:
            The index (``kind="tokens"``).

        Example:
            >>> idx = DuplicateIndex.from_token_ids([[1, 2, 3], [1, 2, 3], [4, 5, 6]], progress=False)
            >>> idx.cluster_ids.tolist()
            [0, 0, 1]
        """
        return cls._build_sketched("tokens", seqs, "seqs", ngram, num_perm, threshold, lsh_weights, seed,
                                   chunk_size, num_workers, progress, spill_dir)

    @classmethod
    def _build_sketched(
        cls,
        kind: str,
        items: Any,
        name: str,
        ngram: int,
        num_perm: int,
        threshold: float,
        lsh_weights: tuple[float, float],
        seed: int,
        chunk_size: int,
        num_workers: int,
        progress: bool,
        spill_dir: str | os.PathLike | None = None,
    ) -> DuplicateIndex:
        check_int("ngram", ngram, 1, "e.g. ngram=5 (5-word shingles)")
        check_int("num_perm", num_perm, 1, "e.g. num_perm=128")
        check_int("seed", seed, 0, "e.g. seed=0")
        check_int("chunk_size", chunk_size, 1, "e.g. chunk_size=2048")
        check_int("num_workers", num_workers, 1, "1 runs in this process; e.g. num_workers=os.cpu_count()")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be a Jaccard similarity in (0, 1), got {threshold!r}; e.g. threshold=0.8")
        if spill_dir is not None and not (isinstance(spill_dir, (str, os.PathLike)) and Path(spill_dir).is_dir()):
            raise ValueError(
                f"spill_dir must be an existing directory (where a one-pass iterable's items are kept for the "
                f"verification pass), got {spill_dir!r}; create it first, or pass None for the system temporary directory"
            )
        from antimemo.dedup.lsh import optimal_params  # scipy: imported only when building

        bands, rows = optimal_params(float(threshold), int(num_perm), tuple(float(w) for w in lsh_weights))
        cfg = ShingleConfig(ngram=int(ngram), num_perm=int(num_perm), seed=int(seed), bands=bands, rows=rows)
        source = _source(items, name, kind, spill_dir)

        # worker processes are spawned (not forked: safe next to torch's threads); they import only
        # antimemo.dedup.minhash (numpy), plus whatever the main script imports at its top level
        pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=get_context("spawn")) if num_workers > 1 else None
        try:
            return cls._build_in(kind, source, cfg, threshold, lsh_weights, chunk_size, num_workers, progress, pool)
        finally:
            if pool is not None:
                pool.shutdown()
            source.close()

    @classmethod
    def _build_in(
        cls,
        kind: str,
        source: _SequenceSource | _StreamSource,
        cfg: ShingleConfig,
        threshold: float,
        lsh_weights: tuple[float, float],
        chunk_size: int,
        num_workers: int,
        progress: bool,
        pool: ProcessPoolExecutor | None,
    ) -> DuplicateIndex:
        from tqdm.auto import tqdm

        from antimemo.dedup.clusters import UnionFind
        from antimemo.dedup.lsh import lsh_bucket_arrays

        # pass 1: per example content hash, exact key, shingle count and band keys (176 bytes with
        # the defaults); chunks are read lazily, at most 2 * num_workers in flight
        parts: dict[str, list[np.ndarray]] = {"content": [], "exact": [], "num_shingles": [], "bands": []}
        jobs = ((kind, chunk, s, cfg) for s, chunk in source.chunks(chunk_size))
        with tqdm(total=source.n, desc=f"dedup: minhash ({kind})", unit="ex", disable=not progress) as bar:
            for res in _map_chunks(sketch_chunk, jobs, pool, num_workers):
                for key, lst in parts.items():
                    lst.append(res[key])
                bar.update(res["content"].shape[0])
        content = np.concatenate(parts.pop("content"))
        exact = np.concatenate(parts.pop("exact"))
        num_shingles = np.concatenate(parts.pop("num_shingles"))
        n = content.shape[0]

        # exact duplicates: root = first example with the same 128-bit key
        order = np.lexsort((exact[:, 1], exact[:, 0]))  # stable: ties keep ascending indices
        sk = exact[order]
        new_group = np.ones(n, dtype=bool)
        new_group[1:] = (sk[1:] != sk[:-1]).any(axis=1)
        del sk, exact
        group_first = order[new_group]
        exact_root = np.empty(n, dtype=np.int64)
        exact_root[order] = group_first[np.cumsum(new_group) - 1]
        del order, group_first
        num_groups = int(new_group.sum())
        reps = np.flatnonzero((exact_root == np.arange(n)) & (num_shingles > 0))
        # band keys of the representatives only, one chunk at a time (never two full copies)
        keys = np.empty((reps.shape[0], cfg.bands), dtype=np.uint64)
        band_parts = parts.pop("bands")
        lo = s = 0
        for c in range(len(band_parts)):
            part, band_parts[c] = band_parts[c], None  # freed as soon as it is copied
            hi = int(np.searchsorted(reps, s + part.shape[0]))
            keys[lo:hi] = part[reps[lo:hi] - s]
            lo, s = hi, s + part.shape[0]
            del part
        del band_parts
        members, bucket_offsets = lsh_bucket_arrays(keys, reps)
        del keys
        num_buckets = bucket_offsets.shape[0] - 1
        # a bucket whose members equal an earlier bucket's (the same pair found by several bands)
        # cannot merge anything new: drop the repeats of two-member buckets before the Python loop
        sizes = np.diff(bucket_offsets)
        pair_rows = np.flatnonzero(sizes == 2)
        pair_codes = members[bucket_offsets[pair_rows]] * n + members[bucket_offsets[pair_rows] + 1]
        _, first_pair = np.unique(pair_codes, return_index=True)
        keep = np.ones(num_buckets, dtype=bool)
        keep[pair_rows] = False
        keep[pair_rows[first_pair]] = True
        kept = np.flatnonzero(keep)
        del pair_codes, first_pair, keep, pair_rows

        # pass 2: shingle sets of the candidates only, kept flat (one uint64 array plus offsets)
        needed = np.unique(members)
        # a set has at most num_shingles elements: one buffer of that bound, filled in place
        flat = np.empty(int(num_shingles[needed].sum()), dtype=np.uint64)
        set_start = np.zeros(needed.shape[0] + 1, dtype=np.int64)
        nb = [(s, min(needed.shape[0], s + chunk_size)) for s in range(0, needed.shape[0], chunk_size)]
        jobs2 = ((kind, source.take(needed[s:e]), 0, cfg.ngram) for s, e in nb)
        with tqdm(total=needed.shape[0], desc="dedup: verifying candidates", unit="ex",
                  disable=not progress or not nb) as bar:
            for (s, e), res in zip(nb, _map_chunks(shingle_sets_chunk, jobs2, pool, num_workers)):
                pos = int(set_start[s])
                for i, arr in enumerate(res):
                    flat[pos : pos + arr.shape[0]] = arr
                    pos += arr.shape[0]
                    set_start[s + i + 1] = pos
                bar.update(e - s)
        local = np.searchsorted(needed, members)  # member -> position in needed

        uf = UnionFind()
        verified = merged = 0
        for bkt in kept.tolist():
            b0, b1 = int(bucket_offsets[bkt]), int(bucket_offsets[bkt + 1])
            mem = members[b0:b1].tolist()
            pos = local[b0:b1].tolist()
            roots = [uf.find(m) for m in mem]
            if all(r == roots[0] for r in roots):
                continue
            for x, u in enumerate(mem):
                pu = pos[x]
                su = flat[set_start[pu] : set_start[pu + 1]]
                for y in range(x + 1, len(mem)):
                    v = mem[y]
                    if uf.find(u) == uf.find(v):
                        continue
                    pv = pos[y]
                    sv = flat[set_start[pv] : set_start[pv + 1]]
                    small, large = sorted((su.shape[0], sv.shape[0]))
                    if small < threshold * large:  # J <= |small| / |large| < threshold
                        continue
                    verified += 1
                    if _jaccard(su, sv) >= threshold:
                        uf.union(u, v)
                        merged += 1
                if len({uf.find(m) for m in mem}) == 1:  # one component: nothing left to compare
                    break
        root = np.arange(n, dtype=np.int64)
        if needed.shape[0]:
            root[needed] = [uf.find(i) for i in needed.tolist()]
        labels = root[exact_root]
        params = {
            **sketch_params(kind, cfg, threshold, lsh_weights),
            "stats": {
                "exact_duplicate_examples": int(n - num_groups),
                "empty_examples": int((num_shingles == 0).sum()),
                "lsh_buckets": int(num_buckets),
                "candidate_examples": int(needed.shape[0]),
                "pairs_verified": verified,
                "pairs_merged": merged,
            },
        }
        return cls(labels, content, kind=kind, params=params)

    @classmethod
    def from_images(
        cls,
        images: Any,
        embedder: Any = None,
        *,
        threshold: float = 0.95,
        batch_size: int = 256,
        device: Any = "cpu",
        num_workers: int | None = None,
        progress: bool = True,
    ) -> DuplicateIndex:
        """Index images: cosine similarity of embeddings above ``threshold``, exact FAISS search.

        Args:
            images: float tensor ``[N, C, H, W]`` or a sequence of ``[C, H, W]`` float tensors.
            embedder: an ``nn.Module`` (``[B, C, H, W] -> [B, D]``); ``None`` uses the weights-free
                :class:`~antimemo.dedup.images.PixelEmbedder` (16 x 16 pooled, centred, unit norm).
            threshold: cosine similarity above which two images are near duplicates. 0.95 with the
                default embedder merges copies that differ by noise of about 5% of the pixel
                contrast, brightness offsets or small resizes; lower it for a semantic embedder.
            batch_size: images per forward pass.
            device: device of the embedder.
            num_workers: FAISS threads (``None``: FAISS's default, all cores).
            progress: show a tqdm progress bar.

        Returns:
            The index (``kind="images"``); byte-identical images always share a cluster.

        Raises:
            ImportError: if ``faiss`` is not installed (``pip install faiss-cpu``).

        Example:
            >>> import torch
            >>> x = torch.rand(3, 3, 16, 16)
            >>> x[2] = x[0] + 0.01 * torch.randn(3, 16, 16)
            >>> DuplicateIndex.from_images(x, progress=False).cluster_ids.tolist()
            [0, 1, 0]
        """
        from antimemo.dedup.images import embed_images, import_faiss, similar_pairs

        import_faiss()  # fail before embedding if FAISS is missing
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 < threshold < 1.0:
            raise ValueError(f"threshold must be a cosine similarity in (-1, 1), got {threshold!r}; e.g. threshold=0.95")
        check_int("batch_size", batch_size, 1, "e.g. batch_size=256")
        if num_workers is not None:
            check_int("num_workers", num_workers, 1, "or None for FAISS's default thread count")
        emb, hashes = embed_images(images, embedder, batch_size=batch_size, device=device, progress=progress)
        pairs = similar_pairs(emb, float(threshold), num_threads=num_workers)
        # byte-identical images (e.g. constant images, whose centred embedding is zero) share a cluster
        order = np.argsort(hashes, kind="stable")
        same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
        exact_pairs = np.stack([order[same], order[same + 1]], axis=1)
        n = emb.shape[0]
        from antimemo.dedup.clusters import connected_components

        labels = connected_components(n, np.concatenate([pairs, exact_pairs]))
        name = "PixelEmbedder(size=16)" if embedder is None else type(embedder).__name__
        params = {
            "threshold": float(threshold),
            "metric": "cosine",
            "embedder": name,
            "embedding_dim": int(emb.shape[1]),
            "stats": {"similar_pairs": int(pairs.shape[0]), "exact_duplicate_pairs": int(exact_pairs.shape[0])},
        }
        return cls(labels, hashes, kind="images", params=params)
