"""Benchmark replica search: 1k queries against 100k and 1M reference embeddings.

What it measures, in one run, per reference size ``R``:

- exact top-1 search (cosine of unit rows = inner product) with FAISS ``IndexFlatIP``
  (:func:`antimemo.functional.replica.nearest_neighbors`, ``backend="faiss"``) against the
  chunked torch brute force (``backend="torch"``: ``queries @ reference.T`` in blocks of 1024
  queries, ``topk``), on the same data: median of ``--repeats`` searches each, and the ratio.
  The FAISS index is built once (its build time is reported separately: ``IndexFlat`` only
  copies the rows).
- approximate search with FAISS ``IndexHNSWFlat`` (``M=32``, ``efSearch`` 64 and 256) where
  ``R <= --hnsw-max`` (its build is slow on 2 cores): build time, median search time, ratio
  against the torch brute force, and recall@1 against the exact result.
- approximate search with FAISS ``IndexIVFFlat`` (``nlist = 4 sqrt(R)`` cells, ``--nprobe``
  cells visited): build time, median search time, ratio against the torch brute force,
  recall@1 against the exact result on all queries, and *replica recall*: among the queries
  whose exact top-1 cosine is at least ``--threshold`` (0.5, the SSCD replica threshold), the
  fraction for which IVF returns the same top-1 (the replica decision needs exactly these).
- agreement: the exact FAISS and torch neighbours are compared (recall@1 of FAISS against
  torch; ties between equal scores can differ only in index).
- memory: bytes of the reference matrix, of each index (``faiss.serialize_index`` length) and
  the process's peak RSS.

Embeddings are random unit vectors in ``--dim`` dimensions (Gaussian, seeded), queries are
noisy copies of random reference rows (so the true neighbour is known) mixed with fresh random
vectors.

Run: ``python benchmarks/replica_bench.py`` (default sizes 100000 and 1000000, dim 256, 5
repeats; several minutes on 2 cores). ``--sizes 100000`` for a quick run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from antimemo.functional.replica import build_faiss_index, nearest_neighbors  # noqa: E402


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def make_data(num_ref: int, num_queries: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.empty(num_ref, dim)
    for s in range(0, num_ref, 100_000):  # in blocks: bounded temporary memory
        e = min(num_ref, s + 100_000)
        ref[s:e] = torch.nn.functional.normalize(torch.randn(e - s, dim, generator=g), dim=1)
    half = num_queries // 2
    src = torch.randint(0, num_ref, (half,), generator=g)
    noisy = torch.nn.functional.normalize(ref[src] + 0.05 * torch.randn(half, dim, generator=g), dim=1)
    fresh = torch.nn.functional.normalize(torch.randn(num_queries - half, dim, generator=g), dim=1)
    return ref, torch.cat([noisy, fresh]), src


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(num_ref: int, args: argparse.Namespace) -> dict:
    import faiss

    ref, queries, src = make_data(num_ref, args.queries, args.dim, args.seed)
    row: dict = {"reference": num_ref, "queries": args.queries, "dim": args.dim,
                 "reference_mb": round(ref.numel() * 4 / 2**20, 1)}
    t = time.perf_counter()
    flat = build_faiss_index(ref, "ip", exact=True)
    row["faiss_flat_build_s"] = round(time.perf_counter() - t, 3)
    row["faiss_flat_index_mb"] = round(len(faiss.serialize_index(flat)) / 2**20, 1)
    tf, (sf, i_f) = _median_time(lambda: nearest_neighbors(queries, None, 1, "ip", index=flat), args.repeats)
    tt, (st, i_t) = _median_time(lambda: nearest_neighbors(queries, ref, 1, "ip", backend="torch"), args.repeats)
    row["faiss_flat_search_s"] = round(tf, 4)
    row["torch_bruteforce_s"] = round(tt, 4)
    row["speedup_flat_vs_torch"] = round(tt / tf, 2)
    same = (i_f[:, 0] == i_t[:, 0]) | torch.isclose(sf[:, 0], st[:, 0], atol=1e-6)
    row["flat_recall_vs_torch"] = float(same.float().mean())
    half = args.queries // 2
    row["planted_found_flat"] = float((i_f[:half, 0] == src).float().mean())
    # IVF: k-means cells; a replica lies in one of the few probed cells. "replica recall" counts the
    # queries whose exact top-1 cosine is >= --threshold (the replica decision) and asks whether
    # IVF returns the same top-1 for them.
    replica = st[:, 0] >= args.threshold
    row["replica_queries"] = int(replica.sum())
    t = time.perf_counter()
    ivf = build_faiss_index(ref, "ip", exact=False, kind="ivf", seed=args.seed)
    row["ivf_build_s"] = round(time.perf_counter() - t, 2)
    row["ivf_nlist"] = int(ivf.nlist)
    row["ivf_index_mb"] = round(len(faiss.serialize_index(ivf)) / 2**20, 1)
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        ti, (_, i_v) = _median_time(lambda: nearest_neighbors(queries, None, 1, "ip", index=ivf), args.repeats)
        row[f"ivf_np{nprobe}_search_s"] = round(ti, 4)
        row[f"speedup_ivf_np{nprobe}_vs_torch"] = round(tt / ti, 1)
        row[f"ivf_np{nprobe}_recall@1"] = float((i_v[:, 0] == i_t[:, 0]).float().mean())
        row[f"ivf_np{nprobe}_replica_recall"] = float((i_v[replica, 0] == i_t[replica, 0]).float().mean())
        row[f"ivf_np{nprobe}_planted_found"] = float((i_v[:half, 0] == src).float().mean())
    del ivf
    if num_ref <= args.hnsw_max:
        t = time.perf_counter()
        hnsw = build_faiss_index(ref, "ip", exact=False, hnsw_m=32)
        row["hnsw_build_s"] = round(time.perf_counter() - t, 2)
        row["hnsw_index_mb"] = round(len(faiss.serialize_index(hnsw)) / 2**20, 1)
        for ef in (64, 256):
            th, (_, i_h) = _median_time(
                lambda: nearest_neighbors(queries, None, 1, "ip", exact=False, ef_search=ef, index=hnsw), args.repeats
            )
            row[f"hnsw_ef{ef}_search_s"] = round(th, 4)
            row[f"speedup_hnsw_ef{ef}_vs_torch"] = round(tt / th, 1)
            row[f"hnsw_ef{ef}_recall@1"] = float((i_h[:, 0] == i_t[:, 0]).float().mean())
            row[f"hnsw_ef{ef}_planted_found"] = float((i_h[:half, 0] == src).float().mean())
        del hnsw
    else:
        row["hnsw"] = f"skipped (R > --hnsw-max {args.hnsw_max})"
    row["peak_rss_mb"] = round(peak_rss_mb(), 0)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hnsw-max", type=int, default=100_000, help="largest R for which HNSW is built")
    p.add_argument("--threads", type=int, default=None, help="torch and FAISS threads (default: as configured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32], help="IVF cells probed per query")
    p.add_argument("--threshold", type=float, default=0.5, help="cosine of a replica (for the IVF replica recall)")
    p.add_argument("--json", type=str, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    import faiss

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(env))
    rows = []
    for n in args.sizes:
        row = bench(n, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
