"""Peak memory of ``DuplicateIndex.from_texts`` on 1M synthetic documents streamed from a generator.

Each measurement runs in a fresh Python subprocess, so its peak RSS (``resource.getrusage``
``ru_maxrss``, the kernel's high-water mark of the process) counts only that build: the
interpreter, numpy/scipy, the generator and the index build. The subprocess also reports its RSS
after the imports and a small warm-up build (the fixed cost), the wall time and docs/s.

Corpus (deterministic, ``--seed``): documents of 50-300 words drawn from a Zipf-like vocabulary
of 50,000 words, generated block by block on the fly (nothing is kept); ``--dup-fraction`` of the
documents are planted near-copies of a document of the same or the previous block (0-8 random
word edits, 1 in 10 upper-cased), so LSH candidates and verification are exercised.

Run: ``python benchmarks/dedup_memory_bench.py`` (1M documents streamed; a few minutes on 2 cores).
``--list-docs M`` also builds from a Python list of ``M`` texts (the corpus held in memory), for
comparison; ``--json PATH`` writes the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_VOCAB_SIZE = 50_000
_BLOCK = 1000


def _vocab_cdf() -> np.ndarray:
    w = 1.0 / (np.arange(_VOCAB_SIZE) + 10.0)
    return np.cumsum(w / w.sum())


def synthetic_texts(num_docs: int, dup_fraction: float, seed: int):
    """Yield ``num_docs`` texts; block ``b`` of 1000 comes from ``default_rng([seed, b])``."""
    vocab = [f"w{i}" for i in range(_VOCAB_SIZE)]
    cdf = _vocab_cdf()
    prev: list[list[str]] = []
    for b in range(0, (num_docs + _BLOCK - 1) // _BLOCK):
        rng = np.random.default_rng([seed, b])
        size = min(_BLOCK, num_docs - b * _BLOCK)
        lengths = rng.integers(50, 301, size)
        ids = np.searchsorted(cdf, rng.random(int(lengths.sum())))
        bounds = np.concatenate(([0], np.cumsum(lengths))).tolist()
        copy = rng.random(size) < dup_fraction
        cur: list[list[str]] = []
        for d in range(size):
            if copy[d] and (cur or prev):
                pool = cur + prev
                words = list(pool[int(rng.integers(len(pool)))])
                for _ in range(int(rng.choice([0, 1, 2, 3, 4, 6, 8]))):
                    pos = int(rng.integers(len(words)))
                    op = int(rng.integers(3))
                    if op == 0:
                        words[pos] = vocab[int(rng.integers(_VOCAB_SIZE))]
                    elif op == 1:
                        words.insert(pos, vocab[int(rng.integers(_VOCAB_SIZE))])
                    elif len(words) > 1:
                        del words[pos]
                text = " ".join(words)
                yield text.upper() if rng.random() < 0.1 else text
            else:
                words = [vocab[i] for i in ids[bounds[d] : bounds[d + 1]].tolist()]
                yield " ".join(words)
            cur.append(words)
        prev = cur


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> dict:
    """One measurement, in this (fresh) process."""
    from antimemo.dedup import DuplicateIndex

    DuplicateIndex.from_texts(list(synthetic_texts(3000, args.dup_fraction, args.seed + 1)), progress=False)  # warm-up
    base_rss = _rss_mib()
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if args.mode == "generate":
        n = sum(1 for _ in synthetic_texts(args.docs, args.dup_fraction, args.seed))
        assert n == args.docs, f"the generator yielded {n} documents, expected {args.docs}"
        idx = None
    elif args.mode == "stream":
        idx = DuplicateIndex.from_texts(synthetic_texts(args.docs, args.dup_fraction, args.seed), progress=False,
                                        chunk_size=args.chunk_size)
    else:
        texts = list(synthetic_texts(args.docs, args.dup_fraction, args.seed))
        idx = DuplicateIndex.from_texts(texts, progress=False, chunk_size=args.chunk_size)
    seconds = time.perf_counter() - t0
    out = {
        "mode": args.mode,
        "documents": args.docs,
        "seconds": seconds,
        "docs_per_s": args.docs / seconds,
        "rss_after_imports_and_warmup_MiB": base_rss,
        "peak_rss_before_build_MiB": base_peak,
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if idx is not None:
        out.update({"clusters": idx.num_clusters, "duplicate_fraction": idx.duplicate_fraction,
                    "stats": idx.params["stats"]})
    return out


def run_child(mode: str, docs: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--docs", str(docs), "--seed", str(args.seed),
           "--dup-fraction", str(args.dup_fraction), "--chunk-size", str(args.chunk_size)]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["load_average_1min_at_start"] = load
    print(json.dumps(res), flush=True)
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=1_000_000)
    p.add_argument("--list-docs", type=int, default=0, help="also build from a list of this many texts")
    p.add_argument("--dup-fraction", type=float, default=0.1)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", choices=["generate", "stream", "list"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return {}
    res = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "corpus": {"documents": args.docs, "words_per_doc": "50-300", "dup_fraction": args.dup_fraction,
                   "seed": args.seed},
        "runs": [],
    }
    res["runs"].append(run_child("generate", args.docs, args))
    res["runs"].append(run_child("stream", args.docs, args))
    if args.list_docs:
        res["runs"].append(run_child("stream", args.list_docs, args))
        res["runs"].append(run_child("list", args.list_docs, args))
    gen_s = res["runs"][0]["seconds"]
    stream = res["runs"][1]
    res["summary"] = {
        "stream_peak_rss_MiB": stream["peak_rss_MiB"],
        "stream_peak_above_imports_MiB": stream["peak_rss_MiB"] - stream["rss_after_imports_and_warmup_MiB"],
        "stream_docs_per_s_including_generation": stream["docs_per_s"],
        "stream_docs_per_s_excluding_generation": args.docs / max(1e-9, stream["seconds"] - gen_s),
        "under_1_GiB": stream["peak_rss_MiB"] < 1024,
    }
    print(json.dumps(res["summary"]))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
