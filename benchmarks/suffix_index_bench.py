"""Benchmark the training-set token index: antimemo's numpy suffix array, pydivsufsort, infini-gram.

Three ways to answer "does this span occur in training, and where" over token ids:

- ``numpy``: :class:`antimemo.suffix_index.TokenIndex` built by prefix doubling in numpy
  (``algorithm="numpy"``, no dependency);
- ``divsufsort``: the same ``TokenIndex`` with its suffix array sorted by libdivsufsort through
  ``pydivsufsort`` (``algorithm="divsufsort"``); the arrays are identical, so queries are the
  same code;
- ``infinigram``: the ``infini-gram`` package (its Rust ``rust_indexing`` suffix-array builder on
  the token file it expects, ``u16`` tokens with ``0xffff`` document separators, and its C++
  ``InfiniGramEngine``: ``count`` per span, ``creativity`` for the longest match at every start).

Datasets: ``corpus``: the embedded corpus as the LM recipe tokenizes it (``TextDataModule``,
bytes, every 64-byte row not held out: 7,135 documents, 457k tokens); ``synthetic``: a stream of
``--tokens`` Zipf(1.2) token ids over a 50k vocabulary in 1,000-token documents, 2% of them
duplicated (long matches).

Each measurement is a whole run in a fresh Python process (so the peak RSS of the build is that
process's, children included): build the index, then ``--spans`` span counts (length 32, half
taken from training, half random) and the matching lengths of 64 x 256-token "generations" (each
row has a 100-token training span planted in random tokens). Implementations run round-robin,
``--reps`` times; the table reports medians and the ratio against ``numpy`` measured in the same
run, and checks that all implementations return the same counts and matching lengths.

Run: ``python benchmarks/suffix_index_bench.py`` (needs ``pydivsufsort`` and ``infini-gram``:
``pip install pydivsufsort infini-gram``; about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMPLS = ("numpy", "divsufsort", "infinigram")
SPAN = 32
GEN_ROWS, GEN_LEN, PLANT = 64, 256, 100


def make_docs(dataset: str, tokens: int) -> list[np.ndarray]:
    if dataset == "corpus":
        from antimemo.lm.data import TextDataModule

        train, _ = TextDataModule(seq_len=64, num_train=None, num_holdout=128).build_split()
        return list(train.numpy().astype(np.int64))
    rng = np.random.default_rng(0)
    n_docs = max(1, tokens // 1000)
    x = np.minimum(rng.zipf(1.2, n_docs * 1000), 50_000) - 1
    docs = list(x.reshape(n_docs, 1000))
    for i in rng.choice(n_docs, size=max(1, n_docs // 50), replace=False):
        docs[i] = docs[(i + 1) % n_docs].copy()
    return docs


def make_queries(docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    vocab = int(max(int(d.max()) for d in docs)) + 1
    spans = []
    for k in range(1000):
        if k % 2 == 0:
            d = docs[int(rng.integers(len(docs)))]
            s = int(rng.integers(0, d.shape[0] - SPAN + 1))
            spans.append(d[s : s + SPAN])
        else:
            spans.append(rng.integers(0, vocab, SPAN))
    gens = rng.integers(0, vocab, (GEN_ROWS, GEN_LEN))
    long_docs = [d for d in docs if d.shape[0] >= 64]
    for r in range(GEN_ROWS):
        d = long_docs[int(rng.integers(len(long_docs)))]
        plant = min(PLANT, d.shape[0])
        s = int(rng.integers(0, d.shape[0] - plant + 1))
        at = int(rng.integers(0, GEN_LEN - plant + 1))
        gens[r, at : at + plant] = d[s : s + plant]
    return np.stack(spans), gens


def _rss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _nofile() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # infini-gram sets both limits to --ulimit


def worker(impl: str, dataset: str, tokens: int, n_spans: int, out: Path) -> None:
    import resource

    docs = make_docs(dataset, tokens)
    spans, gens = make_queries(docs)
    spans = spans[:n_spans]
    rss_before = _rss_kib()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    tmp = Path(tempfile.mkdtemp(prefix="sxbench-"))
    res: dict = {"impl": impl, "dataset": dataset, "docs": len(docs), "tokens": int(sum(d.shape[0] for d in docs))}
    try:
        if impl in ("numpy", "divsufsort"):
            from antimemo.suffix_index import TokenIndex

            t0 = time.perf_counter()
            idx = TokenIndex.build(docs, algorithm=impl, progress=False)
            res["build_s"] = time.perf_counter() - t0
            res["index_bytes"] = idx.save(tmp / "index.npz").stat().st_size
            t0 = time.perf_counter()
            counts = [idx.count(s) for s in spans]
            res["count_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            batched = idx.counts(spans)
            res["count_batch_s"] = time.perf_counter() - t0
            assert batched.tolist() == counts
            t0 = time.perf_counter()
            ms = idx.matching_lengths(gens)
            res["match_s"] = time.perf_counter() - t0
        else:
            from infini_gram import indexing
            from infini_gram.engine import InfiniGramEngine

            t0 = time.perf_counter()
            data, save = tmp / "data", tmp / "index"
            data.mkdir()
            save.mkdir()
            offsets, pos = [], 0
            with open(save / "tokenized.0", "wb") as f:  # what its tokenize step writes, pre-tokenized
                for d in docs:
                    content = b"\xff\xff" + d.astype("<u2").tobytes()
                    f.write(content)
                    offsets.append(pos)
                    pos += len(content)
            np.asarray(offsets, dtype="<u8").tofile(save / "offset.0")
            cwd = os.getcwd()
            argv = sys.argv
            sys.argv = ["indexing", "--data_dir", str(data), "--save_dir", str(save), "--token_dtype", "u16",
                        "--cpus", str(os.cpu_count()), "--mem", "8", "--ulimit", str(_nofile())]
            try:
                import contextlib
                import io

                with contextlib.redirect_stdout(io.StringIO()):
                    indexing.main()
            finally:
                sys.argv = argv
                os.chdir(cwd)
            res["build_s"] = time.perf_counter() - t0
            res["index_bytes"] = sum(p.stat().st_size for p in save.iterdir())
            engine = InfiniGramEngine(index_dir=str(save), eos_token_id=0, token_dtype="u16")
            t0 = time.perf_counter()
            counts = [int(engine.count(input_ids=[int(t) for t in s])["count"]) for s in spans]
            res["count_s"] = time.perf_counter() - t0
            res["count_batch_s"] = float("nan")  # no batched count in its Python API
            t0 = time.perf_counter()
            rows = []
            for g in gens:
                ids = [int(t) for t in g]
                # creativity: rs[i] = end of the longest span starting at i found in the index
                rs = engine.creativity(input_ids=ids)["rs"]
                rows.append([r - i for i, r in enumerate(rs)])
            ms = np.asarray(rows, dtype=np.int64)
            res["match_s"] = time.perf_counter() - t0
        res["counts_sum"] = int(sum(counts))
        res["counts"] = [int(c) for c in counts]
        res["match"] = ms.ravel().tolist()
        res["match_max"] = int(ms.max())
        res["rss_before_kib"] = rss_before
        res["rss_self_kib"] = _rss_kib()
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        res["rss_children_kib"] = after if after > children_before else 0  # a build subprocess's peak
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out.write_text(json.dumps(res))


def run_one(impl: str, dataset: str, tokens: int, n_spans: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, __file__, "--worker", impl, dataset, str(tokens), str(n_spans), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{impl} on {dataset} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def footprint(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return "not installed"
    pkg = Path(spec.origin).parent
    size = sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
    return f"{size / 2**20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=10_000_000, help="tokens of the synthetic stream")
    ap.add_argument("--spans", type=int, default=1000, help="span counts timed per run")
    ap.add_argument("--datasets", default="corpus,synthetic")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--worker", nargs=5, metavar=("IMPL", "DATASET", "TOKENS", "SPANS", "OUT"))
    args = ap.parse_args()
    if args.worker:
        impl, dataset, tokens, spans, out = args.worker
        worker(impl, dataset, int(tokens), int(spans), Path(out))
        return
    impls = args.impls.split(",")
    print(f"# {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, numpy {np.__version__}; load average at start "
          f"{os.getloadavg()[0]:.2f}")
    print(f"# install footprint: pydivsufsort {footprint('pydivsufsort')}, infini_gram {footprint('infini_gram')}")
    for dataset in args.datasets.split(","):
        runs: dict[str, list[dict]] = {i: [] for i in impls}
        for rep in range(args.reps):
            for impl in impls:
                r = run_one(impl, dataset, args.tokens, args.spans)
                runs[impl].append(r)
                print(f"  rep {rep} {impl:10s} build {r['build_s']:.2f}s count {r['count_s']:.3f}s "
                      f"match {r['match_s']:.3f}s", file=sys.stderr, flush=True)
        first = runs[impls[0]][0]
        print(f"\n## {dataset}: {first['docs']:,} documents, {first['tokens']:,} tokens "
              f"(median of {args.reps}; load average now {os.getloadavg()[0]:.2f})")
        print("| implementation | build | x numpy | count, per span (loop) | x numpy | "
              f"count, {args.spans} spans batched "
              "| matching lengths 64x256 | x numpy | peak RSS added by build + queries (MiB) | index size (MiB) "
              "| counts differ | matching lengths differ |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        base = runs.get("numpy")
        med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
        for impl in impls:
            rs = runs[impl]
            peak = med(rs, "rss_self_kib") - med(rs, "rss_before_kib")
            peak_children = med(rs, "rss_children_kib")
            ref = runs[impls[0]][0]
            dc = max(sum(a != b for a, b in zip(r["counts"], ref["counts"])) for r in rs)
            dm = max(sum(a != b for a, b in zip(r["match"], ref["match"])) for r in rs)
            ratio = lambda k: f"{med(rs, k) / med(base, k):.2f}" if base else "-"  # noqa: E731
            print(f"| {impl} | {med(rs, 'build_s'):.2f} s | {ratio('build_s')} | "
                  f"{1e3 * med(rs, 'count_s') / args.spans:.3f} ms | {ratio('count_s')} | "
                  f"{med(rs, 'count_batch_s'):.3f} s | {med(rs, 'match_s'):.3f} s | "
                  f"{ratio('match_s')} | +{peak / 1024:.0f}"
                  + (f" (build subprocess {peak_children / 1024:.0f})" if peak_children else "") + " | "
                  f"{med(rs, 'index_bytes') / 2**20:.1f} | {dc} of {len(ref['counts'])} | {dm} of {len(ref['match'])} |")
        print(f"\ncounts: {first['counts_sum']} occurrences over {args.spans} spans; longest match {first['match_max']}; "
              "differences are against the first implementation")


if __name__ == "__main__":
    main()
