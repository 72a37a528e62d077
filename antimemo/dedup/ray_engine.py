"""The Ray dedup engine: the local MinHash-LSH index, built by Ray workers over a sharded corpus.

:func:`build_index_ray` gives the same clusters as :meth:`DuplicateIndex.from_texts` /
:meth:`DuplicateIndex.from_token_ids` on the concatenated corpus (same parameters), in these stages:

1. **sketch** (Ray Data): the input files are cut into pieces (:mod:`antimemo.dedup.shards`); a
   ``map_batches`` over the pieces reads each piece on a worker and calls the local engine's
   :func:`~antimemo.dedup.minhash.sketch_chunk`, so content hashes, exact keys and LSH band keys
   are bit-identical to the local engine's; the driver follows the finished blocks with tqdm;
2. **exact**: rows are hash-partitioned by their 128-bit exact key; each reduce task links every
   exact copy to the smallest document of its group and sends the band keys of the
   representatives (non-empty, smallest of their group) to a partition of their (band, key);
3. **buckets**: each reduce task groups its (band, key) rows; a bucket is a key shared by two or
   more representatives; memberships go to the group of input pieces holding the document, with
   a hash of the bucket's member set (its route);
4. **candidate sets**: one task per group of pieces parses only its candidate documents again and
   computes their shingle sets (:func:`~antimemo.dedup.minhash.shingle_sets_chunk`, the local
   verifier's sets), sent once per verify partition, chosen by the route (the buckets of several
   bands that hold the same documents meet in one partition);
5. **verify**: each reduce task runs the local engine's loop over its buckets (exact Jaccard of
   the shingle sets ``>= threshold``; one union-find per partition, so pairs already connected
   are skipped) and emits ``(member, smallest connected member)`` edges;
6. **components**: large-star / small-star over the hash-partitioned edges
   (:mod:`antimemo.dedup.components`); the driver sees two counts per round, never the edges;
7. **output**: the star edges are range-partitioned by document; one task per group of pieces
   returns its documents' cluster roots (the smallest member); the driver writes one Parquet
   shard per group (``doc``, ``cluster``) and the ``DuplicateIndex`` file.

Intermediate data lives in Ray's object store (spilled to disk beyond ``object_store_memory``).
The driver holds the object references, ``16`` bytes per document for the index file (cluster
root and content hash) and per-stage counts.

The output directory is written atomically: everything goes to a temporary sibling directory
that is renamed to ``out_dir`` at the end, so a failed or interrupted build leaves no
``out_dir`` (rerun it); a finished ``out_dir`` built from the same files and parameters is
returned as is, anything else there is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from antimemo._checks import check_int
from antimemo.dedup.components import hash_partition, ray_remote, ray_star_components, returns_list, split_rows
from antimemo.dedup.minhash import ShingleConfig, shingle_sets_chunk, sketch_chunk
from antimemo.dedup.shards import expand_inputs, read_piece, scan_file

__all__ = ["MANIFEST", "RAY_FORMAT", "build_index_ray"]

#: Format tag of the manifest of a finished output directory.
RAY_FORMAT = "antimemo.dedup.ray/1"
#: File names inside the output directory.
MANIFEST = "manifest.json"
INDEX_FILE = "index.npz"
CLUSTERS_DIR = "clusters"
_NEEDED_BY = "the Ray dedup engine (antimemo dedup --engine ray)"


# --------------------------------------------------------------------------------------------
# worker functions (module level: Ray pickles them by reference)


def _sketch_batch(batch: dict, kind: str, cfg: ShingleConfig, chunk_size: int) -> dict:
    """Ray Data UDF: read the pieces of a batch and sketch them with the local engine's function."""
    cols: dict[str, list] = {"doc": [], "content": [], "e0": [], "e1": [], "ns": []}
    bands: list[np.ndarray] = []
    for text in batch["piece"]:
        piece = json.loads(str(text))
        items = read_piece(piece)
        for s in range(0, len(items), chunk_size):
            base = piece["doc"] + s
            res = sketch_chunk(kind, items[s : s + chunk_size], base, cfg)
            d = res["content"].shape[0]
            cols["doc"].append(np.arange(base, base + d, dtype=np.int64))
            cols["content"].append(res["content"])
            cols["e0"].append(res["exact"][:, 0])
            cols["e1"].append(res["exact"][:, 1])
            cols["ns"].append(np.asarray(res["num_shingles"], dtype=np.int64))
            bands.append(res["bands"])
    out = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.uint64 if k in ("content", "e0", "e1") else np.int64)
           for k, v in cols.items()}
    b = np.concatenate(bands) if bands else np.zeros((0, cfg.bands), dtype=np.uint64)
    for j in range(cfg.bands):
        out[f"b{j}"] = np.ascontiguousarray(b[:, j])
    return out


def _block_columns(block: Any) -> dict[str, np.ndarray]:
    from ray.data.block import BlockAccessor

    acc = BlockAccessor.for_block(block)
    return {name: np.asarray(acc.to_numpy(name)) for name in acc.schema().names}


def _exact_split_task(block: Any, parts: int, bands: int) -> tuple:
    c = _block_columns(block)
    band_matrix = np.stack([c[f"b{j}"] for j in range(bands)], axis=1) if c["doc"].shape[0] else np.zeros((0, bands), np.uint64)
    pid = hash_partition(c["e0"].view(np.int64), parts)
    split = split_rows((c["doc"], c["e0"], c["e1"], c["ns"], band_matrix), pid, parts)
    return (*split, (c["doc"], c["content"]))


def _exact_reduce_task(part: int, parts: int, *chunks: tuple) -> tuple:
    doc, e0, e1, ns, bands = (np.concatenate([c[i] for c in chunks]) for i in range(5))
    order = np.lexsort((doc, e1, e0))
    doc, e0, e1, ns, bands = doc[order], e0[order], e1[order], ns[order], bands[order]
    new = np.ones(doc.shape[0], dtype=bool)
    new[1:] = (e0[1:] != e0[:-1]) | (e1[1:] != e1[:-1])
    root = doc[new][np.cumsum(new) - 1] if doc.shape[0] else doc
    edges = np.stack([doc[~new], root[~new]], axis=1)
    reps = new & (ns > 0)
    r_doc, r_bands = doc[reps], bands[reps]
    nb = r_bands.shape[1]
    band_idx = np.repeat(np.arange(nb, dtype=np.int64)[None, :], r_doc.shape[0], axis=0).ravel()
    keys = r_bands.ravel()
    docs = np.repeat(r_doc, nb)
    pid = hash_partition(keys.view(np.int64) ^ band_idx, parts)
    split = split_rows((band_idx, keys, docs), pid, parts)
    stats = np.array([int((~new).sum()), int((ns == 0).sum())], dtype=np.int64)
    return (edges, *split, stats)


def _bucket_reduce_task(part: int, group_starts: np.ndarray, *chunks: tuple) -> tuple:
    band, key, doc = (np.concatenate([c[i] for c in chunks]) for i in range(3))
    order = np.lexsort((doc, key, band))
    band, key, doc = band[order], key[order], doc[order]
    n = doc.shape[0]
    new = np.ones(n, dtype=bool)
    new[1:] = (band[1:] != band[:-1]) | (key[1:] != key[:-1])
    gid = np.cumsum(new) - 1
    sizes = np.bincount(gid) if n else np.zeros(0, dtype=np.int64)
    keep = sizes[gid] >= 2 if n else np.zeros(0, dtype=bool)
    # bucket ids unique across partitions: the partition in the high bits
    bucket = (np.int64(part) << np.int64(40)) + gid[keep].astype(np.int64)
    mdoc = doc[keep]
    # route: a hash of the bucket's member set, so that the buckets of several bands holding the
    # same documents are verified by one task, which then skips them as already connected
    mixed = (doc.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    mixed ^= mixed >> np.uint64(29)
    route_of_group = np.add.reduceat(mixed, np.flatnonzero(new)) if n else mixed
    route = route_of_group[gid[keep]].view(np.int64)
    groups = len(group_starts)
    split = split_rows((mdoc, bucket, route), np.searchsorted(group_starts, mdoc, side="right") - 1, groups)
    stats = np.array([int((sizes >= 2).sum())], dtype=np.int64)
    return (*split, stats)


def _candidate_sets_task(pieces_json: str, kind: str, ngram: int, parts: int, *chunks: tuple) -> tuple:
    pieces = json.loads(pieces_json)
    mdoc = np.concatenate([c[0] for c in chunks])
    mbucket = np.concatenate([c[1] for c in chunks])
    mroute = np.concatenate([c[2] for c in chunks])
    needed = np.unique(mdoc)
    sets: list[np.ndarray] = []
    for piece in pieces:
        lo, hi = piece["doc"], piece["doc"] + piece["rows"]
        sel = needed[(needed >= lo) & (needed < hi)]
        if sel.shape[0] == 0:
            continue
        items = read_piece(piece, rows=(sel - lo).tolist())  # only the candidates' lines are parsed
        sets.extend(shingle_sets_chunk(kind, items, int(sel[0]), ngram))
    lens = np.array([s.shape[0] for s in sets], dtype=np.int64)
    out = []
    for bucket, doc in split_rows((mbucket, mdoc), hash_partition(mroute, parts), parts):
        udocs = np.unique(doc)  # each document's set once per partition, whatever its buckets
        idx = np.searchsorted(needed, udocs)
        values = np.concatenate([sets[i] for i in idx.tolist()]) if idx.shape[0] else np.zeros(0, dtype=np.uint64)
        out.append((bucket, doc, udocs, lens[idx], values))
    return (*out, np.array([needed.shape[0]], dtype=np.int64))


def _jaccard(x: np.ndarray, y: np.ndarray) -> float:
    inter = np.intersect1d(x, y, assume_unique=True).shape[0]
    union = x.shape[0] + y.shape[0] - inter
    return inter / union if union else 1.0


def _verify_task(threshold: float, *chunks: tuple) -> tuple:
    """The local engine's verification loop over the buckets of one partition (one union-find for
    the partition: a pair already connected through another bucket is not compared again)."""
    bucket = np.concatenate([c[0] for c in chunks])
    doc = np.concatenate([c[1] for c in chunks])
    sets: dict[int, np.ndarray] = {}
    for _, _, udocs, lens, values in chunks:
        offs = np.concatenate(([0], np.cumsum(lens)))
        for i, d in enumerate(udocs.tolist()):
            sets[d] = values[offs[i] : offs[i + 1]]
    order = np.lexsort((doc, bucket))
    bucket_s = bucket[order]
    m = order.shape[0]
    starts = np.concatenate(([0], np.flatnonzero(bucket_s[1:] != bucket_s[:-1]) + 1)) if m else np.zeros(0, np.int64)
    ends = np.concatenate((starts[1:], [m])) if m else starts
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    verified = merged = 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        members = doc[order[s:e]].tolist()
        roots = [find(u) for u in members]
        if all(r == roots[0] for r in roots):
            continue
        for x, u in enumerate(members):  # the local engine's loop over one bucket
            su = sets[u]
            for v in members[x + 1 :]:
                ru, rv = find(u), find(v)
                if ru == rv:
                    continue
                sv = sets[v]
                small, large = sorted((su.shape[0], sv.shape[0]))
                if small < threshold * large:  # J <= |small| / |large| < threshold
                    continue
                verified += 1
                if _jaccard(su, sv) >= threshold:
                    parent[max(ru, rv)] = min(ru, rv)
                    merged += 1
            if len({find(w) for w in members}) == 1:
                break
    nodes = list(parent)
    edges = [(u, find(u)) for u in nodes if find(u) != u]
    arr = np.array(edges, dtype=np.int64).reshape(-1, 2)
    return arr, np.array([verified, merged], dtype=np.int64)


def _star_split_task(stars: np.ndarray, group_starts: np.ndarray) -> tuple:
    groups = len(group_starts)
    split = split_rows((stars[:, 0], stars[:, 1]), np.searchsorted(group_starts, stars[:, 0], side="right") - 1, groups)
    return tuple(split) if groups > 1 else split[0]


def _labels_task(lo: int, hi: int, *chunks: tuple) -> np.ndarray:
    labels = np.arange(lo, hi, dtype=np.int64)
    for leaf, root in chunks:
        labels[leaf - lo] = root
    return labels


# --------------------------------------------------------------------------------------------
# driver


_USER_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "FileNotFoundError": FileNotFoundError}


def _unwrap(err: BaseException) -> BaseException:
    """The user-facing exception inside a Ray task / Ray Data error (a bad line, a missing field).

    A Ray task's error carries its cause; a Ray Data UDF's error keeps only the remote traceback
    text, whose first ``ValueError: ...`` line (the root cause comes first) is raised again.
    """
    seen = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, tuple(_USER_ERRORS.values())) and not type(cur).__module__.startswith("ray"):
            return cur
        cause = getattr(cur, "cause", None)
        cur = cause if isinstance(cause, BaseException) else cur.__cause__
    import re

    text = str(getattr(err, "traceback_str", "") or err)
    found = re.search(r"^(ValueError|TypeError|FileNotFoundError): (.+)$", text, flags=re.MULTILINE)
    return _USER_ERRORS[found.group(1)](found.group(2)) if found else err


def _wait(ray: Any, refs: list, desc: str, progress: bool) -> list:
    """``ray.get`` of small result refs with a tqdm bar over finished tasks."""
    from tqdm.auto import tqdm

    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="task", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
    return ray.get(list(refs))


def _check_args(ngram: int, num_perm: int, threshold: Any, seed: int, chunk_size: int,
                num_workers: Any, object_store_memory: Any) -> None:
    check_int("ngram", ngram, 1, "e.g. ngram=5 (5-word shingles)")
    check_int("num_perm", num_perm, 1, "e.g. num_perm=128")
    check_int("seed", seed, 0, "e.g. seed=0")
    check_int("chunk_size", chunk_size, 1, "e.g. chunk_size=2048")
    if num_workers is not None:
        check_int("num_workers", num_workers, 1, "or None for every CPU of the Ray cluster")
    if object_store_memory is not None:
        check_int("object_store_memory", object_store_memory, 78 * 2**20, "bytes, e.g. 512 * 2**20 (Ray's minimum is 75 MiB)")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a Jaccard similarity in (0, 1), got {threshold!r}; e.g. threshold=0.8")


_JOIN_FIX = ("start it with `ray start --head` on the head node, or check the address (auto, HOST:6379, "
             "ray://HOST:10001)")


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a ``HOST:PORT`` address nothing listens on (``ray.init`` would retry for minutes)."""
    import re
    import socket

    found = re.fullmatch(r"(?:ray://)?([\w.\-]+|\[[0-9a-fA-F:]+\]):(\d+)", address.strip())
    if found is None:  # "auto" or another form: Ray resolves it
        return
    host, port = found.group(1).strip("[]"), int(found.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(
            f"could not join the Ray cluster at address={address!r}: nothing answers at {host}:{port} ({err}); {_JOIN_FIX}"
        ) from None


def _finished(out: Path, build: dict) -> bool:
    """True if ``out`` is a finished output of this build; raise if ``out`` holds anything else."""
    if not out.exists():
        return False
    manifest = out / MANIFEST
    if not out.is_dir() or not manifest.is_file():
        raise FileExistsError(
            f"out_dir {str(out)!r} exists and is not a finished Ray dedup output (no {MANIFEST}); choose a new "
            "directory (it is created) or remove this one"
        )
    try:
        old = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise FileExistsError(f"{str(manifest)!r} is not valid JSON ({err}); remove {str(out)!r} and rerun") from None
    if old.get("format") != RAY_FORMAT or old.get("build") != build:
        raise FileExistsError(
            f"out_dir {str(out)!r} holds an index built from other inputs or parameters ({MANIFEST} differs); "
            "choose another out_dir or remove it to rebuild"
        )
    return True


def build_index_ray(
    inputs: Any,
    out_dir: str | os.PathLike,
    *,
    field: str | None = None,
    ngram: int = 5,
    num_perm: int = 128,
    threshold: float = 0.8,
    lsh_weights: tuple[float, float] = (0.05, 0.95),
    seed: int = 0,
    chunk_size: int = 2048,
    address: str | None = None,
    num_workers: int | None = None,
    object_store_memory: int | None = 512 * 2**20,
    progress: bool = True,
) -> Any:
    """Build a text / token-id :class:`~antimemo.dedup.index.DuplicateIndex` with Ray workers.

    The clusters equal those of ``DuplicateIndex.from_texts(corpus, ...)`` (or
    ``from_token_ids``) on the documents of all input files in order, with the same ``ngram``,
    ``num_perm``, ``threshold``, ``lsh_weights`` and ``seed``.

    Args:
        inputs: a file, directory or glob pattern, or a list of them (:func:`~antimemo.dedup.shards.expand_inputs`):
            ``.txt`` (one document per line), ``.jsonl`` / ``.ndjson`` (``field`` of each line),
            ``.parquet`` (column ``field``). Every Ray node must read them at the same paths.
        out_dir: output directory (must not exist, or be a finished output of this same build):
            ``index.npz`` (for :meth:`DuplicateIndex.load` / ``DedupSampling``),
            ``clusters/part-NNNNN.parquet`` (``doc``: document index, ``cluster``: the smallest
            document index of its cluster) and ``manifest.json``.
        field: JSON field / Parquet column (``None``: ``"text"``, else ``"input_ids"``).
        ngram: words or tokens per shingle.
        num_perm: MinHash permutations.
        threshold: Jaccard threshold of the shingle sets.
        lsh_weights: ``(false_positive, false_negative)`` weights for bands and rows.
        seed: seed of the permutations.
        chunk_size: documents per input piece (one Ray Data row, one sketch call).
        address: a Ray cluster to join (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``);
            ``None`` starts a local Ray with ``num_workers`` CPUs, unless Ray already runs in this
            process (``ray.init`` called before): then that Ray is used, and ``address`` must be ``None``.
        num_workers: parallel tasks: the hash partitions of every shuffle and the CPUs of a local
            Ray (``None``: every CPU of the cluster, or ``os.cpu_count()`` locally).
        object_store_memory: bytes of Ray's object store when a local Ray is started (beyond it,
            Ray spills to disk); ``None`` lets Ray choose (30% of RAM).
        progress: tqdm bars on the driver for every stage (finished documents and tasks).

    Returns:
        The index (``kind="text"`` or ``"tokens"``), also saved as ``out_dir/index.npz``.

    Raises:
        ImportError: Ray is not installed (``pip install 'antimemo[ray]'``).
        FileNotFoundError: an input matches no file.
        FileExistsError: ``out_dir`` exists and is not a finished output of this build.
        ConnectionError: no Ray cluster answers at ``address``.
        ValueError / TypeError: a bad argument or a bad line in an input (naming file and line).
    """
    from antimemo._extras import require

    _check_args(ngram, num_perm, threshold, seed, chunk_size, num_workers, object_store_memory)
    ray = require("ray", _NEEDED_BY)
    require("pyarrow", _NEEDED_BY)
    from antimemo.dedup.lsh import optimal_params

    bands, rows = optimal_params(float(threshold), int(num_perm), tuple(float(w) for w in lsh_weights))
    cfg = ShingleConfig(ngram=int(ngram), num_perm=int(num_perm), seed=int(seed), bands=bands, rows=rows)
    files = expand_inputs(inputs)
    out = Path(out_dir).resolve()
    build = {
        "inputs": [str(p) for p in files],
        "sizes": [p.stat().st_size for p in files],
        "mtimes_ns": [p.stat().st_mtime_ns for p in files],
        "field": field,
        "ngram": cfg.ngram,
        "num_perm": cfg.num_perm,
        "threshold": float(threshold),
        "lsh_weights": [float(w) for w in lsh_weights],
        "seed": cfg.seed,
    }
    from antimemo.dedup.index import DuplicateIndex

    if _finished(out, build):
        if progress:
            print(f"dedup[ray]: {str(out)!r} is already built from these inputs and parameters; nothing to do")
        return DuplicateIndex.load(out / INDEX_FILE)
    started = False
    if ray.is_initialized() and address is not None:
        raise ValueError(
            f"address={address!r} but Ray is already running in this process (ray.init was called): the build uses "
            "that Ray; pass address=None, or call ray.shutdown() first to join another cluster"
        )
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address is None:  # "local": a new Ray of our own, even if `ray start` runs on this machine
            kwargs.update(address="local", num_cpus=num_workers or os.cpu_count() or 1, include_dashboard=False,
                          object_store_memory=object_store_memory)
        else:
            kwargs["address"] = address
            _check_reachable(address)
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            if address is None:
                raise
            raise ConnectionError(
                f"could not join the Ray cluster at address={address!r}: {err}; {_JOIN_FIX}; a cluster with Ray's "
                "token authentication needs RAY_AUTH_MODE=token here and its token (~/.ray/auth_token or RAY_AUTH_TOKEN)"
            ) from None
        started = True
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        parts = int(num_workers or max(1, int(ray.cluster_resources().get("CPU", 1))))
        try:
            index = _run(ray, files, field, cfg, float(threshold), lsh_weights, chunk_size, parts, progress, tmp, build)
        except Exception as err:
            if isinstance(err, ray.exceptions.RayError):
                cause = _unwrap(err)
                if cause is not err:
                    raise cause from None
            raise
        os.replace(tmp, out)  # atomic: out_dir appears complete or not at all
        return index
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if started:
            ray.shutdown()


def _run(ray: Any, files: list[Path], field: str | None, cfg: ShingleConfig, threshold: float,
         lsh_weights: tuple, chunk_size: int, parts: int, progress: bool, tmp: Path, build: dict) -> Any:
    import time

    import ray.data
    from tqdm.auto import tqdm

    from antimemo.dedup.index import DuplicateIndex, sketch_params

    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        seconds[stage] = round(now - clock[0], 3)
        clock[0] = now

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver's tqdm bars below report progress
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    # 0. scan: cut every file into pieces (one task per file), number the documents
    scans = _wait(ray, [ray_remote(scan_file).remote(str(p), field, chunk_size) for p in files],
                  "dedup[ray]: scanning inputs", progress)
    kinds = {s["kind"] for s in scans if s["kind"] is not None}
    if not kinds:
        raise ValueError(f"the inputs {[str(p) for p in files]} hold no document: a duplicate index needs at least one")
    if len(kinds) > 1:
        by_kind = {s["kind"]: str(p) for p, s in zip(files, scans) if s["kind"]}
        raise ValueError(f"the inputs mix texts and token ids ({by_kind}); index them separately")
    kind = kinds.pop()
    lap("scan")
    pieces: list[dict] = []
    n = 0
    for s in scans:
        for p in s["pieces"]:
            pieces.append({**p, "doc": n})
            n += p["rows"]
    # groups of consecutive pieces: one candidate-set task and one Parquet shard each
    n_groups = min(len(pieces), max(parts, -(-len(pieces) // 8)))
    per = -(-len(pieces) // n_groups)
    groups = [pieces[i : i + per] for i in range(0, len(pieces), per)]
    group_starts = np.array([g[0]["doc"] for g in groups], dtype=np.int64)
    group_ends = np.array([g[-1]["doc"] + g[-1]["rows"] for g in groups], dtype=np.int64)

    # 1. sketch with Ray Data; 2a. split each finished block by exact key as it arrives
    ds = ray.data.from_items([{"piece": json.dumps(p)} for p in pieces], override_num_blocks=len(pieces))
    pool = {"compute": ray.data.TaskPoolStrategy(size=parts)} if hasattr(ray.data, "TaskPoolStrategy") else {"concurrency": parts}
    ds = ds.map_batches(_sketch_batch, batch_size=1, batch_format="numpy",
                        fn_kwargs={"kind": kind, "cfg": cfg, "chunk_size": chunk_size}, **pool)
    content = np.zeros(n, dtype=np.uint64)
    exact_splits, content_refs = [], []
    split = ray_remote(_exact_split_task)
    with tqdm(total=n, desc=f"dedup[ray]: minhash ({kind})", unit="doc", disable=not progress) as bar:
        for bundle in ds.iter_internal_ref_bundles():
            for entry in bundle.blocks:
                block_ref, meta = (entry.ref, entry.metadata) if hasattr(entry, "ref") else entry
                refs = returns_list(split.options(num_returns=parts + 1).remote(block_ref, parts, cfg.bands), parts + 1)
                exact_splits.append(refs[:-1])
                content_refs.append(refs[-1])
                bar.update(meta.num_rows or 0)
    seen = 0
    for doc, ch in ray.get(content_refs):
        content[doc] = ch
        seen += doc.shape[0]
    if seen != n:  # every document must reach the shuffle exactly once
        raise RuntimeError(f"the sketch stage returned {seen} documents for {n} in the inputs; rerun the build")
    del content_refs
    lap("sketch")

    # 2b. exact groups -> exact edges + band rows of the representatives
    reduce = ray_remote(_exact_reduce_task)
    outs = [returns_list(reduce.options(num_returns=parts + 2).remote(j, parts, *[s[j] for s in exact_splits]), parts + 2)
            for j in range(parts)]
    del exact_splits
    exact_stats = _wait(ray, [o[-1] for o in outs], "dedup[ray]: exact duplicates", progress)
    edge_refs = [o[0] for o in outs]
    band_splits = [o[1:-1] for o in outs]
    lap("exact")

    # 3. LSH buckets -> memberships by group of pieces
    bucket = ray_remote(_bucket_reduce_task)
    n_out = len(groups) + 1
    outs = [returns_list(bucket.options(num_returns=n_out).remote(j, group_starts, *[s[j] for s in band_splits]), n_out)
            for j in range(parts)]
    del band_splits
    bucket_stats = _wait(ray, [o[-1] for o in outs], "dedup[ray]: LSH buckets", progress)
    member_splits = [o[:-1] for o in outs]
    lap("buckets")

    # 4. candidate shingle sets, read again by the group that holds the documents
    cands = ray_remote(_candidate_sets_task)
    outs = [returns_list(cands.options(num_returns=parts + 1).remote(
        json.dumps(g), kind, cfg.ngram, parts, *[s[i] for s in member_splits]), parts + 1)
        for i, g in enumerate(groups)]
    del member_splits
    cand_stats = _wait(ray, [o[-1] for o in outs], "dedup[ray]: candidate sets", progress)
    lap("candidate_sets")

    # 5. verify bucket members
    verify = ray_remote(_verify_task)
    vouts = [verify.options(num_returns=2).remote(threshold, *[o[j] for o in outs]) for j in range(parts)]
    del outs
    verify_stats = _wait(ray, [o[1] for o in vouts], "dedup[ray]: verifying candidates", progress)
    edge_refs += [o[0] for o in vouts]
    lap("verify")

    # 6. connected components (large-star / small-star)
    star_refs, rounds = ray_star_components(edge_refs, parts, progress=progress)
    del edge_refs
    lap("components")

    # 7. roots per group of documents -> Parquet shards + the index file
    ssplit = ray_remote(_star_split_task)
    star_splits = [returns_list(ssplit.options(num_returns=len(groups)).remote(r, group_starts), len(groups))
                   for r in star_refs]
    label = ray_remote(_labels_task)
    label_refs = [label.remote(int(group_starts[i]), int(group_ends[i]), *[s[i] for s in star_splits])
                  for i in range(len(groups))]
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp / CLUSTERS_DIR).mkdir(parents=True)
    labels = np.empty(n, dtype=np.int64)
    where = {r: i for i, r in enumerate(label_refs)}
    pending = list(label_refs)
    with tqdm(total=n, desc="dedup[ray]: writing clusters", unit="doc", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = where[done[0]]
            lab = ray.get(done[0])
            lo = int(group_starts[i])
            labels[lo : lo + lab.shape[0]] = lab
            table = pa.table({"doc": np.arange(lo, lo + lab.shape[0], dtype=np.int64), "cluster": lab})
            pq.write_table(table, tmp / CLUSTERS_DIR / f"part-{i:05d}.parquet")
            bar.update(lab.shape[0])

    e_stats = np.sum(exact_stats, axis=0)
    v_stats = np.sum(verify_stats, axis=0)
    params = {
        **sketch_params(kind, cfg, threshold, lsh_weights),
        "engine": "ray",
        "partitions": parts,
        "stats": {
            "exact_duplicate_examples": int(e_stats[0]),
            "empty_examples": int(e_stats[1]),
            "lsh_buckets": int(np.sum(bucket_stats)),
            "candidate_examples": int(np.sum(cand_stats)),
            "pairs_verified": int(v_stats[0]),
            "pairs_merged": int(v_stats[1]),
            "component_rounds": int(rounds),
        },
    }
    index = DuplicateIndex(labels, content, kind=kind, params=params)
    index.save(tmp / INDEX_FILE)
    lap("write")
    manifest = {
        "format": RAY_FORMAT,
        "build": build,
        "kind": kind,
        "num_examples": n,
        "num_clusters": index.num_clusters,
        "fingerprint": index.fingerprint,
        "index": INDEX_FILE,
        "shards": sorted(p.name for p in (tmp / CLUSTERS_DIR).iterdir()),
        "columns": {"doc": "document index in the corpus", "cluster": "smallest document index of its cluster"},
        "partitions": parts,
        "seconds": seconds,
    }
    from antimemo._atomic import atomic_write_text

    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return index
