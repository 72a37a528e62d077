"""ShardedReplicaIndex: sharded FAISS replica search, built locally or by Ray workers (antimemo.replica_index)."""

from __future__ import annotations

import json
from pathlib import Path

import faiss  # antimemo[dedup] and antimemo[ray] are in the test extra: never skipped
import numpy as np
import pytest
import ray

from antimemo.replica_index import (
    ClusteredRows,
    CorruptShardError,
    NpyRows,
    ShardedReplicaIndex,
    default_factory,
    merge_topk,
)

DIM = 16


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return ClusteredRows(num_rows=6000, dim=DIM, clusters=40, spread=0.6, seed=1).read(0, 6000)


@pytest.fixture(scope="module")
def queries(rows: np.ndarray) -> np.ndarray:
    """Noisy copies of 100 reference rows (replica-like queries), unit norm."""
    rng = np.random.default_rng(7)
    q = rows[rng.choice(len(rows), 100, replace=False)] + 0.03 * rng.standard_normal((100, DIM)).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(rows: np.ndarray, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(DIM) if metric == "ip" else faiss.IndexFlatL2(DIM)
    index.add(rows)
    return index.search(queries, k)


def recall_at(ids: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ids, truth)]))


@pytest.fixture(scope="module")
def ivfpq_local(rows: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> ShardedReplicaIndex:
    return ShardedReplicaIndex.build(
        rows, tmp_path_factory.mktemp("local"), num_shards=2, index="IVF32,PQ8x6", train_size=4000, seed=3, progress=False
    )


# ------------------------------------------------------------------------------------ correctness


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_sharded_flat_topk_equals_one_exact_index(rows, queries, tmp_path, metric):
    index = ShardedReplicaIndex.build(rows, tmp_path, num_shards=4, index="Flat", metric=metric, progress=False)
    assert index.num_shards == 4 and index.ntotal == len(rows)
    assert [s["rows"] for s in index.manifest["shards"]] == [1500] * 4
    d, i = index.search(queries, k=10)
    want_d, want_i = exact_topk(rows, queries, 10, metric)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(d, want_d, rtol=1e-5, atol=1e-5)
    # global ids: every shard contributes, not only the first
    assert len({int(x) // 1500 for x in i[:, 0]}) == 4


def test_ivfpq_recall_at_10_above_floor_and_rises_with_nprobe(rows, queries, ivfpq_local):
    _, truth = exact_topk(rows, queries, 10, "ip")
    low = recall_at(ivfpq_local.search(queries, 10, nprobe=1)[1], truth)
    high = recall_at(ivfpq_local.search(queries, 10, nprobe=32)[1], truth)
    assert high >= 0.6, f"IVF-PQ recall@10 {high:.3f} at nprobe=32 is below the floor 0.6"
    assert high > low
    # the replica question: the noisy copy's exact top-1 is found in the top-10 nearly always
    ids = ivfpq_local.search(queries, 10, nprobe=32)[1]
    assert np.mean([truth[r, 0] in ids[r] for r in range(len(queries))]) >= 0.9
    # compressed: 6 bits x 8 codes + an 8-byte id per vector, far below 64 bytes of floats
    assert ivfpq_local.bytes_per_vector() < 64


def test_shards_share_one_trained_quantizer(ivfpq_local):
    digests = {s["trained"] for s in ivfpq_local.manifest["shards"]}
    assert len(digests) == 1
    a, b = (faiss.downcast_index(faiss.extract_index_ivf(s)) for s in ivfpq_local.shards)
    np.testing.assert_array_equal(faiss.vector_to_array(a.pq.centroids), faiss.vector_to_array(b.pq.centroids))


def test_ray_engine_with_two_workers_writes_the_same_index(rows, queries, ivfpq_local, tmp_path):
    # address="local": a private 2-worker instance, even if another job runs a Ray cluster on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2, log_to_driver=False)
    try:
        remote = ShardedReplicaIndex.build(
            rows, tmp_path, num_shards=2, index="IVF32,PQ8x6", train_size=4000, seed=3, engine="ray", progress=False
        )
        # a source read by the workers themselves (memory-mapped .npy parts)
        np.save(tmp_path / "part-0.npy", rows[:2500])
        np.save(tmp_path / "part-1.npy", rows[2500:])
        from_files = ShardedReplicaIndex.build(
            str(tmp_path / "part-*.npy"), tmp_path / "npy", num_shards=2, index="IVF32,PQ8x6", train_size=4000, seed=3,
            engine="ray", progress=False,
        )
    finally:
        ray.shutdown()
    assert remote.manifest["engine"] == "ray"
    for a, b, c in zip(ivfpq_local.manifest["shards"], remote.manifest["shards"], from_files.manifest["shards"]):
        assert a["sha256"] == b["sha256"] == c["sha256"]
    for got in (remote, from_files):
        d, i = got.search(queries, 10, nprobe=4)
        want_d, want_i = ivfpq_local.search(queries, 10, nprobe=4)
        np.testing.assert_array_equal(i, want_i)
        np.testing.assert_array_equal(d, want_d)


def test_save_load_round_trip(ivfpq_local, queries, tmp_path):
    ivfpq_local.save(tmp_path / "copy")
    loaded = ShardedReplicaIndex.load(tmp_path / "copy")
    assert (loaded.factory, loaded.metric, loaded.dim, loaded.ntotal) == ("IVF32,PQ8x6", "ip", DIM, 6000)
    for a, b in zip(ivfpq_local.search(queries, 5, nprobe=8), loaded.search(queries, 5, nprobe=8)):
        np.testing.assert_array_equal(a, b)
    assert json.loads((tmp_path / "copy" / "manifest.json").read_text())["shards"] == ivfpq_local.manifest["shards"]


def test_merge_topk_orders_ties_by_id_and_pads_missing():
    d, i = merge_topk([np.array([[0.5, 0.2]]), np.array([[0.5, -np.inf]])], [np.array([[9, 4]]), np.array([[2, -1]])], k=4, metric="ip")
    assert i.tolist() == [[2, 9, 4, -1]]
    d, i = merge_topk([np.array([[0.1]]), np.array([[0.3]])], [np.array([[5]]), np.array([[1]])], k=3, metric="l2")
    assert i.tolist() == [[5, 1, -1]] and d[0, 2] == np.inf


def test_npy_and_generator_like_sources_match_the_array(rows, tmp_path):
    np.save(tmp_path / "a.npy", rows[:1000])
    np.save(tmp_path / "b.npy", rows[1000:2500])
    src = NpyRows([tmp_path / "a.npy", tmp_path / "b.npy"])
    assert src.num_rows == 2500
    np.testing.assert_array_equal(src.read(900, 1100), rows[900:1100])
    gen = ClusteredRows(num_rows=6000, dim=DIM, clusters=40, spread=0.6, seed=1)
    np.testing.assert_array_equal(gen.read(4321, 6000), rows[4321:])
    a = ShardedReplicaIndex.build(rows[:2500], tmp_path / "x", num_shards=3, index="Flat", progress=False, chunk_size=333)
    b = ShardedReplicaIndex.build(src, tmp_path / "y", num_shards=3, index="Flat", progress=False)
    assert [s["sha256"] for s in a.manifest["shards"]] == [s["sha256"] for s in b.manifest["shards"]]


def test_default_factory():
    assert default_factory(10_000_000, 64) == "IVF12649,PQ32"
    assert default_factory(1000, 12) == "IVF25,PQ6"
    assert default_factory(1000, 14) == "IVF25,PQ7"
    assert default_factory(100, 3) == "IVF2,PQ1"


# ----------------------------------------------------------------------------------------- errors


def test_corrupt_modified_and_foreign_shards_are_refused(rows, ivfpq_local, tmp_path):
    root = ivfpq_local.save(tmp_path / "idx")
    shard = root / "shard-00001.faiss"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="shard 1 .*SHA-256.*modified or truncated"):
        ShardedReplicaIndex.load(root)
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(CorruptShardError, match="shard 1 .*SHA-256"):
        ShardedReplicaIndex.load(root)
    shard.unlink()
    with pytest.raises(CorruptShardError, match="shard 1 file 'shard-00001.faiss' is missing"):
        ShardedReplicaIndex.load(root)

    # a shard of an index trained with another seed, its checksum updated: distances would not be comparable
    other = ShardedReplicaIndex.build(rows, tmp_path / "other", num_shards=2, index="IVF32,PQ8x6", train_size=1000, seed=4, progress=False)
    foreign = (tmp_path / "other" / "shard-00001.faiss").read_bytes()
    shard.write_bytes(foreign)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = other.manifest["shards"][1]["sha256"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptShardError, match="trained quantizer/codebooks differ"):
        ShardedReplicaIndex.load(root)

    manifest["dim"] = DIM * 2
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptShardError, match="dimension 16 != 32"):
        ShardedReplicaIndex.load(root)
    (root / "manifest.json").write_text('{"format": "antimemo-sharded')
    with pytest.raises(CorruptShardError, match="not valid JSON"):
        ShardedReplicaIndex.load(root)
    with pytest.raises(CorruptShardError, match="manifest.json is missing"):
        ShardedReplicaIndex.load(tmp_path / "nothing")


class _FailingRows:
    """A source whose reads fail past row 3000 (an interrupted job)."""

    num_rows, dim = 6000, DIM

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def read(self, start: int, stop: int) -> np.ndarray:
        if stop > 3000:
            raise OSError("storage went away")
        return self.rows[start:stop]


def test_an_interrupted_build_leaves_no_loadable_index(rows, tmp_path):
    with pytest.raises(OSError, match="storage went away"):
        ShardedReplicaIndex.build(_FailingRows(rows), tmp_path, num_shards=2, index="Flat", progress=False, chunk_size=1000)
    assert not (tmp_path / "manifest.json").exists()
    assert (tmp_path / "shard-00000.faiss").exists()  # the finished shard, written atomically
    with pytest.raises(CorruptShardError, match="build interrupted"):
        ShardedReplicaIndex.load(tmp_path)


class _WrongShape(_FailingRows):
    def read(self, start: int, stop: int) -> np.ndarray:
        return self.rows[start:stop, :8]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_shards": 0}, ValueError, "num_shards must be an integer >= 1, got 0"),
        ({"num_shards": 7000}, ValueError, "num_shards=7000 exceeds the 6000 rows"),
        ({"engine": "spark"}, ValueError, "engine must be 'local' or 'ray', got 'spark'"),
        ({"address": "auto"}, ValueError, "address='auto' joins a Ray cluster, so it needs engine='ray'"),
        ({"metric": "cosine"}, ValueError, "metric must be 'ip'"),
        ({"index": "HNSW32"}, ValueError, "index must be a FAISS factory string .* got 'HNSW32'"),
        ({"index": "IVF8,PQ5"}, ValueError, "PQ5 needs the dimension 16 to be a multiple of 5"),
        ({"index": "IVF64,PQ4", "train_size": 100}, ValueError, "train_size=100 is too small .* at least 256 rows"),
        ({"index": "IVF8,Flat", "train_size": 9000}, ValueError, "train_size=9000 exceeds the 6000 rows"),
        ({"seed": -1}, ValueError, "seed must be an integer >= 0, got -1"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be an integer >= 1"),
    ],
)
def test_bad_build_arguments_are_named(rows, tmp_path, kwargs, error, match):
    args = {"num_shards": 2, "index": "Flat", "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        ShardedReplicaIndex.build(rows, tmp_path, **args)


def test_bad_sources_and_queries_are_named(rows, queries, tmp_path):
    with pytest.raises(TypeError, match="vectors_source must be a float array"):
        ShardedReplicaIndex.build({"a": 1}, tmp_path, num_shards=1, progress=False)
    with pytest.raises(ValueError, match="matches no file"):
        ShardedReplicaIndex.build(str(tmp_path / "none-*.npy"), tmp_path, num_shards=1, progress=False)
    with pytest.raises(ValueError, match=r"read\(0, 6000\) returned shape \(6000, 8\), expected \(6000, 16\)"):
        ShardedReplicaIndex.build(_WrongShape(rows), tmp_path / "w", num_shards=1, index="Flat", progress=False, chunk_size=6000)
    bad = rows.copy()
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        ShardedReplicaIndex.build(bad, tmp_path / "nan", num_shards=1, index="Flat", progress=False)
    index = ShardedReplicaIndex.build(rows, tmp_path / "ok", num_shards=2, index="Flat", progress=False)
    with pytest.raises(FileExistsError, match="already holds an index"):
        ShardedReplicaIndex.build(rows, tmp_path / "ok", num_shards=2, index="Flat", progress=False)
    with pytest.raises(ValueError, match="queries have 8 dims but the index holds 16-d vectors"):
        index.search(queries[:, :8], 5)
    with pytest.raises(ValueError, match="nprobe=4 applies to IVF indexes, but this index is 'Flat'"):
        index.search(queries, 5, nprobe=4)
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        index.search(queries, 0)
    assert Path(tmp_path / "ok" / "manifest.json").exists()
