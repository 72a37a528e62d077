"""DuplicateIndex: summary, fingerprint checks, pickle-free save/load, the ``dedup`` CLI verb."""

import argparse
import io
import json
import zipfile

import numpy as np
import pytest

from antimemo.dedup import DuplicateIndex, dataset_content_hashes
from antimemo.dedup import cli as dedup_cli
from antimemo.dedup.normalize import content_hash, fingerprint

TEXTS = ["alpha beta gamma", "Alpha  BETA gamma", "delta", "alpha beta gamma", "epsilon", "delta"]


def test_canonical_ids_sizes_and_summary_by_hand():
    idx = DuplicateIndex([7, 3, 7, 9, 7, 3])
    # clusters in order of first example: 7 -> 0, 3 -> 1, 9 -> 2
    assert idx.cluster_ids.tolist() == [0, 1, 0, 2, 0, 1]
    assert idx.cluster_sizes.tolist() == [3, 2, 1]
    s = idx.summary(top_k=5)
    assert s["examples"] == 6 and s["clusters"] == 3
    assert s["duplicate_fraction"] == pytest.approx(0.5)  # (6 - 3) / 6: three examples are extra copies
    assert s["examples_in_duplicate_clusters"] == 5  # 3 + 2
    assert s["largest_clusters"] == [
        {"cluster": 0, "size": 3, "first_examples": [0, 2, 4]},
        {"cluster": 1, "size": 2, "first_examples": [1, 5]},
    ]
    assert idx.example_weights().tolist() == pytest.approx([1 / 3, 1 / 2, 1 / 3, 1.0, 1 / 3, 1 / 2])
    assert "duplicate fraction: 0.5000" in idx.format_summary()
    assert idx.fingerprint is None and idx.kind == "custom"
    with pytest.raises(ValueError, match="non-empty 1-D integer array"):
        DuplicateIndex([])
    with pytest.raises(ValueError, match="one entry per example"):
        DuplicateIndex([0, 1], content_hashes=[1])


def test_fingerprint_is_over_raw_content_in_order():
    idx = DuplicateIndex.from_texts(TEXTS, progress=False)
    hashes = [content_hash(t.encode()) for t in TEXTS]
    assert idx.content_hashes.tolist() == hashes
    assert idx.fingerprint == fingerprint(hashes)
    assert idx.cluster_ids.tolist() == [0, 0, 1, 0, 2, 1]
    idx.check_matches(dataset_content_hashes("text", TEXTS))  # the same data: no error
    with pytest.raises(ValueError, match="has 6 examples but the dataset has 5"):
        idx.check_matches(dataset_content_hashes("text", TEXTS[:5]))
    changed = list(TEXTS)
    changed[3] = "alpha beta gamma!"
    with pytest.raises(ValueError, match="example 3 differs"):
        idx.check_matches(dataset_content_hashes("text", changed))
    swapped = [TEXTS[1], TEXTS[0], *TEXTS[2:]]  # same examples, other order
    with pytest.raises(ValueError, match="example 0 differs"):
        idx.check_matches(dataset_content_hashes("text", swapped))


def test_save_load_round_trip_without_pickle(tmp_path):
    idx = DuplicateIndex.from_texts(TEXTS, progress=False)
    path = idx.save(tmp_path / "sub" / "index")  # no suffix is added, parents are created
    assert path == tmp_path / "sub" / "index" and path.is_file()
    back = DuplicateIndex.load(path)
    assert np.array_equal(back.cluster_ids, idx.cluster_ids)
    assert np.array_equal(back.cluster_sizes, idx.cluster_sizes)
    assert np.array_equal(back.content_hashes, idx.content_hashes)
    assert back.fingerprint == idx.fingerprint and back.kind == "text" and back.params == idx.params
    # the file is plain numpy arrays: readable with allow_pickle=False, metadata is a JSON string
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["cluster_ids", "content_hashes", "metadata"]
        assert z["cluster_ids"].dtype == np.int64 and z["metadata"].dtype.kind == "U"
        meta = json.loads(str(z["metadata"][()]))
    assert meta["format"] == "antimemo.dedup.DuplicateIndex/1" and meta["fingerprint"] == idx.fingerprint
    # an index without content hashes round-trips too
    plain = DuplicateIndex.load(DuplicateIndex([0, 0, 1]).save(tmp_path / "plain.npz"))
    assert plain.cluster_ids.tolist() == [0, 0, 1] and plain.fingerprint is None


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:
        np.savez(f, cluster_ids=np.array([0, 1]), metadata=np.array([{"format": "x"}], dtype=object))
    with pytest.raises(ValueError, match="contains pickled Python objects"):
        DuplicateIndex.load(path)


def test_load_detects_foreign_and_corrupted_files(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(ValueError, match="not an antimemo DuplicateIndex file"):
        DuplicateIndex.load(other)
    with pytest.raises(FileNotFoundError, match="no DuplicateIndex file"):
        DuplicateIndex.load(tmp_path / "missing.npz")
    # edit the content hashes but not the metadata: the stored fingerprint no longer matches
    path = DuplicateIndex.from_texts(TEXTS, progress=False).save(tmp_path / "idx.npz")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["content_hashes"] = arrays["content_hashes"][::-1].copy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (tmp_path / "edited.npz").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="is corrupted"):
        DuplicateIndex.load(tmp_path / "edited.npz")
    assert zipfile.is_zipfile(path)


def test_bytes_per_example_on_disk(tmp_path):
    n = 20_000
    idx = DuplicateIndex(np.arange(n) // 2, content_hashes=np.arange(n, dtype=np.uint64))
    size = idx.save(tmp_path / "big.npz").stat().st_size
    # int64 cluster id + uint64 content hash = 16 bytes per example, plus a small header
    assert 16 * n <= size < 16 * n + 4096


# ----------------------------------------------------------------------------------- CLI


def _run(argv):
    parser = dedup_cli.add_arguments(argparse.ArgumentParser(prog="antimemo dedup"))
    return dedup_cli.run(parser.parse_args(argv))


def test_cli_text_file(tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "index.npz"
    assert _run([str(src), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "examples: 6" in printed and "clusters: 3" in printed and "duplicate fraction: 0.5000" in printed
    assert "cluster 0: size 3, examples [0, 1, 3]" in printed
    assert "alpha beta gamma" in printed  # a preview of the largest cluster
    idx = DuplicateIndex.load(out)
    assert idx.cluster_ids.tolist() == [0, 0, 1, 0, 2, 1]
    assert idx.fingerprint == DuplicateIndex.from_texts(TEXTS, progress=False).fingerprint


def test_cli_jsonl_tokens_and_json_output(tmp_path, capsys):
    src = tmp_path / "tokens.jsonl"
    rows = [{"input_ids": [1, 2, 3, 4, 5, 6]}, {"input_ids": [9, 9, 9]}, {"input_ids": [1, 2, 3, 4, 5, 6]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _run([str(src), "--out", str(tmp_path / "i.npz"), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "tokens" and summary["examples"] == 3 and summary["clusters"] == 2


@pytest.mark.parametrize(
    "data_section",
    [
        "data:\n  seq_len: 32\n  num_train: 40\n  num_holdout: 8\n",  # the antimemo CLI's default DataModule
        "data:\n  class_path: antimemo.lm.data.TextDataModule\n"  # LightningCLI subclass mode
        "  init_args:\n    seq_len: 32\n    num_train: 40\n    num_holdout: 8\n",
    ],
)
def test_cli_recipe(tmp_path, capsys, data_section):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed_everything: 0\n" + data_section)
    assert _run([str(recipe), "--out", str(tmp_path / "r.npz"), "--no-progress"]) == 0
    assert "kind: tokens" in capsys.readouterr().out
    from antimemo.lm.data import TextDataModule

    dm = TextDataModule(seq_len=32, num_train=40, num_holdout=8)
    dm.setup("fit")
    idx = DuplicateIndex.load(tmp_path / "r.npz")
    # the index belongs to the recipe's training set, in order
    idx.check_matches(dataset_content_hashes("tokens", [dm.train_dataset[i]["input_ids"] for i in range(40)]))


def test_cli_errors(tmp_path, capsys):
    assert _run([str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "no such file or recipe" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {}\n")
    assert _run([str(bad), "--out", str(tmp_path / "x.npz")]) == 2
    assert "has no 'data:' section" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert _run([str(empty), "--out", str(tmp_path / "x.npz")]) == 2
    assert "is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --out is required
        _run([str(empty)])
