"""DuplicateIndex: summary, fingerprint checks, pickle-free save/load, the ``dedup`` CLI verb."""

import argparse
import hashlib
import io
import json

import numpy as np
import pytest

from antimemo.dedup import CorruptIndexError, DuplicateIndex, dataset_content_hashes
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
        assert sorted(z.files) == ["cluster_ids", "content_hashes", "integrity", "metadata"]
        assert z["cluster_ids"].dtype == np.int64 and z["metadata"].dtype.kind == "U"
        meta = json.loads(str(z["metadata"][()]))
        integrity = json.loads(str(z["integrity"][()]))
        # the digest of each array is SHA-256 over its name, dtype, shape and bytes
        h = hashlib.sha256()
        h.update(b"antimemo.dedup.integrity/1\0cluster_ids\0<i8\0[6]\0")
        h.update(z["cluster_ids"].tobytes())
        assert integrity["arrays"]["cluster_ids"] == {"dtype": "<i8", "shape": [6], "sha256": h.hexdigest()}
        assert sorted(integrity["arrays"]) == ["cluster_ids", "content_hashes", "metadata"]
    assert meta["format"] == "antimemo.dedup.DuplicateIndex/2" and meta["fingerprint"] == idx.fingerprint
    # an index without content hashes round-trips too
    plain = DuplicateIndex.load(DuplicateIndex([0, 0, 1]).save(tmp_path / "plain.npz"))
    assert plain.cluster_ids.tolist() == [0, 0, 1] and plain.fingerprint is None


def _arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _write(path, arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    return path


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:
        np.savez(f, cluster_ids=np.array([0, 1]), metadata=np.array([{"format": "x"}], dtype=object))
    with pytest.raises(CorruptIndexError, match="not a valid antimemo index.*contains pickled Python objects"):
        DuplicateIndex.load(path)


def _flip(data, at):
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


CORRUPT = r"not a valid antimemo index \(truncated/corrupt\): '.*{name}'.*rebuild it: `antimemo dedup"


@pytest.mark.parametrize(
    "name, damage",
    [
        ("truncated.npz", lambda data: data[: len(data) // 2]),
        ("cut_tail.npz", lambda data: data[:-7]),
        ("empty.npz", lambda data: b""),
        ("random.npz", lambda data: bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
        ("flipped.npz", lambda data: _flip(data, data.index(b"\x93NUMPY") + 140)),  # a cluster id byte: bad CRC
    ],
)
def test_damaged_files_give_one_clear_error(tmp_path, name, damage):
    good = DuplicateIndex.from_texts(TEXTS, progress=False).save(tmp_path / "good.npz")
    bad = tmp_path / name
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(CorruptIndexError, match=CORRUPT.format(name=name)):
        DuplicateIndex.load(bad)
    assert issubclass(CorruptIndexError, ValueError)


def test_load_detects_foreign_edited_and_malformed_files(tmp_path):
    other = _write(tmp_path / "other.npz", {"a": np.zeros(3)})
    with pytest.raises(CorruptIndexError, match=r"not a valid antimemo index \(not a DuplicateIndex file\).*holds the arrays \['a'\]"):
        DuplicateIndex.load(other)
    lone = tmp_path / "lone.npy"
    np.save(lone, np.zeros(3))
    with pytest.raises(CorruptIndexError, match="single .npy array"):
        DuplicateIndex.load(lone)
    with pytest.raises(FileNotFoundError, match="no DuplicateIndex file"):
        DuplicateIndex.load(tmp_path / "missing.npz")
    with pytest.raises(IsADirectoryError, match="is a directory, not a DuplicateIndex file"):
        DuplicateIndex.load(tmp_path)
    path = DuplicateIndex.from_texts(TEXTS, progress=False).save(tmp_path / "idx.npz")
    good = _arrays(path)
    assert DuplicateIndex.load(_write(tmp_path / "resaved.npz", good)).cluster_ids.tolist() == [0, 0, 1, 0, 2, 1]
    modified = r"not a valid antimemo index \(modified after it was saved\).*{what}"
    # edited cluster ids: same dtype and shape, valid labels; only the digest tells
    edited = dict(good, cluster_ids=np.array([0, 1, 1, 0, 2, 1], dtype=np.int64))
    with pytest.raises(CorruptIndexError, match=modified.format(what=r"\['cluster_ids'\] do not match")):
        DuplicateIndex.load(_write(tmp_path / "edited_ids.npz", edited))
    # reordered content hashes (a fingerprint mismatch, caught first by the digest)
    edited = dict(good, content_hashes=good["content_hashes"][::-1].copy())
    with pytest.raises(CorruptIndexError, match=modified.format(what=r"\['content_hashes'\] do not match")):
        DuplicateIndex.load(_write(tmp_path / "edited_hashes.npz", edited))
    # an edited metadata string
    meta = json.loads(str(good["metadata"][()]))
    meta["params"]["threshold"] = 0.5
    edited = dict(good, metadata=np.array(json.dumps(meta, sort_keys=True)))
    with pytest.raises(CorruptIndexError, match=modified.format(what=r"\['metadata'\] do not match")):
        DuplicateIndex.load(_write(tmp_path / "edited_meta.npz", edited))
    # a missing array, an extra array, a missing integrity record
    missing = {k: v for k, v in good.items() if k != "content_hashes"}
    with pytest.raises(CorruptIndexError, match=modified.format(what=r"missing arrays \['content_hashes'\]")):
        DuplicateIndex.load(_write(tmp_path / "missing_array.npz", missing))
    with pytest.raises(CorruptIndexError, match=modified.format(what=r"unexpected arrays \['extra'\]")):
        DuplicateIndex.load(_write(tmp_path / "extra.npz", dict(good, extra=np.zeros(2))))
    no_record = {k: v for k, v in good.items() if k != "integrity"}
    with pytest.raises(CorruptIndexError, match=r"\(no integrity record\)"):
        DuplicateIndex.load(_write(tmp_path / "no_record.npz", no_record))
    with pytest.raises(CorruptIndexError, match=r"\(bad integrity record\)"):
        DuplicateIndex.load(_write(tmp_path / "bad_record.npz", dict(good, integrity=np.array("{}"))))


def _with_digest(arrays):
    """Arrays plus a matching integrity record: what a writer that means harm or has a bug could produce."""
    from antimemo.dedup.index import _integrity_record

    body = {k: v for k, v in arrays.items() if k != "integrity"}
    return dict(body, integrity=np.array(json.dumps(_integrity_record(body), sort_keys=True)))


def test_load_checks_dtypes_shapes_and_metadata_even_with_a_matching_digest(tmp_path):
    path = DuplicateIndex.from_texts(TEXTS, progress=False).save(tmp_path / "idx.npz")
    good = _arrays(path)
    cases = [
        ({"cluster_ids": good["cluster_ids"][:4]}, r"\(bad content_hashes\).*one entry per example \(4,\)"),
        ({"cluster_ids": good["cluster_ids"].astype(np.float64)}, r"\(bad cluster_ids\).*int64"),
        ({"cluster_ids": np.array([0, -1, 1, 0, 2, 1])}, r"\(bad cluster_ids\).*negative"),
        ({"content_hashes": good["content_hashes"].astype(np.int64)}, r"\(bad content_hashes\).*uint64"),
        ({"metadata": np.array(["a", "b"])}, r"\(bad metadata\).*JSON string"),
        ({"metadata": np.array("not json")}, r"\(bad metadata\).*not a JSON object"),
    ]
    meta = json.loads(str(good["metadata"][()]))
    for key, value in (("format", "other/1"), ("kind", "audio"), ("num_examples", 7)):
        m = dict(meta, **{key: value})
        what = {"format": r"\(unknown format\)", "kind": r"\(bad metadata\).*kind 'audio'",
                "num_examples": r"\(metadata does not match the arrays\).*says 7 examples"}[key]
        cases.append(({"metadata": np.array(json.dumps(m))}, what))
    for change, pattern in cases:
        bad = _write(tmp_path / "bad.npz", _with_digest(dict(good, **change)))
        with pytest.raises(CorruptIndexError, match=pattern):
            DuplicateIndex.load(bad)


def test_files_of_the_previous_format_are_refused_with_the_rebuild_command(tmp_path):
    path = DuplicateIndex.from_texts(TEXTS, progress=False).save(tmp_path / "idx.npz")
    good = _arrays(path)
    meta = json.loads(str(good["metadata"][()]))
    old = {"cluster_ids": good["cluster_ids"], "content_hashes": good["content_hashes"],
           "metadata": np.array(json.dumps(dict(meta, format="antimemo.dedup.DuplicateIndex/1"), sort_keys=True))}
    with pytest.raises(
        CorruptIndexError,
        match=r"format 'antimemo.dedup.DuplicateIndex/1' has no integrity digest.*rebuild it: `antimemo dedup <data> "
        r"--out <path>` or `DuplicateIndex.from_texts",
    ):
        DuplicateIndex.load(_write(tmp_path / "v1.npz", old))


def test_failed_save_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = DuplicateIndex.from_texts(TEXTS, progress=False).save(tmp_path / "idx.npz")
    before = path.read_bytes()
    real_savez = np.savez

    def disk_full(f, **arrays):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        DuplicateIndex([0, 1, 2]).save(path)
    monkeypatch.setattr(np, "savez", real_savez)
    assert path.read_bytes() == before
    assert DuplicateIndex.load(path).cluster_ids.tolist() == [0, 0, 1, 0, 2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx.npz"]  # no temporary file left behind
    # a successful save replaces the file
    DuplicateIndex([0, 1, 2]).save(path)
    assert DuplicateIndex.load(path).num_examples == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx.npz"]


def test_save_to_a_directory_names_the_path_and_the_fix(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError, match=r"cannot write the file '.*out': a directory of that name exists; pass a file path"):
        DuplicateIndex([0, 1]).save(tmp_path / "out")


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
    assert _run([str(src), "--out", str(out), "--no_progress"]) == 0
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
    assert _run([str(src), "--out", str(tmp_path / "i.npz"), "--no_progress", "--json"]) == 0
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
    assert _run([str(recipe), "--out", str(tmp_path / "r.npz"), "--no_progress"]) == 0
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


def test_cli_recipe_preview_is_decoded_text(tmp_path, capsys):
    """A recipe's DataModule decoder (TextDataModule.tokenizer.decode) turns the preview into text."""
    from antimemo.lm.data import TextDataModule

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  seq_len: 32\n  num_train: 40\n  num_holdout: 8\n  duplicates: 2\n  duplicate_copies: 3\n")
    assert _run([str(recipe), "--out", str(tmp_path / "r.npz"), "--no_progress"]) == 0
    printed = capsys.readouterr().out
    dm = TextDataModule(seq_len=32, num_train=40, num_holdout=8, duplicates=2, duplicate_copies=3)
    dm.setup("fit")
    text = " ".join(dm.tokenizer.decode(dm.train_dataset[0]["input_ids"]).split())
    assert "previews decoded with TextDataModule.tokenizer.decode" in printed
    line = next(x for x in printed.splitlines() if x.startswith("  cluster 0 example 0: "))
    assert repr(text)[:60] in line
    ids = " ".join(str(int(v)) for v in dm.train_dataset[0]["input_ids"][:5])
    assert ids not in line  # text, not token ids


def test_cli_tokens_without_decoder_say_the_preview_is_ids(tmp_path, capsys):
    src = tmp_path / "tokens.jsonl"
    rows = [{"input_ids": [1, 2, 3, 4, 5, 6]}, {"input_ids": [9, 9, 9]}, {"input_ids": [1, 2, 3, 4, 5, 6]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _run([str(src), "--out", str(tmp_path / "i.npz"), "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "previews are token ids: the source has no decoder" in printed
    assert "cluster 0 example 0: 1 2 3 4 5 6" in printed
