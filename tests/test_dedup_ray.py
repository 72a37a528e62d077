"""The Ray dedup engine on a local 2-CPU Ray cluster: equal clusters to the local engine on a sharded
corpus (JSONL + Parquet + txt), the index file with DuplicateIndex.load and DedupSampling, the
distributed connected components on tricky graphs, atomic output under failures, the CLI."""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from antimemo.dedup import DuplicateIndex, dataset_content_hashes
from antimemo.dedup import cli as dedup_cli
from antimemo.dedup.clusters import UnionFind, canonical_cluster_ids
from antimemo.dedup.components import ray_star_components, star_components
from antimemo.dedup.ray_engine import CLUSTERS_DIR, INDEX_FILE, MANIFEST, build_index_ray
from antimemo.dedup.shards import expand_inputs, scan_file

VOCAB = [f"w{i}" for i in range(4000)]


def _corpus(n: int, seed: int = 0) -> list[str]:
    """Random texts with planted near copies (a few words replaced: J about 0.7-0.95, around the
    0.8 threshold), exact copies after normalisation (upper case, extra spaces), empty and short texts."""
    rng = random.Random(seed)
    docs: list[str] = []
    for _ in range(n):
        r = rng.random()
        recent = [d for d in docs[-40:] if len(d.split()) >= 20]
        if recent and r < 0.15:
            words = rng.choice(recent).split()
            for _ in range(rng.randint(1, max(1, len(words) // 20))):
                words[rng.randrange(len(words))] = rng.choice(VOCAB)
            docs.append(" ".join(words))
        elif recent and r < 0.2:
            docs.append("  ".join(rng.choice(recent).upper().split()))
        elif r < 0.21:
            docs.append("")
        elif r < 0.23:
            docs.append(" ".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 4))))  # shorter than one shingle
        else:
            docs.append(" ".join(rng.choice(VOCAB) for _ in range(rng.randint(20, 150))))
    return docs


def _write_shards(d, docs):
    """Four shards in document order: JSONL, Parquet (several row groups), txt, JSONL."""
    d.mkdir(parents=True, exist_ok=True)
    n = len(docs)
    a, b, c = n // 4, n // 2, 3 * n // 4
    with open(d / "s0.jsonl", "w") as f:
        for t in docs[:a]:
            f.write(json.dumps({"id": 0, "text": t}) + "\n")
    pq.write_table(pa.table({"text": docs[a:b]}), d / "s1.parquet", row_group_size=101)
    (d / "s2.txt").write_text("\n".join(docs[b:c]) + "\n")
    with open(d / "s3.jsonl", "w") as f:
        for t in docs[c:]:
            f.write(json.dumps({"text": t}) + "\n")
    return [str(d / "s0.jsonl"), str(d / "s1.parquet"), str(d / "s2.txt"), str(d / "s3.jsonl")]


DOCS = _corpus(1200)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with 2 worker CPUs and a 300 MB object store, shut down after the module."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 2**20, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def built(ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    files = _write_shards(d / "shards", DOCS)
    out = d / "out"
    index = build_index_ray([str(d / "shards" / "s0.jsonl"), str(d / "shards" / "s[12].*"), files[3]], out,
                            num_workers=2, chunk_size=128, progress=False)
    return files, out, index


def test_clusters_equal_the_local_engine(built):
    files, out, index = built
    local = DuplicateIndex.from_texts(DOCS, progress=False)
    # the corpus exercises every path: exact copies, verified near copies, rejected candidates, empty docs
    stats = local.params["stats"]
    assert stats["exact_duplicate_examples"] > 20 and stats["pairs_merged"] > 20
    assert stats["pairs_verified"] > stats["pairs_merged"] and stats["empty_examples"] > 0
    assert index.num_examples == len(DOCS)
    np.testing.assert_array_equal(index.cluster_ids, local.cluster_ids)
    assert index.fingerprint == local.fingerprint
    np.testing.assert_array_equal(index.content_hashes, local.content_hashes)
    rs = index.params["stats"]
    for key in ("exact_duplicate_examples", "empty_examples", "lsh_buckets", "candidate_examples"):
        assert rs[key] == stats[key], key
    assert index.params["engine"] == "ray" and index.params["bands"] == local.params["bands"]


def test_parquet_shards_and_index_file(built):
    _, out, index = built
    shards = sorted((out / CLUSTERS_DIR).glob("part-*.parquet"))
    assert len(shards) >= 2  # sharded output
    table = pa.concat_tables([pq.read_table(p) for p in shards])
    doc = table.column("doc").to_numpy()
    cluster = table.column("cluster").to_numpy()
    order = np.argsort(doc)
    doc, cluster = doc[order], cluster[order]
    np.testing.assert_array_equal(doc, np.arange(len(DOCS)))
    assert (cluster <= doc).all() and (cluster[cluster] == cluster).all()  # the smallest member is the id
    np.testing.assert_array_equal(canonical_cluster_ids(cluster), index.cluster_ids)
    loaded = DuplicateIndex.load(out / INDEX_FILE)
    np.testing.assert_array_equal(loaded.cluster_ids, index.cluster_ids)
    loaded.check_matches(dataset_content_hashes("text", DOCS))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["num_examples"] == len(DOCS) and manifest["shards"] == [p.name for p in shards]
    assert not list(out.parent.glob(".out.tmp-*"))  # the temporary directory was renamed away


def test_token_ids_and_dedup_sampling_fit(ray_cluster, tmp_path):
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch import nn
    from torch.utils.data import DataLoader

    from antimemo.callbacks.dedup import DedupSampling

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 500, 24).tolist() for _ in range(30)]
    rows += [list(rows[i]) for i in (0, 1, 2)]  # exact copies
    for i in (3, 4):  # near copies: the last token changes 1 of 20 shingles (J = 0.90)
        rows.append(rows[i][:-1] + [501])
    with open(tmp_path / "a.jsonl", "w") as f:
        for r in rows[:17]:
            f.write(json.dumps({"input_ids": r}) + "\n")
    pq.write_table(pa.table({"input_ids": rows[17:]}), tmp_path / "b.parquet")
    out = tmp_path / "out"
    index = build_index_ray(str(tmp_path / "*.*"), out, num_workers=2, progress=False)
    local = DuplicateIndex.from_token_ids(rows, progress=False)
    assert index.kind == "tokens" and local.num_clusters == 30
    np.testing.assert_array_equal(index.cluster_ids, local.cluster_ids)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": torch.tensor(rows[i]), "idx": i}

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(502, 4), nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.head(self.emb(batch["input_ids"]).mean(1)).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return DataLoader(Rows(), batch_size=4, shuffle=True)

    class Recorder(Callback):
        seen: list = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.extend(batch["idx"].tolist())

    rec = Recorder()
    cb = DedupSampling(str(out / INDEX_FILE), policy="drop", progress=False)  # fingerprint checked at fit start
    pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
               callbacks=[cb, rec]).fit(Tiny())
    assert sorted(rec.seen) == list(range(30))  # one example per cluster: the copies 30..34 never train


def _graphs():
    rng = np.random.default_rng(1)
    n = 3000
    perm = rng.permutation(n)
    chain = np.stack([perm[:-1], perm[1:]], axis=1)  # one long path through shuffled ids
    star = np.stack([np.full(n - 1, 1777), np.delete(np.arange(n), 1777)], axis=1)  # hub in the middle
    comb = np.concatenate([np.stack([np.arange(0, 1000, 2), np.arange(1, 1000, 2)], 1),
                           np.stack([np.arange(1, 999, 2), np.arange(2, 1000, 2)], 1)])  # a zig-zag chain
    two_centres = np.array([[10, 1], [10, 2], [11, 2], [11, 3], [12, 3]])  # leaves shared by several centres
    random_sparse = rng.integers(0, n, size=(2500, 2))
    return {"chain": (n, chain), "star": (n, star), "comb": (n, comb), "centres": (n, two_centres),
            "random": (n, random_sparse), "empty": (5, np.zeros((0, 2), dtype=np.int64))}


def _union_find_roots(n, edges):
    uf = UnionFind()
    for u, v in edges.tolist():
        uf.union(u, v)
    return np.array([uf.find(i) for i in range(n)])


def _labels(n, stars):
    lab = np.arange(n)
    lab[stars[:, 0]] = stars[:, 1]
    return lab


@pytest.mark.parametrize("name", ["chain", "star", "comb", "centres", "random", "empty"])
def test_star_components_equal_union_find(name):
    n, edges = _graphs()[name]
    expected = _union_find_roots(n, edges)  # the root is the smallest member
    for parts in (1, 3):
        stars, _ = star_components(edges, parts=parts)
        np.testing.assert_array_equal(_labels(n, stars), expected)


def test_ray_components_equal_union_find(ray_cluster):
    for name, (n, edges) in _graphs().items():
        e = np.asarray(edges, dtype=np.int64)
        e = e[e[:, 0] != e[:, 1]]
        e = np.stack([e.max(1), e.min(1)], 1)
        refs = [ray.put(part) for part in np.array_split(e, 3)]
        star_refs, rounds = ray_star_components(refs, parts=2, progress=False)
        stars = np.concatenate(ray.get(star_refs))
        assert stars.shape[0] == len(set(stars[:, 0].tolist()))  # one edge per non-root member
        np.testing.assert_array_equal(_labels(n, stars), _union_find_roots(n, edges), err_msg=name)
        if name == "chain":
            assert rounds >= 3  # a long path needs several rounds: the loop really iterates


def test_worker_failure_leaves_no_output_and_rerun_succeeds(ray_cluster, tmp_path):
    docs = DOCS[:300]
    files = _write_shards(tmp_path / "c", docs)
    good = (tmp_path / "c" / "s3.jsonl").read_text()
    lines = good.splitlines()
    lines[5] = '{"text": "unterminated'
    (tmp_path / "c" / "s3.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"line 6 of .*s3\.jsonl.* is not valid JSON"):
        build_index_ray(files, out, num_workers=2, chunk_size=64, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "c"]  # no half-written output, no temp dir
    (tmp_path / "c" / "s3.jsonl").write_text(good)
    index = build_index_ray(files, out, num_workers=2, chunk_size=64, progress=False)
    np.testing.assert_array_equal(index.cluster_ids, DuplicateIndex.from_texts(docs, progress=False).cluster_ids)


def test_driver_failure_after_shards_leaves_no_output(ray_cluster, tmp_path, monkeypatch):
    files = _write_shards(tmp_path / "c", DOCS[:200])
    out = tmp_path / "out"

    def disk_full(self, path):
        assert (path.parent / CLUSTERS_DIR).is_dir()  # the Parquet shards were written before the failure
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(DuplicateIndex, "save", disk_full)
        with pytest.raises(OSError, match="No space left"):
            build_index_ray(files, out, num_workers=2, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "c"]
    first = build_index_ray(files, out, num_workers=2, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    # a rerun on the finished directory is a no-op that returns the same index
    again = build_index_ray(files, out, num_workers=2, progress=False)
    np.testing.assert_array_equal(again.cluster_ids, first.cluster_ids)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(FileExistsError, match="other inputs or parameters"):
        build_index_ray(files, out, num_workers=2, threshold=0.7, progress=False)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match="not a finished Ray dedup output"):
        build_index_ray(files, tmp_path / "other", progress=False)


def test_inputs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_inputs(str(tmp_path / "*.jsonl"))
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(ValueError, match="named twice"):
        expand_inputs([str(tmp_path / "a.txt"), str(tmp_path / "*.txt")])
    (tmp_path / "b.csv").write_text("x\n")
    with pytest.raises(ValueError, match="unsupported input file"):
        expand_inputs(str(tmp_path / "b.csv"))
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="has no field 'text' or 'input_ids'"):
        scan_file(tmp_path / "c.jsonl", None, 10)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="no column 'text' or 'input_ids'"):
        scan_file(tmp_path / "d.parquet", None, 10)
    with pytest.raises(ValueError, match="no column 'body2'"):
        scan_file(tmp_path / "d.parquet", "body2", 10)
    with pytest.raises(ValueError, match="threshold must be"):
        build_index_ray(str(tmp_path / "a.txt"), tmp_path / "o", threshold=1.5)


def test_read_piece_rows_subset(tmp_path):
    from antimemo.dedup.shards import read_piece

    files = _write_shards(tmp_path, DOCS[:400])
    for f in files:
        for piece in scan_file(f, None, 37)["pieces"]:
            full = read_piece(piece)
            assert len(full) == piece["rows"]
            rows = list(range(0, piece["rows"], 3))
            assert read_piece(piece, rows=rows) == [full[i] for i in rows]
    pieces = [p for f in files for p in scan_file(f, None, 37)["pieces"]]
    assert [t for p in pieces for t in read_piece(p)] == DOCS[:400]  # document order across shards


def test_address_refused_when_ray_already_runs(ray_cluster, tmp_path):
    (tmp_path / "a.txt").write_text("x y z\n")
    with pytest.raises(ValueError, match="Ray is already running in this process"):
        build_index_ray(str(tmp_path / "a.txt"), tmp_path / "out", address="auto", progress=False)
    assert not (tmp_path / "out").exists()


def test_mixed_kinds_refused(ray_cluster, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    (tmp_path / "b.txt").write_text("some text\n")
    with pytest.raises(ValueError, match="mix texts and token ids"):
        build_index_ray(str(tmp_path / "*.*"), tmp_path / "out", num_workers=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_engine_ray_with_progress(built, tmp_path, capsys):
    files, _, index = built
    out = tmp_path / "cli_out"
    rc = dedup_cli.main([files[0], files[1], files[2], files[3], "--engine", "ray", "--out", str(out),
                         "--num-workers", "2", "--chunk_size", "200", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["engine"] == "ray" and summary["clusters_dir"] == str(out / CLUSTERS_DIR)
    assert summary["clusters"] == index.num_clusters
    assert summary["examples"] == len(DOCS) and summary["duplicate_fraction"] == index.duplicate_fraction
    np.testing.assert_array_equal(DuplicateIndex.load(out / INDEX_FILE).cluster_ids, index.cluster_ids)
    # the driver's tqdm bars follow the workers: every stage reaches its total
    assert "dedup[ray]: minhash (text): 100%" in captured.err and f"{len(DOCS)}/{len(DOCS)}" in captured.err
    for stage in ("exact duplicates", "LSH buckets", "verifying candidates", "connected components", "writing clusters"):
        assert f"dedup[ray]: {stage}" in captured.err
    rc = dedup_cli.main([files[0], "--engine", "ray", "--out", str(out), "--no_progress"])
    assert rc == 2 and "other inputs or parameters" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--engine", "spark"], "--engine must be one of ['local', 'ray'], got 'spark'"),
        (["--address", "auto"], "--address 'auto' joins a Ray cluster: it needs --engine ray"),
        (["--engine", "ray", "--num_workers", "0"], "num_workers must be"),
        (["--engine", "ray", "--threshold", "2"], "threshold must be a Jaccard similarity in (0, 1), got 2.0"),
    ],
)
def test_cli_bad_values(tmp_path, capsys, argv, message):
    (tmp_path / "a.txt").write_text("x y z\n")
    rc = dedup_cli.main([str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_local_engine_takes_one_source_and_ray_needs_a_directory(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x y z\n")
    (tmp_path / "b.txt").write_text("x y z\n")
    rc = dedup_cli.main([str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out", str(tmp_path / "i.npz")])
    assert rc == 2 and "with --engine ray" in capsys.readouterr().err
    rc = dedup_cli.main([str(tmp_path / "a.txt"), "--engine", "ray", "--out", str(tmp_path / "i.npz")])
    assert rc == 2 and "--out is a directory" in capsys.readouterr().err


def test_cli_unreachable_address_fails_fast(tmp_path, capsys):
    import socket

    (tmp_path / "a.txt").write_text("x y z\n")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    was_running = ray.is_initialized()
    if was_running:  # the engine joins only when this process has no Ray yet
        ray.shutdown()
    try:
        rc = dedup_cli.main([str(tmp_path / "a.txt"), "--engine", "ray", "--address", f"127.0.0.1:{port}",
                             "--out", str(tmp_path / "o")])
    finally:
        if was_running:
            ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 2**20)
    err = capsys.readouterr().err
    assert rc == 2 and f"could not join the Ray cluster at address='127.0.0.1:{port}': nothing answers" in err
    assert "ray start --head" in err and not (tmp_path / "o").exists()


def test_cli_without_ray_names_the_extra(tmp_path, capsys, monkeypatch):
    (tmp_path / "a.txt").write_text("x y z\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if it were not installed
    rc = dedup_cli.main([str(tmp_path / "a.txt"), "--engine", "ray", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == ("antimemo dedup: error: the Ray dedup engine (antimemo dedup --engine ray) needs ray, which "
                           "is not installed: pip install 'antimemo[ray]'")
