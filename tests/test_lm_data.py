"""Byte tokenizer, embedded corpus and TextDataModule: round trips, determinism, disjoint split."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from antimemo.lm import (
    BYTE_PAD_ID,
    BYTE_VOCAB_SIZE,
    ByteTokenizer,
    TextDataModule,
    byte_decode,
    chunk_ids,
    load_text,
    pydoc_topics_paragraphs,
)

# ----------------------------------------------------------------------------- tokenizer


def test_vocab_constants():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id) == (257, 256) == (BYTE_VOCAB_SIZE, BYTE_PAD_ID)


def test_encode_is_utf8_bytes():
    tok = ByteTokenizer()
    # "é" is U+00E9 = UTF-8 0xC3 0xA9 = 195, 169
    assert tok.encode("aé") == [97, 195, 169]
    assert tok.encode("") == []


@pytest.mark.parametrize("text", ["", "hello world", "naïve café", "数学 ∑ 🐟\n\ttabs", "\x00\x7f"])
def test_round_trip_examples(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(torch.tensor(tok.encode(text), dtype=torch.long)) == text
    assert byte_decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_property(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_decode_skips_pad_and_rejects_bad_ids():
    tok = ByteTokenizer()
    assert tok.decode([104, BYTE_PAD_ID, 105, BYTE_PAD_ID]) == "hi"
    with pytest.raises(ValueError, match="257"):
        tok.decode([104, 257])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_decode_invalid_utf8_replaces_or_raises():
    tok = ByteTokenizer()
    assert tok.decode([0xFF]) == "\ufffd"  # a model can emit an invalid byte sequence
    with pytest.raises(UnicodeDecodeError):
        tok.decode([0xFF], errors="strict")


# ----------------------------------------------------------------------------- corpus


def test_pydoc_corpus_is_embedded_and_deterministic():
    paras = pydoc_topics_paragraphs()
    assert len(paras) > 1000
    assert all(p.strip() and "\n\n" not in p for p in paras)
    text = load_text("pydoc_topics")
    assert text == "\n\n".join(paras) == load_text("pydoc_topics")
    assert len(text.encode("utf-8")) > 200_000


def test_load_text_user_file(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("my own text ü", encoding="utf-8")
    assert load_text(str(f)) == "my own text ü"
    with pytest.raises(ValueError, match="no such file"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))


def test_chunk_ids_hand_example():
    # 7 ids, rows of 3: [0,1,2], [3,4,5]; the tail [6] is dropped.
    assert chunk_ids(list(range(7)), 3).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert chunk_ids([1, 2], 3).shape == (0, 3)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2, got 1"):
        chunk_ids([1, 2, 3], 1)


# ----------------------------------------------------------------------------- data module


def _rows(t: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in t.tolist()}


def test_split_is_deterministic_disjoint_and_sized():
    a = TextDataModule(seq_len=64, num_train=300, num_holdout=100, seed=0)
    b = TextDataModule(seq_len=64, num_train=300, num_holdout=100, seed=0)
    tr_a, ho_a = a.build_split()
    tr_b, ho_b = b.build_split()
    assert tr_a.shape == (300, 64) and ho_a.shape == (100, 64)
    assert tr_a.dtype == torch.long
    assert torch.equal(tr_a, tr_b) and torch.equal(ho_a, ho_b)
    # no training sequence is also a held-out sequence, and no row repeats within a split
    assert _rows(tr_a).isdisjoint(_rows(ho_a))
    assert len(_rows(tr_a)) == 300 and len(_rows(ho_a)) == 100
    # a different seed gives a different split
    tr_c, ho_c = TextDataModule(seq_len=64, num_train=300, num_holdout=100, seed=1).build_split()
    assert not torch.equal(tr_a, tr_c)
    assert not torch.equal(ho_a, ho_c)


def test_rows_are_verbatim_corpus_bytes():
    data = load_text("pydoc_topics").encode("utf-8")
    aligned = {data[i : i + 64] for i in range(0, len(data) - 63, 64)}  # non-overlapping 64-byte chunks
    train, holdout = TextDataModule(seq_len=64, num_train=20, num_holdout=20).build_split()
    for row in torch.cat([train, holdout]).tolist():
        assert bytes(row) in aligned


def test_holdout_fixed_when_train_grows_and_none_takes_the_rest():
    _, ho_small = TextDataModule(num_train=10, num_holdout=50).build_split()
    tr_big, ho_big = TextDataModule(num_train=500, num_holdout=50).build_split()
    assert torch.equal(ho_small, ho_big)
    tr_all, ho_all = TextDataModule(num_train=None, num_holdout=50).build_split()
    assert torch.equal(ho_all, ho_big)
    assert torch.equal(tr_all[:500], tr_big)
    assert _rows(tr_all).isdisjoint(_rows(ho_all))


def test_duplicate_rows_are_removed_before_splitting(tmp_path):
    # rows of 4 bytes: aaaa bbbb aaaa cccc dddd eeee -> 5 distinct rows ("aaaa" twice)
    f = tmp_path / "dup.txt"
    f.write_text("aaaabbbbaaaaccccddddeeee")
    dm = TextDataModule(corpus=str(f), seq_len=4, num_train=3, num_holdout=2, batch_size=2)
    train, holdout = dm.build_split()
    assert _rows(train).isdisjoint(_rows(holdout))
    assert _rows(train) | _rows(holdout) == {tuple(s.encode()) for s in ("aaaa", "bbbb", "cccc", "dddd", "eeee")}
    # asking for 6 sequences fails with the real count
    with pytest.raises(ValueError, match="only 5 distinct sequences"):
        TextDataModule(corpus=str(f), seq_len=4, num_train=4, num_holdout=2).build_split()


def test_dataloaders_yield_dict_batches_deterministically():
    def first_epoch(dm):
        dm.setup("fit")
        return [b["input_ids"].clone() for b in dm.train_dataloader()]

    dm1 = TextDataModule(seq_len=64, num_train=40, num_holdout=12, batch_size=16, seed=3)
    dm2 = TextDataModule(seq_len=64, num_train=40, num_holdout=12, batch_size=16, seed=3)
    b1, b2 = first_epoch(dm1), first_epoch(dm2)
    assert [b.shape for b in b1] == [torch.Size([16, 64]), torch.Size([16, 64]), torch.Size([8, 64])]
    assert all(torch.equal(x, y) for x, y in zip(b1, b2))
    # the training loader shuffles: the first epoch is a permutation of the train set, not its order
    seen = torch.cat(b1)
    assert _rows(seen) == _rows(dm1.train_dataset.input_ids)
    assert not torch.equal(seen, dm1.train_dataset.input_ids)
    # the validation loader keeps dataset order
    val = torch.cat([b["input_ids"] for b in dm1.val_dataloader()])
    assert torch.equal(val, dm1.val_dataset.input_ids)
    item = dm1.train_dataset[0]
    assert set(item) == {"input_ids"} and item["input_ids"].dtype == torch.long  # example_ids=False (default)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 1}, "seq_len must be an integer >= 2, got 1"),
        ({"num_train": 0}, "num_train must be an integer >= 1, got 0"),
        ({"num_holdout": 0}, "num_holdout must be an integer >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"corpus": "no/such/file.txt"}, "no/such/file.txt"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule(**kwargs)


def test_duplicates_repeat_training_sequences_and_example_ids():
    plain = TextDataModule(seq_len=64, num_train=20, num_holdout=8, seed=1)
    dup = TextDataModule(seq_len=64, num_train=20, num_holdout=8, seed=1, duplicates=3, duplicate_copies=5, example_ids=True)
    plain.setup()
    dup.setup()
    ids = dup.train_dataset.input_ids
    assert len(dup.train_dataset) == 20 + 3 * 4
    # the first 20 rows are the plain split; the 3 duplicated rows occur 5 times each, the rest once
    assert torch.equal(ids[:20], plain.train_dataset.input_ids)
    assert torch.equal(dup.duplicated_dataset.input_ids, ids[:3])
    counts = [int((ids == row).all(1).sum()) for row in ids[:20]]
    assert counts == [5, 5, 5] + [1] * 17
    assert torch.equal(dup.val_dataset.input_ids, plain.val_dataset.input_ids)  # held-out set unchanged
    assert dup.train_dataset[25]["example_id"] == 25 and "example_id" not in dup.val_dataset[0]
    assert plain.duplicated_dataset is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"duplicates": -1}, "duplicates must be an integer >= 0, got -1"),
        ({"duplicate_copies": 1}, "duplicate_copies must be an integer >= 2, got 1"),
        ({"duplicates": 30, "num_train": 20}, "duplicates=30 exceeds num_train=20"),
    ],
)
def test_bad_duplicate_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule(**{"num_holdout": 8, **kwargs})
