"""Benchmark ``antimemo.dedup`` against ``datasketch`` 2.x MinHash on a corpus with planted near duplicates.

What it measures, in one run:

- MinHash throughput (documents/s, text -> signature): antimemo's vectorised pipeline (normalise,
  shingle, hash, 128 permutations, LSH band keys) against datasketch's ``MinHash.update_batch``
  on the same word 5-gram shingles with the same permutation parameters (``affine32``, same
  seed: asserted equal; with the same 32-bit shingle hashes the signatures are asserted equal bit
  for bit). Median of ``--repeats`` runs, and the ratio.
- End-to-end index build (``DuplicateIndex.from_texts``: exact groups, LSH, exact-Jaccard
  verification, connected components).
- Quality against exact ground truth: every pair of documents with word-5-gram Jaccard >= 0.8,
  computed exactly on the shingle strings through an inverted index (complete: a pair with
  J > 0 shares a shingle). Reported: LSH candidate recall, cluster pair recall, pair precision
  (against the connected components of the ground-truth graph), and datasketch
  ``MinHashLSH`` candidate recall with its default and with antimemo's weights.
- Memory: bytes per document of the saved index and of the build-time arrays, and the peak
  traced allocation of one build (``tracemalloc``).

- Throughput by document length on real text: the docstrings of Python's standard library
  (``ast`` over the installed stdlib, tests excluded; not used to design the pipeline), split
  into short (50-300 words, the list repeated 5x) and long (> 300 words, repeated 10x) documents;
  the repeats make one timed run long enough (about 50 ms for antimemo) to stand above scheduler
  noise on a shared machine. antimemo ``sketch_chunk`` (text -> content hash, exact key, band
  keys) and datasketch ``update_batch`` on the same shingles' bytes are timed alternately,
  ``--repeats`` times each; medians and their ratio, plus antimemo's time per stage.

With numba installed antimemo runs its compiled kernels; they are loaded (and compiled, if their
disk cache is cold) before any timing, so compile time is excluded from every figure and reported
as ``kernel_load_or_compile_s_excluded``. The by-length comparison also times antimemo's numpy path
(what runs without numba) in the same alternation.

Run: ``python benchmarks/dedup_bench.py`` (about 1 minute on 2 cores). Needs ``datasketch``.
``--workers N --scale-docs M`` also times ``from_texts`` with ``N`` worker processes on ``M``
documents (the workers are spawned, so each imports this script's top-level imports once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from antimemo.dedup import DuplicateIndex  # noqa: E402
from antimemo.dedup.minhash import (  # noqa: E402
    ShingleConfig,
    band_keys,
    permutations,
    sequence_keys,
    shingle_hashes,
    signatures,
    sketch_chunk,
    text_element_hashes,
)
from antimemo.dedup.normalize import normalized_words  # noqa: E402


def make_corpus(num_docs: int, dup_fraction: float, seed: int) -> tuple[list[str], dict]:
    """Random Zipf-like documents of 100-200 words; a fraction gets near copies with random edits."""
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(50_000)]
    weights = 1.0 / (np.arange(50_000) + 10.0)
    weights /= weights.sum()
    n_base = int(num_docs / (1 + 1.5 * dup_fraction))
    docs = []
    for _ in range(n_base):
        ids = nprng.choice(50_000, size=rng.randint(100, 200), p=weights)
        docs.append([vocab[i] for i in ids])
    texts = [" ".join(d) for d in docs]
    planted = 0
    while len(texts) < num_docs:
        src = docs[rng.randrange(n_base)]
        for _ in range(rng.choice([1, 1, 1, 2, 4])):  # mostly pairs, some larger clusters
            words = list(src)
            for _ in range(rng.choice([0, 1, 2, 3, 4, 5, 6, 8, 10])):  # spread J around the threshold
                op, pos = rng.randrange(3), rng.randrange(len(words))
                if op == 0:
                    words[pos] = vocab[int(nprng.choice(50_000, p=weights))]
                elif op == 1:
                    words.insert(pos, vocab[int(nprng.choice(50_000, p=weights))])
                else:
                    del words[pos]
            text = " ".join(words)
            texts.append(text.upper() if rng.random() < 0.1 else text)  # some case-only changes
            planted += 1
    texts = texts[:num_docs]
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[i] for i in order], {"base_documents": n_base, "planted_copies": planted}


def shingle_strings(text: str, n: int = 5) -> list[str]:
    w = normalized_words(text)
    if len(w) < n:
        return [" ".join(w)] if w else []
    return [" ".join(w[i : i + n]) for i in range(len(w) - n + 1)]


def ground_truth(texts: list[str], threshold: float) -> tuple[dict, list[set]]:
    """Exact Jaccard of every pair that shares a shingle; pairs with J >= threshold."""
    sets = [set(shingle_strings(t)) for t in texts]
    postings = defaultdict(list)
    for d, s in enumerate(sets):
        for sh in s:
            postings[sh].append(d)
    inter = defaultdict(int)
    for docs in postings.values():
        if len(docs) > 1:
            for a, b in combinations(docs, 2):
                inter[(a, b)] += 1
    pairs = {}
    for (a, b), c in inter.items():
        j = c / (len(sets[a]) + len(sets[b]) - c)
        if j >= threshold:
            pairs[(a, b)] = j
    # identical normalised texts with empty shingle sets do not occur here (>= 90 words)
    return pairs, sets


def components(n: int, pairs) -> np.ndarray:
    from antimemo.dedup.clusters import connected_components

    return connected_components(n, np.array(list(pairs), dtype=np.int64).reshape(-1, 2))


def same_cluster_pairs(labels: np.ndarray) -> set:
    out = set()
    groups = defaultdict(list)
    for i, c in enumerate(labels.tolist()):
        groups[c].append(i)
    for members in groups.values():
        out.update(combinations(members, 2))
    return out


def ours_sketch(texts: list[str], cfg: ShingleConfig, chunk: int = 2048) -> np.ndarray:
    keys = [sketch_chunk("text", texts[s : s + chunk], s, cfg)["bands"] for s in range(0, len(texts), chunk)]
    return np.concatenate(keys)


def datasketch_minhash(texts: list[str], perm, num_perm: int, seed: int) -> list:
    from datasketch import MinHash

    out = []
    for t in texts:
        m = MinHash(num_perm=num_perm, seed=seed, permutations=perm, scheme="affine32")
        m.update_batch([s.encode("utf-8") for s in shingle_strings(t)])
        out.append(m)
    return out


def datasketch_candidates(minhashes: list, threshold: float, num_perm: int, weights) -> set:
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=weights)
    for i, m in enumerate(minhashes):
        lsh.insert(i, m)
    cands = set()
    for i, m in enumerate(minhashes):
        for j in lsh.query(m):
            if j != i:
                cands.add((min(i, j), max(i, j)))
    return cands, lsh.b, lsh.r


def check_bit_exact(texts: list[str], num_perm: int, seed: int) -> int:
    """With the same 32-bit shingle hashes, datasketch's signature equals ours."""
    from datasketch import MinHash

    lengths, el = text_element_hashes(texts)
    sh, off = shingle_hashes(el, lengths, 5)
    a, b = permutations(num_perm, seed)
    sig = signatures(sh, off, a, b)
    for d in range(len(texts)):
        m = MinHash(num_perm=num_perm, seed=seed, hashfunc=int, scheme="affine32")
        m.update_batch([int(x) >> 32 for x in sh[off[d] : off[d + 1]]])
        assert np.array_equal(m.hashvalues, sig[d]), f"signature {d} differs from datasketch"
    return len(texts)


def mersenne_signatures(sh: np.ndarray, off: np.ndarray, num_perm: int, seed: int, block: int = 4096) -> np.ndarray:
    """The textbook alternative (not used by antimemo): h -> (a * h + b) mod (2**31 - 1), exact in
    uint64 with Mersenne folding, same blocking as antimemo's ``signatures``; timed for comparison."""
    p = np.uint64((1 << 31) - 1)
    s31 = np.uint64(31)
    rng = np.random.RandomState(seed)
    a = rng.randint(1, (1 << 31) - 1, num_perm).astype(np.uint64)[:, None]
    b = rng.randint(0, (1 << 31) - 1, num_perm).astype(np.uint64)[:, None]
    x = (sh >> np.uint64(32)) % p
    out = np.full((num_perm, off.shape[0] - 1), 0xFFFFFFFF, dtype=np.uint64)
    ends = off[1:]
    i = 0
    while i < off.shape[0] - 1:
        lo = off[i]
        j = max(int(np.searchsorted(ends, lo + block, side="right")), i + 1)
        t = a * x[None, lo : ends[j - 1]] + b  # < 2**62
        t = (t & p) + (t >> s31)
        t = (t & p) + (t >> s31)
        t = np.where(t >= p, t - p, t)
        out[:, i:j] = np.minimum.reduceat(t, off[i:j] - lo, axis=1)
        i = j
    return out.T


def stdlib_docstrings() -> list[str]:
    """Docstrings of modules, classes and functions of the installed standard library (tests excluded)."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "test", "tests", "idle_test"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    out.append(doc)
    return out


def _stage_profile(texts: list[str], cfg: ShingleConfig, repeats: int, chunk: int = 2048) -> dict:
    """Median microseconds per document of each stage of ``sketch_chunk`` (same chunks)."""
    from antimemo.dedup.minhash import _text_content_hashes

    a, b = permutations(cfg.num_perm, cfg.seed)
    stages: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        acc: dict[str, float] = defaultdict(float)
        for s in range(0, len(texts), chunk):
            part = texts[s : s + chunk]
            t0 = time.perf_counter()
            lengths, el = text_element_hashes(part)
            t1 = time.perf_counter()
            _text_content_hashes(part)
            t2 = time.perf_counter()
            sequence_keys(el, lengths)
            t3 = time.perf_counter()
            sh, off = shingle_hashes(el, lengths, cfg.ngram)
            t4 = time.perf_counter()
            sig = signatures(sh, off, a, b)
            t5 = time.perf_counter()
            band_keys(sig, cfg.bands, cfg.rows)
            t6 = time.perf_counter()
            acc["normalise + word hashes"] += t1 - t0
            acc["content hash (BLAKE2b per text)"] += t2 - t1
            acc["exact-duplicate key"] += t3 - t2
            acc["shingle hashes"] += t4 - t3
            acc["signatures (128 permutations)"] += t5 - t4
            acc["band keys"] += t6 - t5
        for k, v in acc.items():
            stages[k].append(v)
    return {k: 1e6 * statistics.median(v) / len(texts) for k, v in stages.items()}


def throughput_by_length(cfg: ShingleConfig, perm, repeats: int) -> dict:
    """antimemo vs datasketch docs/s on short and long stdlib docstrings, timed alternately."""
    from datasketch import MinHash

    from antimemo.dedup import minhash

    kernels = minhash._compiled()
    docs = stdlib_docstrings()
    n_words = [len(d.split()) for d in docs]
    subsets = {
        "short_50_300_words": [d for d, w in zip(docs, n_words) if 50 <= w <= 300] * 5,
        "long_over_300_words": [d for d, w in zip(docs, n_words) if w > 300] * 10,
    }
    out: dict = {"docstrings": len(docs)}
    for name, texts in subsets.items():
        shingles = [[s.encode("utf-8") for s in shingle_strings(t)] for t in texts]
        ours_t, ds_t, ds_text_t, numpy_t = [], [], [], []
        for _ in range(repeats):  # alternate, so that load from other jobs hits both alike
            t0 = time.perf_counter()
            ours_sketch(texts, cfg)
            ours_t.append(time.perf_counter() - t0)
            if kernels is not None:  # the same pipeline on its numpy path (what runs without numba)
                minhash._KERNELS = False
                t0 = time.perf_counter()
                ours_sketch(texts, cfg)
                numpy_t.append(time.perf_counter() - t0)
                minhash._KERNELS = kernels
            t0 = time.perf_counter()
            for sh in shingles:
                MinHash(num_perm=cfg.num_perm, seed=cfg.seed, permutations=perm, scheme="affine32").update_batch(sh)
            ds_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            datasketch_minhash(texts, perm, cfg.num_perm, cfg.seed)
            ds_text_t.append(time.perf_counter() - t0)
        n = len(texts)
        out[name] = {
            "documents": n,
            "distinct_documents": len(set(texts)),
            "mean_words": sum(len(t.split()) for t in texts) / n,
            "mean_shingles": sum(map(len, shingles)) / n,
            "antimemo_text_to_band_keys_docs_per_s": n / statistics.median(ours_t),
            "datasketch_update_batch_only_docs_per_s": n / statistics.median(ds_t),
            "ratio": statistics.median(ds_t) / statistics.median(ours_t),
            "ratio_per_repeat": [d / o for d, o in zip(ds_t, ours_t)],
            "datasketch_from_text_docs_per_s": n / statistics.median(ds_text_t),
            "ratio_vs_datasketch_from_text": statistics.median(ds_text_t) / statistics.median(ours_t),
            "antimemo_us_per_doc_by_stage": _stage_profile(texts, cfg, repeats),
            "antimemo_numpy_path_docs_per_s": n / statistics.median(numpy_t) if numpy_t else None,
            "compiled_vs_numpy_path": statistics.median(numpy_t) / statistics.median(ours_t) if numpy_t else None,
            "datasketch_us_per_doc": 1e6 * statistics.median(ds_t) / n,
        }
    return out


def timed(fn, repeats: int):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=3000)
    p.add_argument("--dup-fraction", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="also time from_texts with this many workers")
    p.add_argument("--scale-docs", type=int, default=40_000, help="corpus size of the workers comparison")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    import datasketch

    from antimemo.dedup.lsh import optimal_params  # scipy: keep it out of the spawned workers' imports

    res: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_1min_at_start": os.getloadavg()[0],
            "python": platform.python_version(),
            "numpy": np.__version__,
            "datasketch": datasketch.__version__,
        }
    }
    # the compiled kernels (numba) are loaded, and compiled if their disk cache is cold, before any
    # timing: the first call's compile time is excluded from every figure and reported here
    from antimemo.dedup import minhash as _minhash

    t0 = time.perf_counter()
    kernels = _minhash._compiled()
    warm_cfg = ShingleConfig(ngram=5, num_perm=args.num_perm, seed=args.seed, bands=1, rows=1)
    ours_sketch(["warm up the kernels", ""], warm_cfg)
    res["machine"]["minhash_kernels"] = f"numba {kernels.numba.__version__}" if kernels else "numpy (numba not installed)"
    res["machine"]["kernel_load_or_compile_s_excluded"] = time.perf_counter() - t0
    texts, corpus = make_corpus(args.docs, args.dup_fraction, args.seed)
    words = sum(len(t.split()) for t in texts)
    res["corpus"] = {"documents": len(texts), "mean_words": words / len(texts), **corpus}
    bands, rows = optimal_params(args.threshold, args.num_perm)
    cfg = ShingleConfig(ngram=5, num_perm=args.num_perm, seed=args.seed, bands=bands, rows=rows)

    # same permutations as datasketch (asserted), same signatures given the same input hashes
    from datasketch import MinHash

    perm = MinHash(num_perm=args.num_perm, seed=args.seed).permutations
    a, b = permutations(args.num_perm, args.seed)
    assert np.array_equal(perm[0], a) and np.array_equal(perm[1], b), "permutations differ from datasketch"
    res["bit_exact_documents_checked"] = check_bit_exact(texts[:50], args.num_perm, args.seed)

    # -------------------------------------------------------------- throughput (text -> signature)
    ours_t, ours_all, keys = timed(lambda: ours_sketch(texts, cfg), args.repeats)
    ds_t, ds_all, mhs = timed(lambda: datasketch_minhash(texts, perm, args.num_perm, args.seed), args.repeats)
    shingles = [[s.encode("utf-8") for s in shingle_strings(t)] for t in texts]

    def ds_only():
        return [MinHash(num_perm=args.num_perm, seed=args.seed, permutations=perm, scheme="affine32")
                .update_batch(s) for s in shingles]

    ds_only_t, ds_only_all, _ = timed(ds_only, args.repeats)
    lengths, el = text_element_hashes(texts)
    sh, off = shingle_hashes(el, lengths, 5)
    sig_t, sig_all, _ = timed(lambda: signatures(sh, off, a, b), args.repeats)
    mer_t, mer_all, _ = timed(lambda: mersenne_signatures(sh, off, args.num_perm, args.seed), args.repeats)
    n = len(texts)
    res["throughput_docs_per_s"] = {
        "antimemo_minhash_from_text": n / ours_t,
        "antimemo_signatures_only": n / sig_t,
        "mersenne31_signatures_only_not_used": n / mer_t,
        "datasketch_minhash_from_text": n / ds_t,
        "datasketch_update_batch_only": n / ds_only_t,
        "ratio_from_text": ds_t / ours_t,
        "ratio_signatures_only": ds_only_t / sig_t,
        "ratio_antimemo_from_text_vs_datasketch_update_batch_only": ds_only_t / ours_t,
        "raw_seconds": {"antimemo_from_text": ours_all, "antimemo_signatures": sig_all,
                        "datasketch_from_text": ds_all, "datasketch_update_batch": ds_only_all},
    }

    res["throughput_by_length_stdlib_docstrings"] = throughput_by_length(cfg, perm, max(args.repeats, 5))

    # -------------------------------------------------------------- end-to-end index builds
    build_t, build_all, idx = timed(lambda: DuplicateIndex.from_texts(texts, progress=False), args.repeats)
    res["index_build"] = {"documents": n, "seconds_num_workers=1": build_t, "docs_per_s_num_workers=1": n / build_t}
    if args.workers > 1:  # on a larger corpus, so that starting the worker processes does not dominate
        big, _ = make_corpus(args.scale_docs, args.dup_fraction, args.seed + 1)
        t1, _, i1 = timed(lambda: DuplicateIndex.from_texts(big, progress=False), 1)
        tw, _, iw = timed(lambda: DuplicateIndex.from_texts(big, progress=False, num_workers=args.workers), 1)
        assert np.array_equal(iw.cluster_ids, i1.cluster_ids), "workers changed the result"
        res["index_build_scaling"] = {
            "documents": len(big),
            "seconds_num_workers=1": t1,
            f"seconds_num_workers={args.workers}": tw,
            "speedup": t1 / tw,
            "note": "includes starting the spawned worker processes (about 1-3 s)",
        }

    # -------------------------------------------------------------- quality
    gt, _ = ground_truth(texts, args.threshold)
    gt_labels = components(n, gt.keys())
    gt_same = same_cluster_pairs(gt_labels)
    pred_same = same_cluster_pairs(idx.cluster_ids)
    cand = set()
    for j in range(keys.shape[1]):
        groups = defaultdict(list)
        for i, k in enumerate(keys[:, j].tolist()):
            groups[k].append(i)
        for members in groups.values():
            cand.update(combinations(members, 2))
    c = idx.cluster_ids
    exact_dupes = {p for p in gt if gt[p] == 1.0}
    ds_default, b0, r0 = datasketch_candidates(mhs, args.threshold, args.num_perm, (0.5, 0.5))
    ds_ours, b1, r1 = datasketch_candidates(mhs, args.threshold, args.num_perm, (0.05, 0.95))
    near = [p for p in gt if gt[p] < 1.0]
    res["quality"] = {
        "ground_truth_pairs_J>=0.8": len(gt),
        "of_which_identical_shingle_sets": len(exact_dupes),
        "lsh_bands_rows": [bands, rows],
        "lsh_candidate_recall": sum(p in cand for p in gt) / len(gt),
        "lsh_candidate_recall_near_only": sum(p in cand for p in near) / max(1, len(near)),
        "cluster_pair_recall": sum(c[i] == c[j] for i, j in gt) / len(gt),
        "pair_precision_vs_true_components": len(pred_same & gt_same) / max(1, len(pred_same)),
        "same_cluster_pairs": len(pred_same),
        "same_cluster_pairs_with_J>=0.8": len(pred_same & set(gt)),
        "datasketch_lsh_default_weights": {"bands_rows": [b0, r0],
                                           "candidate_recall": sum(p in ds_default for p in gt) / len(gt)},
        "datasketch_lsh_weights_0.05_0.95": {"bands_rows": [b1, r1],
                                             "candidate_recall": sum(p in ds_ours for p in gt) / len(gt)},
        "index": {"clusters": idx.num_clusters, "duplicate_fraction": idx.duplicate_fraction, **idx.params["stats"]},
    }

    # -------------------------------------------------------------- memory
    with tempfile.TemporaryDirectory() as d:
        size = idx.save(Path(d) / "idx.npz").stat().st_size
    tracemalloc.start()
    DuplicateIndex.from_texts(texts, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    res["memory_bytes_per_document"] = {
        "saved_index": size / n,
        "build_arrays": 8 + 16 + 8 + 8 * bands + 8 + 8,  # content, exact key, shingle count, band keys, roots
        "text_bytes": sum(len(t.encode()) for t in texts) / n,
        "peak_traced_build_total_MiB": peak / 2**20,
    }
    return res


def _print(res: dict) -> None:
    t = res["throughput_docs_per_s"]
    q = res["quality"]
    m = res["memory_bytes_per_document"]
    print(f"machine: {res['machine']}")
    print(f"corpus: {res['corpus']}")
    print(f"signatures checked bit-exact against datasketch: {res['bit_exact_documents_checked']}")
    print("| 128-permutation MinHash, 1 process | antimemo docs/s | datasketch docs/s | ratio |")
    print("|---|---|---|---|")
    print(f"| text -> signature (normalise, shingle, hash, permute) | {t['antimemo_minhash_from_text']:.0f} | "
          f"{t['datasketch_minhash_from_text']:.0f} | {t['ratio_from_text']:.1f}x |")
    print(f"| shingles -> signature (datasketch: update_batch on shingle bytes) | {t['antimemo_signatures_only']:.0f} | "
          f"{t['datasketch_update_batch_only']:.0f} | {t['ratio_signatures_only']:.1f}x |")
    print(f"| shingles -> signature, (a*h+b) mod 2**31-1 instead of affine32 (not used) | "
          f"{t['mersenne31_signatures_only_not_used']:.0f} | {t['datasketch_update_batch_only']:.0f} | "
          f"{t['mersenne31_signatures_only_not_used'] / t['datasketch_update_batch_only']:.1f}x |")
    print(f"| antimemo text -> signature vs datasketch update_batch only | {t['antimemo_minhash_from_text']:.0f} | "
          f"{t['datasketch_update_batch_only']:.0f} | "
          f"{t['ratio_antimemo_from_text_vs_datasketch_update_batch_only']:.1f}x |")
    by_len = res["throughput_by_length_stdlib_docstrings"]
    print("| stdlib docstrings | docs | words | antimemo text -> band keys docs/s | datasketch update_batch "
          "docs/s | ratio | datasketch from text docs/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("short_50_300_words", "long_over_300_words"):
        r = by_len[name]
        print(f"| {name} | {r['documents']} | {r['mean_words']:.0f} | {r['antimemo_text_to_band_keys_docs_per_s']:.0f} | "
              f"{r['datasketch_update_batch_only_docs_per_s']:.0f} | {r['ratio']:.1f}x | "
              f"{r['datasketch_from_text_docs_per_s']:.0f} | {r['ratio_vs_datasketch_from_text']:.1f}x |")
    for name in ("short_50_300_words", "long_over_300_words"):
        stages = by_len[name]["antimemo_us_per_doc_by_stage"]
        if by_len[name]["antimemo_numpy_path_docs_per_s"]:
            print(f"{name}: antimemo numpy path (no numba) {by_len[name]['antimemo_numpy_path_docs_per_s']:.0f} docs/s; "
                  f"compiled kernels {by_len[name]['compiled_vs_numpy_path']:.2f}x faster (same run, alternating)")
        print(f"{name}: antimemo us/doc by stage " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
              + f"; datasketch {by_len[name]['datasketch_us_per_doc']:.1f} us/doc")
    print(f"index build: {res['index_build']}")
    if "index_build_scaling" in res:
        print(f"index build scaling: {res['index_build_scaling']}")
    print(f"quality: {json.dumps(q, indent=1)}")
    print(f"memory: {m}")


if __name__ == "__main__":
    parser_args = sys.argv[1:]
    results = main(parser_args)
    _print(results)
    out = next((parser_args[i + 1] for i, a in enumerate(parser_args) if a == "--json"), None)
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
