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

Data (``--data``):

- ``gaussian`` (default): embeddings are random unit vectors in ``--dim`` dimensions (Gaussian,
  seeded), queries are noisy copies of random reference rows (so the true neighbour is known)
  mixed with fresh random vectors. The worst case for a cell index: no cluster structure.
- ``digits``: real, clustered image features from the diffusion recipe's own digit classifier,
  :class:`antimemo.diffusion.features.DigitsFeatures` (trained on construction, offline, seeded;
  ``image_size=16`` as in ``recipes/diffusion_ddpm.yaml``, ``--num-features`` wide, default 128).
  Built by :func:`make_digits_data`, precisely:

  1. The 1797 scikit-learn digits (:func:`antimemo.diffusion.data.load_digits_images` at 16x16)
     are split by a seeded permutation into ``--holdout`` (297) *held-out* digits and 1500
     *in-set* digits. The held-out digits never enter the reference set.
  2. Reference set, ``R`` rows: row ``j`` is a seeded random *reference augmentation* of the
     in-set digit ``source[j]``, every in-set digit equally often in a shuffled order (``R / 1500``
     augmentations each, rounded: 66-67 at 100k, 666-667 at 1M; at ``R >= 1500`` every in-set
     digit is present). Reference augmentation
     (:data:`REFERENCE_AUGMENT`), in batched torch ops (``affine_grid`` + ``grid_sample``,
     bilinear, zero padding), each draw uniform: rotation +-6 degrees, scale 1 +- 0.06, shift
     +-0.5 pixel (of 16) on each axis, then contrast x(1 +- 0.10), brightness +- 0.03, Gaussian
     pixel noise sigma 0.02, clamped to [0, 1].
  3. Queries, ``--queries`` (1000): the first half are *replicas*: a *light augmentation*
     (:data:`LIGHT_AUGMENT`: rotation +-3 degrees, scale 1 +- 0.03, shift +-0.25 pixel,
     contrast x(1 +- 0.05), brightness +- 0.02, noise sigma 0.01; fresh random draws, so never
     a pixel copy of a reference row) of a random in-set digit, i.e. a near copy of an image whose augmentations
     are in the reference set. The second half are *non-replicas*: the same light augmentation
     of a random held-out digit (same distribution of handwriting, but the image itself is not
     in the reference set; its nearest reference rows are other digits, often of the same
     class and writer style, so this is a hard negative set).
  4. Embedding: the images go through the classifier in batches of 16384 under
     ``torch.no_grad`` (tqdm progress bar on stderr). ``--layer features`` (default) takes the
     penultimate layer (``num_features`` dims, post-ReLU: what ``DigitsFeatures.forward``
     returns); ``--layer conv`` takes its 512-d convolutional feature map (the flattened
     ``32 x 4 x 4`` input of that layer, more instance-specific, and 512-d like SSCD). The
     features are then centred by the mean of the reference rows (post-ReLU features all lie
     in the positive orthant, where unrelated images still score cosine ~0.7; centring brings
     unrelated pairs to ~0) and L2-normalised: cosine = inner product.

  The threshold of the replica recall for ``digits`` is :data:`DIGITS_THRESHOLD` (0.99 for
  ``features``, 0.97 for ``conv``: about the 95th percentile of the non-replica half's exact
  top-1 cosine at R = 20000; the two halves overlap, the classifier's penultimate features
  most, since a classifier maps same-class digits together); the run also reports the median exact top-1 cosine of each half, the
  fraction of each half above the threshold, and how often the exact and the approximate top-1
  is an augmentation of the query's own source digit (``*_same_source``). Because the reference
  set is built from augmentations of only 1500 images, it is far more clustered than a real
  large image collection.

Run: ``python benchmarks/replica_bench.py`` (default sizes 100000 and 1000000, dim 256, 5
repeats; several minutes on 2 cores). ``--sizes 100000`` for a quick run.
``python benchmarks/replica_bench.py --data digits --sizes 20000 --repeats 1 --hnsw-max 0`` for a
quick run on digits features.
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


#: replica threshold (exact top-1 cosine) of the ``digits`` data per ``--layer``: about the 95th
#: percentile of the non-replica half's top-1 cosine at R = 20000 (a ~5% false-positive rate),
#: chosen from the measured distributions (see the module docstring and docs/benchmarks.md)
DIGITS_THRESHOLD = {"features": 0.99, "conv": 0.97}
#: reference augmentation: rotation (degrees), scale, shift (pixels), contrast, brightness, noise sigma
REFERENCE_AUGMENT = {"rotate": 6.0, "scale": 0.06, "shift": 0.5, "contrast": 0.10, "brightness": 0.03, "noise": 0.02}
#: light augmentation of the queries (replicas and non-replicas alike)
LIGHT_AUGMENT = {"rotate": 3.0, "scale": 0.03, "shift": 0.25, "contrast": 0.05, "brightness": 0.02, "noise": 0.01}


def augment_digits(
    x: torch.Tensor, g: torch.Generator, *, rotate: float, scale: float, shift: float,
    contrast: float, brightness: float, noise: float,
) -> torch.Tensor:
    """Random affine jitter + contrast/brightness + pixel noise of ``[B, 1, S, S]`` images in ``[0, 1]``.

    Each image gets its own draws (uniform in ``+-rotate`` degrees, ``1 +- scale``, ``+-shift``
    pixels per axis, contrast ``x(1 +- contrast)``, brightness ``+- brightness``), then Gaussian
    noise of std ``noise``; the result is clamped to ``[0, 1]``. Batched: one ``affine_grid`` +
    ``grid_sample``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> augment_digits(torch.rand(4, 1, 16, 16), g, **LIGHT_AUGMENT).shape
        torch.Size([4, 1, 16, 16])
    """
    import math

    b, size = x.shape[0], x.shape[-1]

    def u() -> torch.Tensor:
        return torch.rand(b, generator=g) * 2 - 1

    angle, zoom = u() * math.radians(rotate), 1 + u() * scale
    tx, ty = u() * shift * 2 / size, u() * shift * 2 / size  # affine_grid's coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    y = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    c, br = 1 + u() * contrast, u() * brightness
    y = y * c.view(b, 1, 1, 1) + br.view(b, 1, 1, 1) + noise * torch.randn(y.shape, generator=g)
    return y.clamp(0, 1)


def make_digits_data(
    num_ref: int,
    num_queries: int = 1000,
    *,
    num_features: int = 128,
    layer: str = "features",
    holdout: int = 297,
    image_size: int = 16,
    batch_size: int = 16384,
    seed: int = 0,
    progress: bool = True,
    extractor: torch.nn.Module | None = None,
) -> dict:
    """Reference and query embeddings from :class:`DigitsFeatures` (construction: module docstring).

    Returns a dict: ``reference`` ``[R, D]`` and ``queries`` ``[Q, D]`` unit rows (centred by the
    reference mean, then L2-normalised), ``reference_source`` ``[R]`` and ``query_source``
    ``[Q]`` (the digit, a row of the 1797, each image was augmented from), ``is_replica`` ``[Q]``
    (the first ``Q // 2``: their source digit is in the reference set; the rest are held-out
    digits), ``feature_s`` (seconds to augment and embed the reference rows), ``classifier_accuracy``.
    ``extractor``: a prebuilt ``DigitsFeatures`` (default: one is trained, seeded by ``seed``).

    Example:
        >>> d = make_digits_data(200, 10, num_features=16, progress=False)
        >>> tuple(d["reference"].shape), tuple(d["queries"].shape), int(d["is_replica"].sum())
        ((200, 16), (10, 16), 5)
    """
    from tqdm import tqdm

    from antimemo.diffusion.data import load_digits_images
    from antimemo.diffusion.features import DigitsFeatures

    if layer not in ("features", "conv"):
        raise ValueError(f"layer must be 'features' or 'conv', got {layer!r}")
    images, _ = load_digits_images(image_size)
    n = images.shape[0]
    if not 1 <= holdout < n:
        raise ValueError(f"holdout must be in [1, {n - 1}] (digits kept out of the reference set), got {holdout}")
    f = extractor if extractor is not None else DigitsFeatures(image_size=image_size, num_features=num_features, seed=seed)
    f.eval()
    embed = f.body[:-2] if layer == "conv" else f  # conv: the flattened 32 x 4 x 4 map before the feature layer
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    held, kept = perm[:holdout], perm[holdout:]
    # every in-set digit equally often (floor or ceil of R / kept), in a shuffled order
    ref_source = kept[torch.randperm(num_ref, generator=g) % kept.numel()]
    half = num_queries // 2
    query_source = torch.cat([
        kept[torch.randint(0, kept.numel(), (half,), generator=g)],
        held[torch.randint(0, held.numel(), (num_queries - half,), generator=g)],
    ])
    t = time.perf_counter()
    with torch.no_grad():
        dim = int(embed(images[:1]).shape[1])
        ref = torch.empty(num_ref, dim)
        for s in tqdm(range(0, num_ref, batch_size), desc=f"digits features R={num_ref}", disable=not progress):
            e = min(num_ref, s + batch_size)
            ref[s:e] = embed(augment_digits(images[ref_source[s:e]], g, **REFERENCE_AUGMENT))
        queries = embed(augment_digits(images[query_source], g, **LIGHT_AUGMENT))
        mean = ref.mean(0)
        for s in range(0, num_ref, batch_size):  # in place, in blocks: bounded temporary memory
            ref[s:s + batch_size] = torch.nn.functional.normalize(ref[s:s + batch_size] - mean, dim=1)
        queries = torch.nn.functional.normalize(queries - mean, dim=1)
    is_replica = torch.zeros(num_queries, dtype=torch.bool)
    is_replica[:half] = True
    return {"reference": ref, "queries": queries, "reference_source": ref_source, "query_source": query_source,
            "is_replica": is_replica, "feature_s": time.perf_counter() - t, "classifier_accuracy": f.accuracy}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(num_ref: int, args: argparse.Namespace) -> dict:
    import faiss

    digits = args.data == "digits"
    if digits:
        d = make_digits_data(num_ref, args.queries, num_features=args.num_features, layer=args.layer,
                             seed=args.seed, extractor=args.extractor)
        ref, queries = d["reference"], d["queries"]
        row: dict = {"data": "digits", "layer": args.layer, "num_features": args.num_features,
                     "reference": num_ref, "queries": args.queries, "dim": int(ref.shape[1]),
                     "reference_mb": round(ref.numel() * 4 / 2**20, 1), "feature_s": round(d["feature_s"], 1),
                     "classifier_accuracy": round(d["classifier_accuracy"], 4)}
    else:
        ref, queries, src = make_data(num_ref, args.queries, args.dim, args.seed)
        row = {"reference": num_ref, "queries": args.queries, "dim": args.dim,
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
    threshold = args.threshold if args.threshold is not None else (DIGITS_THRESHOLD[args.layer] if digits else 0.5)
    if digits:
        # planted neighbour = any augmentation of the query's own source digit
        ref_src, q_src, rep_half = d["reference_source"], d["query_source"], d["is_replica"]

        def same_source(idx: torch.Tensor) -> float:
            return float((ref_src[idx[rep_half, 0]] == q_src[rep_half]).float().mean())

        top = st[:, 0]
        row["threshold"] = threshold
        for name, part in (("replica_half", top[rep_half]), ("nonreplica_half", top[~rep_half])):
            q = torch.quantile(part, torch.tensor([0.01, 0.05, 0.5, 0.95, 0.99])).tolist()
            row[f"{name}_top1_cos_q01_q05_median_q95_q99"] = [round(v, 4) for v in q]
            row[f"{name}_above_threshold"] = float((part >= threshold).float().mean())
        row["same_source_flat"] = same_source(i_f)
    else:
        row["planted_found_flat"] = float((i_f[:half, 0] == src).float().mean())
    # IVF: k-means cells; a replica lies in one of the few probed cells. "replica recall" counts the
    # queries whose exact top-1 cosine is >= --threshold (the replica decision) and asks whether
    # IVF returns the same top-1 for them.
    replica = st[:, 0] >= threshold
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
        if digits:
            # the replica *decision*: IVF's top-1 also scores >= threshold (any near copy will do)
            s_v = (queries[replica] * ref[i_v[replica, 0]]).sum(1)
            row[f"ivf_np{nprobe}_replica_decision_recall"] = float((s_v >= threshold).float().mean())
            row[f"ivf_np{nprobe}_same_source"] = same_source(i_v)
        else:
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
            if digits:
                row[f"hnsw_ef{ef}_same_source"] = same_source(i_h)
            else:
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
    p.add_argument("--threshold", type=float, default=None,
                   help="cosine of a replica (for the IVF replica recall; default 0.5 for gaussian, "
                        f"{DIGITS_THRESHOLD['features']} (--layer features) or {DIGITS_THRESHOLD['conv']} (--layer conv) for digits)")
    p.add_argument("--data", choices=["gaussian", "digits"], default="gaussian",
                   help="gaussian: random unit vectors (--dim); digits: DigitsFeatures embeddings of augmented digits")
    p.add_argument("--num-features", type=int, default=128, help="digits: DigitsFeatures feature width (--layer features)")
    p.add_argument("--classifier-epochs", type=int, default=15, help="digits: DigitsFeatures training passes (the recipe's 15)")
    p.add_argument("--layer", choices=["features", "conv"], default="features",
                   help="digits: penultimate features (num_features dims) or the 512-d conv feature map")
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
    args.extractor = None
    if args.data == "digits":  # train the digits classifier once, shared by every size
        from antimemo.diffusion.features import DigitsFeatures

        t = time.perf_counter()
        args.extractor = DigitsFeatures(image_size=16, num_features=args.num_features, epochs=args.classifier_epochs,
                                        seed=args.seed)
        env["classifier_train_s"] = round(time.perf_counter() - t, 1)
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
