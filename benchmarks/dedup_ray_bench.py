"""Local engine vs the Ray engine with 1 and 2 workers on the same sharded corpus (whole runs).

Each repetition runs, interleaved, three child processes on the same shards:

- ``local``: read every shard into a list, ``DuplicateIndex.from_texts(texts, num_workers=1)``,
  save the index (what ``antimemo dedup`` does for one file);
- ``ray1`` / ``ray2``: ``build_index_ray(shards, out_dir, num_workers=N)``, which starts a local
  Ray with ``N`` CPUs (its start-up is timed separately and included in the wall time).

Reported per configuration: the median wall time and documents/s over the repetitions, the
median build time without Ray's start-up, and the peak memory of the child's whole process tree
(the driver, Ray's GCS and raylet, the Ray workers) sampled every 0.2 s: the sum of the
processes' PSS (proportional set size, so the shared object-store pages are counted once), and
for reference the sum of their RSS; and the CPU seconds (user + system) of the tree: on a machine
shared with other jobs wall time cannot show scaling, while CPU seconds measure the work that
``N`` idle cores would share. The Ray engine's per-stage seconds come from its
``manifest.json``. The cluster ids of all engines are asserted equal.

Run: ``python benchmarks/dedup_ray_bench.py --docs 100000 --repeats 3 --json out.json``
(about 10 minutes on 2 shared cores, of which 2 minutes write the corpus). Needs ``ray[data]``, ``pyarrow`` and ``psutil``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_shards(directory: Path, num_docs: int, num_shards: int, seed: int) -> list[str]:
    """Documents of 50-300 Zipf-distributed words, 20% of them near copies (a few words edited) or
    exact copies of earlier ones, written as JSONL and Parquet shards (alternating)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    weights = 1.0 / (np.arange(50_000) + 10.0)
    weights /= weights.sum()
    docs: list[str] = []
    words_cache: list[list[str]] = []
    for _ in range(num_docs):
        if words_cache and rng.random() < 0.2:
            words = list(words_cache[rng.randrange(len(words_cache))])
            for _ in range(rng.choice([0, 1, 2, 4, 8])):
                words[rng.randrange(len(words))] = str(vocab[int(nprng.integers(50_000))])
        else:
            words = vocab[nprng.choice(50_000, size=rng.randint(50, 300), p=weights)].tolist()
            if len(words_cache) < 20_000:
                words_cache.append(words)
        docs.append(" ".join(words))
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    bounds = np.linspace(0, num_docs, num_shards + 1).astype(int)
    for i in range(num_shards):
        part = docs[bounds[i] : bounds[i + 1]]
        if i % 2 == 0:
            p = directory / f"shard-{i:03d}.jsonl"
            with open(p, "w") as f:
                for t in part:
                    f.write(json.dumps({"text": t}) + "\n")
        else:
            p = directory / f"shard-{i:03d}.parquet"
            pq.write_table(pa.table({"text": part}), p, row_group_size=2048)
        paths.append(str(p))
    return paths


def child(config: str, shards: list[str], out: Path) -> dict:
    """One whole run in this process; returns timings."""
    t0 = time.perf_counter()
    if config == "local":
        from antimemo.dedup import DuplicateIndex
        from antimemo.dedup.shards import read_piece, scan_file

        texts: list[str] = []
        for s in shards:
            for piece in scan_file(s, None, 2048)["pieces"]:
                texts.extend(read_piece(piece))
        index = DuplicateIndex.from_texts(texts, num_workers=1, progress=False)
        index.save(out / "index.npz")
        build = time.perf_counter() - t0
        return {"wall": build, "build": build, "init": 0.0, "clusters": index.num_clusters}
    import logging

    import ray

    from antimemo.dedup.ray_engine import build_index_ray

    workers = int(config[3:])
    ray.init(address="local", num_cpus=workers, include_dashboard=False, object_store_memory=512 * 2**20,
             logging_level=logging.WARNING)
    t1 = time.perf_counter()
    index = build_index_ray(shards, out, num_workers=workers, progress=False)
    t2 = time.perf_counter()
    seconds = json.loads((out / "manifest.json").read_text())["seconds"]
    ray.shutdown()
    return {"wall": t2 - t0, "build": t2 - t1, "init": t1 - t0, "clusters": index.num_clusters, "stages": seconds}


def _tree_memory(pid: int, cpu: dict[int, float]) -> tuple[int, int]:
    """PSS and RSS sums of a process tree; records each process's CPU seconds (user + system) in ``cpu``."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    pss = rss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            pss += getattr(info, "pss", info.rss)
            rss += info.rss
            t = p.cpu_times()
            cpu[p.pid] = max(cpu.get(p.pid, 0.0), t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss


def run_child(config: str, shards: list[str], out: Path) -> dict:
    cmd = [sys.executable, __file__, "--_child", config, "--_out", str(out), "--_shards", json.dumps(shards)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]
    cpu: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pss, rss = _tree_memory(proc.pid, cpu)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            stop.wait(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    stdout, stderr = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{stderr[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["peak_pss_mb"] = peak[0] / 2**20
    res["peak_rss_mb"] = peak[1] / 2**20
    res["cpu_s"] = sum(cpu.values())  # CPU seconds of the tree, as last sampled (every 0.2 s)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_shards", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(child(args._child, json.loads(args._shards), Path(args._out))))
        return
    from antimemo.dedup import DuplicateIndex

    work = Path(tempfile.mkdtemp(prefix="dedup_ray_bench-"))
    try:
        t = time.perf_counter()
        shards = make_shards(work / "shards", args.docs, args.shards, args.seed)
        size = sum(os.path.getsize(s) for s in shards)
        print(f"corpus: {args.docs} docs in {args.shards} shards, {size / 2**20:.1f} MiB ({time.perf_counter() - t:.1f} s)")
        configs = ["local", "ray1", "ray2"]
        runs: dict[str, list[dict]] = {c: [] for c in configs}
        labels: dict[str, np.ndarray] = {}
        load = []
        for rep in range(args.repeats):
            order = configs if rep % 2 == 0 else configs[::-1]  # interleaved, alternating order
            for c in order:
                out = work / f"out-{c}-{rep}"
                load.append(os.getloadavg()[0])
                res = run_child(c, shards, out)
                runs[c].append(res)
                labels[c] = DuplicateIndex.load(out / "index.npz").cluster_ids
                shutil.rmtree(out, ignore_errors=True)
                print(f"rep {rep} {c}: wall {res['wall']:.2f} s (init {res['init']:.2f} s), cpu {res['cpu_s']:.1f} s, "
                      f"peak PSS {res['peak_pss_mb']:.0f} MB, RSS {res['peak_rss_mb']:.0f} MB", flush=True)
        for c in configs[1:]:
            assert np.array_equal(labels[c], labels["local"]), f"{c} clusters differ from the local engine's"
        summary = {}
        for c in configs:
            wall = statistics.median(r["wall"] for r in runs[c])
            build = statistics.median(r["build"] for r in runs[c])
            summary[c] = {
                "wall_s": wall,
                "build_s": build,
                "init_s": statistics.median(r["init"] for r in runs[c]),
                "docs_per_s": args.docs / wall,
                "docs_per_s_build": args.docs / build,
                "peak_pss_mb": statistics.median(r["peak_pss_mb"] for r in runs[c]),
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs[c]),
                "cpu_s": statistics.median(r["cpu_s"] for r in runs[c]),
            }
            if "stages" in runs[c][0]:
                summary[c]["stages_s"] = {k: statistics.median(r["stages"][k] for r in runs[c]) for k in runs[c][0]["stages"]}
        summary["ratios"] = {
            "ray2_over_ray1_build": summary["ray1"]["build_s"] / summary["ray2"]["build_s"],
            "local_over_ray2_wall": summary["ray2"]["wall_s"] / summary["local"]["wall_s"],
        }
        machine = {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_avg_during": [min(load), statistics.median(load), max(load)],
            "numpy": np.__version__,
        }
        try:
            import ray

            machine["ray"] = ray.__version__
        except ImportError:
            pass
        result = {"docs": args.docs, "shards": args.shards, "repeats": args.repeats, "clusters": runs["local"][0]["clusters"],
                  "summary": summary, "runs": runs, "machine": machine}
        print(json.dumps({"summary": summary, "machine": machine, "clusters": result["clusters"]}, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
