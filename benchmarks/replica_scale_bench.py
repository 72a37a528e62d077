"""Benchmark replica search at scale: exact (Flat), IVF-Flat and IVF-PQ sharded indexes, and 10M rows with PQ.

Everything goes through :class:`antimemo.replica_index.ShardedReplicaIndex`.

Data: :class:`antimemo.replica_index.ClusteredRows`: unit vectors in ``--dim`` (64) dimensions
around ``--clusters`` random centres (``spread`` 0.5: a row's cosine to its centre is about
0.89), generated chunk-wise from seeds, so 10M rows are never all in memory. Two query sets of
``--queries`` rows each (cosine = inner product):

- *fresh*: new draws from the same distribution (rows ``[N, N + Q)`` of a longer source with the
  same centres), not in the index: the standard ANN setting, reported as recall@1 and recall@10
  (the fraction of the exact top-10 ids found in the approximate top-10).
- *replica*: noisy copies of random indexed rows (noise of norm 0.1, then re-normalised; cosine
  about 0.995 to the source): *replica recall* = the fraction whose approximate top-1 is the
  exact top-1 (the replica decision needs exactly that).

Part 1 (``--sizes``, default 1M rows held in memory): for each of ``Flat``, ``IVF{nlist},Flat``
``IVF{nlist},PQ{m}`` and ``IVF{nlist},PQ{2m}`` (``nlist = --nlist`` or ``4 sqrt(N)``; ``m = dim / 4``), built with
``--shards`` shards: build time (one build), median search time over ``--repeats`` searches of
all queries at each ``--nprobe``, QPS, recall against the exact (Flat) result, bytes per vector
(serialised shards / N). Exact search is timed in the same run, interleaved with the
approximate searches (each repetition searches every configuration once), so the speedups are
ratios of one run.

Part 2 (``--scale-rows``, default 10M; 0 skips): an IVF-PQ index built with ``--scale-engine``
(``ray``: one Ray worker per shard, ``ray.init(num_cpus=--shards)``) from the streamed source;
exact ground truth for the queries by chunked brute force over the streamed rows (FAISS
``IndexFlatIP`` per chunk of 262,144 rows, merged with
:func:`~antimemo.replica_index.merge_topk`); recall, QPS (median of ``--repeats``) and bytes per
vector at each ``--nprobe``. Peak memory: the driver's peak RSS and the largest sampled sum of
RSS over the driver and all its descendant processes (Ray's raylet and workers included).

Usage:
    nice -n 5 python benchmarks/replica_scale_bench.py --json scale.json
    python benchmarks/replica_scale_bench.py --sizes 100000 --scale-rows 0 --repeats 3  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

from antimemo._faiss import import_faiss
from antimemo.replica_index import ClusteredRows, ShardedReplicaIndex, merge_topk

faiss = import_faiss("benchmarks/replica_scale_bench.py")


def env() -> dict:
    return {
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "load_avg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.machine(),
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def queries_for(n: int, dim: int, clusters: int, seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fresh, replica)`` query sets (see the module docstring)."""
    fresh = ClusteredRows(n + count, dim, clusters, seed=seed).read(n, n + count)
    src = ClusteredRows(n, dim, clusters, seed=seed)
    rng = np.random.default_rng([seed, 99])
    picks = np.sort(rng.choice(n, count, replace=False))
    base = np.empty((count, dim), np.float32)
    for s in range(0, n, ClusteredRows.BLOCK):  # one generated block per block holding a pick
        a, b = np.searchsorted(picks, [s, s + ClusteredRows.BLOCK])
        if b > a:
            base[a:b] = src.read(s, s + ClusteredRows.BLOCK)[picks[a:b] - s]
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise *= 0.1 / np.linalg.norm(noise, axis=1, keepdims=True)
    rep = base + noise
    return fresh, (rep / np.linalg.norm(rep, axis=1, keepdims=True)).astype(np.float32)


def exact_stream(source: ClusteredRows, queries: np.ndarray, k: int, chunk: int = 262144) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner product over a streamed source: one flat index per chunk, merged."""
    from tqdm.auto import tqdm

    best_d = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for s in tqdm(range(0, source.num_rows, chunk), desc="exact ground truth", unit="chunk"):
        block = source.read(s, min(source.num_rows, s + chunk))
        flat = faiss.IndexFlatIP(source.dim)
        flat.add(block)
        d, i = flat.search(queries, min(k, len(block)))
        best_d, best_i = merge_topk([best_d, d], [best_i, i + s], k, "ip")
    return best_d, best_i


def recall(ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(ids, truth)]))


def measure(index: ShardedReplicaIndex, nprobe: int | None, fresh: np.ndarray, rep: np.ndarray, truth: dict) -> tuple[float, dict]:
    """One timed search of both query sets; returns ``(seconds, recalls)``."""
    t0 = time.perf_counter()
    _, fi = index.search(fresh, 10, nprobe=nprobe)
    _, ri = index.search(rep, 1, nprobe=nprobe)
    seconds = time.perf_counter() - t0
    return seconds, {
        "recall@1": recall(fi, truth["fresh"], 1),
        "recall@10": recall(fi, truth["fresh"], 10),
        "replica_recall": float(np.mean(ri[:, 0] == truth["replica"][:, 0])),
    }


class RssSampler:
    """Largest sum of RSS over this process and its descendants, sampled every 0.5 s (psutil)."""

    def __init__(self) -> None:
        import psutil

        self.psutil, self.peak, self._stop = psutil, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = self.psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except self.psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.5)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()


def part1(args: argparse.Namespace, n: int) -> dict:
    src = ClusteredRows(n, args.dim, args.clusters, seed=args.seed)
    rows = src.read(0, n)
    fresh, rep = queries_for(n, args.dim, args.clusters, args.seed, args.queries)
    nlist = args.nlist or int(4 * n**0.5)
    m = args.dim // 4
    factories = ["Flat", f"IVF{nlist},Flat", f"IVF{nlist},PQ{m}", f"IVF{nlist},PQ{2 * m}"]
    built, out = {}, {"rows": n, "nlist": nlist, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for f in factories:
            t0 = time.perf_counter()
            built[f] = ShardedReplicaIndex.build(
                rows, os.path.join(tmp, f.replace(",", "_")), num_shards=args.shards, index=f,
                train_size=min(n, 64 * nlist), seed=args.seed, progress=False,
            )
            out["configs"][f] = {"build_s": round(time.perf_counter() - t0, 2), "bytes_per_vector": round(built[f].bytes_per_vector(), 2)}
            print(f"[{n}] built {f} in {out['configs'][f]['build_s']} s", file=sys.stderr, flush=True)
        exact = built["Flat"]
        truth = {"fresh": exact.search(fresh, 10)[1], "replica": exact.search(rep, 1)[1]}
        runs = [("Flat", None)] + [(f, p) for f in factories[1:] for p in args.nprobe]
        times: dict = {r: [] for r in runs}
        recalls: dict = {}
        for _ in range(args.repeats):  # interleaved: each repetition times every configuration once
            for f, p in runs:
                s, rec = measure(built[f], p, fresh, rep, truth)
                times[(f, p)].append(s)
                recalls[(f, p)] = rec
        flat_s = statistics.median(times[("Flat", None)])
        for f, p in runs:
            med = statistics.median(times[(f, p)])
            out["configs"][f].setdefault("search", []).append({
                "nprobe": p, "median_s": round(med, 4), "qps": round(2 * args.queries / med, 1),
                "speedup_vs_flat": round(flat_s / med, 2), **{k: round(v, 4) for k, v in recalls[(f, p)].items()},
            })
    return out


def part2(args: argparse.Namespace) -> dict:
    n = args.scale_rows
    src = ClusteredRows(n, args.dim, args.clusters, seed=args.seed)
    fresh, rep = queries_for(n, args.dim, args.clusters, args.seed, args.queries)
    nlist = args.scale_nlist
    factory = f"IVF{nlist},PQ{args.scale_pq or args.dim // 4}"
    out: dict = {"rows": n, "factory": factory, "engine": args.scale_engine, "shards": args.shards, "train_size": 64 * nlist}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp, RssSampler() as rss:
        if args.scale_engine == "ray":
            import ray

            ray.init(address="local", num_cpus=args.shards, include_dashboard=False, object_store_memory=300 * 2**20, log_to_driver=False)
        try:
            t0 = time.perf_counter()
            index = ShardedReplicaIndex.build(
                src, tmp, num_shards=args.shards, index=factory, train_size=64 * nlist, seed=args.seed,
                engine=args.scale_engine, chunk_size=65536,
            )
            out["build_s"] = round(time.perf_counter() - t0, 1)
            out["train_s"], out["add_s"] = index.manifest["train_seconds"], index.manifest["add_seconds"]
        finally:
            if args.scale_engine == "ray":
                ray.shutdown()
        out["bytes_per_vector"] = round(index.bytes_per_vector(), 2)
        out["index_bytes"] = index.nbytes()
        print(f"[{n}] built {factory} in {out['build_s']} s, {out['bytes_per_vector']} B/vector", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        _, both = exact_stream(src, np.concatenate([fresh, rep]), 10)  # one pass over the 10M rows
        fi, ri = both[: len(fresh)], both[len(fresh) :, :1]
        out["exact_ground_truth_s"] = round(time.perf_counter() - t0, 1)
        truth = {"fresh": fi, "replica": ri}
        times: dict = {p: [] for p in args.nprobe}
        recalls: dict = {}
        for _ in range(args.repeats):
            for p in args.nprobe:
                s, rec = measure(index, p, fresh, rep, truth)
                times[p].append(s)
                recalls[p] = rec
        out["search"] = [
            {"nprobe": p, "median_s": round(statistics.median(times[p]), 4), "qps": round(2 * args.queries / statistics.median(times[p]), 1),
             **{k: round(v, 4) for k, v in recalls[p].items()}}
            for p in args.nprobe
        ]
    out["peak_rss_driver_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["peak_rss_all_processes_mb"] = round(rss.peak / 2**20, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1_000_000])
    ap.add_argument("--scale-rows", type=int, default=10_000_000)
    ap.add_argument("--scale-nlist", type=int, default=1024)
    ap.add_argument("--scale-engine", choices=["local", "ray"], default="ray")
    ap.add_argument("--scale-pq", type=int, default=0, help="PQ bytes per vector of the 10M index (0: dim / 4)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--nlist", type=int, default=1024, help="part 1 IVF cells (0: 4 sqrt(N))")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None, help="directory for the 10M index files (default: system temp)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = {"env_start": env(), "args": vars(args), "part1": [], "part2": None}
    for n in args.sizes:
        result["part1"].append(part1(args, n))
        print(json.dumps(result["part1"][-1], indent=1), flush=True)
    if args.scale_rows:
        result["part2"] = part2(args)
        print(json.dumps(result["part2"], indent=1), flush=True)
    result["env_end"] = env()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
