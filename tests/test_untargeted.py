"""Untargeted extraction: the training-set TokenIndex, the UntargetedExtraction metric, nv-recall
and the prompt kinds.

The index is checked against brute force on random documents (both sorting algorithms), the
metric on hand-made generations with planted training spans whose rate, coverage, distinct
count, longest match and nv-recall are known exactly, and under 2-process gloo DDP against the
single-process result.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import zipfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from antimemo.functional import nv_recall, sample_generate, untargeted_prompts
from antimemo.functional.untargeted import nv_recall_blocks
from antimemo.metrics import UntargetedExtraction
from antimemo.suffix_index import TokenIndex

ALGORITHMS = ("numpy", "divsufsort")


# ---------------------------------------------------------------------------------------- index
def _occurrences(docs: list[list[int]], span: list[int]) -> list[tuple[int, int]]:
    m = len(span)
    return [(d, o) for d, doc in enumerate(docs) for o in range(len(doc) - m + 1) if doc[o : o + m] == span]


def _longest_prefix(docs: list[list[int]], tokens: list[int]) -> int:
    best = 0
    for k in range(1, len(tokens) + 1):
        if _occurrences(docs, tokens[:k]):
            best = k
        else:
            break
    return best


def _random_docs(rng: np.random.Generator) -> list[list[int]]:
    vocab = int(rng.integers(1, 5))  # tiny vocabularies: many repeats, long shared prefixes
    return [rng.integers(0, vocab, int(rng.integers(0, 14))).tolist() for _ in range(int(rng.integers(1, 7)))]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_index_matches_brute_force(algorithm):
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        docs = _random_docs(rng)
        if not any(docs):
            continue
        idx = TokenIndex.build(docs, algorithm=algorithm, progress=False)
        assert idx.num_docs == len(docs) and idx.num_tokens == sum(map(len, docs))
        spans = [rng.integers(0, 5, int(rng.integers(1, 6))).tolist() for _ in range(15)]
        spans += [d[o : o + 3] for d in docs for o in range(0, max(0, len(d) - 2), 4)]
        for span in spans:
            want = _occurrences(docs, span)
            assert idx.find(span) == want, (docs, span)
            assert idx.count(span) == len(want)
            checked += len(want)
        queries = [rng.integers(0, 5, int(rng.integers(0, 9))).tolist() for _ in range(10)]
        for q in queries:
            assert idx.longest_prefix_match(q) == _longest_prefix(docs, q), (docs, q)
        gen = rng.integers(0, 5, (3, 9))
        ms = idx.matching_lengths(gen)
        for n in range(3):
            for i in range(9):
                assert ms[n, i] == _longest_prefix(docs, gen[n, i:].tolist())
        same = [s for s in spans if len(s) == 3]
        if same:
            assert idx.counts(np.array(same)).tolist() == [len(_occurrences(docs, s)) for s in same]
            rows, dd, oo = idx.occurrences(np.array(same))
            got = sorted(zip(rows.tolist(), dd.tolist(), oo.tolist()))
            assert got == sorted((r, d, o) for r, s in enumerate(same) for d, o in _occurrences(docs, s))
    assert checked > 200  # the spans really occurred


def test_both_algorithms_build_the_same_arrays():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 3, 40).tolist() for _ in range(30)] + [[1] * 50, [1] * 50]
    a = TokenIndex.build(docs, algorithm="numpy", progress=False)
    b = TokenIndex.build(docs, algorithm="divsufsort", progress=False)
    assert np.array_equal(a._sa, b._sa) and np.array_equal(a._stream, b._stream)
    assert a.params["algorithm"] == "numpy" and b.params["algorithm"] == "divsufsort"


def test_no_span_across_a_document_boundary():
    docs = [[1, 2, 3], [4, 5], [3, 4, 5, 6]]
    idx = TokenIndex.build(docs, progress=False)
    assert idx.count([3, 4]) == 1 and idx.find([3, 4]) == [(2, 0)]  # only inside document 2
    assert idx.count([2, 3, 4]) == 0  # document 0 ends with 2, 3; document 1 starts with 4
    assert idx.longest_prefix_match([1, 2, 3, 4, 5]) == 3
    assert idx.matching_lengths([[2, 3, 4, 5, 6]]).tolist() == [[2, 4, 3, 2, 1]]
    assert idx.max_match_length == 4
    # a span as long as the whole stream of two documents occurs nowhere
    assert idx.count([1, 2, 3, 4, 5]) == 0


def test_boundary_ids_split_documents_and_keep_offsets():
    pad = 256
    idx = TokenIndex.build([{"input_ids": torch.tensor([7, 8, pad, 9, 7, 8])}], boundary_ids=[pad], progress=False)
    assert idx.find([7, 8]) == [(0, 0), (0, 4)]  # offsets count the pad position
    assert idx.count([8, pad]) == 0 and idx.count([8, 9]) == 0
    assert idx.longest_prefix_match([7, 8, pad, 9]) == 2
    assert idx.num_tokens == 5
    labels = TokenIndex.build([[5, -100, 6]], boundary_ids=[-100], progress=False)
    assert labels.count([5]) == 1 and labels.count([5, 6]) == 0


def test_inputs_datasets_rows_and_errors():
    from antimemo.lm.data import SequenceDataset

    rows = torch.arange(12).reshape(3, 4)
    for source in (rows, rows.numpy(), SequenceDataset(rows), [r.tolist() for r in rows]):
        idx = TokenIndex.build(source, progress=False)
        assert idx.find([5, 6, 7]) == [(1, 1)] and idx.num_docs == 3
    assert TokenIndex.build([{"ids": [1, 2]}], key="ids", progress=False).count([1, 2]) == 1
    with pytest.raises(KeyError, match="key='input_ids'|'input_ids'"):
        TokenIndex.build([{"ids": [1, 2]}], progress=False)
    with pytest.raises(ValueError, match=r"sequences\[1\] holds the negative token id -5.*boundary_ids"):
        TokenIndex.build([[1], [2, -5]], progress=False)
    with pytest.raises(ValueError, match="sequences is empty"):
        TokenIndex.build([], progress=False)
    with pytest.raises(ValueError, match="no content token"):
        TokenIndex.build([[], [0]], boundary_ids=[0], progress=False)
    with pytest.raises(TypeError, match=r"sequences\[0\] must hold integer token ids"):
        TokenIndex.build([[0.5, 1.0]], progress=False)
    with pytest.raises(TypeError, match="tokenize it first"):
        TokenIndex.build(["some text"], progress=False)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        TokenIndex.build([[1]], algorithm="sais", progress=False)
    idx = TokenIndex.build([[1, 2]], progress=False)
    with pytest.raises(ValueError, match="span is empty"):
        idx.count([])
    with pytest.raises(ValueError, match="negative token id -1"):
        idx.find([-1])
    assert idx.longest_prefix_match([]) == 0


def test_divsufsort_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydivsufsort", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "antimemo\[extraction\]"'):
        TokenIndex.build([[1, 2]], algorithm="divsufsort", progress=False)
    # "auto" falls back to the numpy build, which gives the same index
    assert TokenIndex.build([[1, 2, 1, 2]], progress=False).params["algorithm"] == "numpy"


def test_progress_bar_on_request(capsys):
    TokenIndex.build([[1, 2, 3]], progress=True, algorithm="numpy")
    assert "token index: sorting 3 suffixes" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- files
def _index() -> TokenIndex:
    rng = np.random.default_rng(2)
    return TokenIndex.build([rng.integers(0, 50, 30).tolist() for _ in range(20)], progress=False)


def test_save_load_round_trip(tmp_path):
    idx = _index()
    path = idx.save(tmp_path / "train.npz")
    assert sorted(os.listdir(tmp_path)) == ["train.npz"]  # atomic write: no temporary file left
    back = TokenIndex.load(path)
    assert np.array_equal(back._sa, idx._sa) and np.array_equal(back._stream, back._stream)
    assert back.params == idx.params and back.num_docs == 20
    span = idx.document(4)[3:9].tolist()
    assert back.find(span) == idx.find(span) and (4, 3) in back.find(span)
    with zipfile.ZipFile(path) as z:  # a plain npz, every entry a .npy
        assert sorted(z.namelist()) == ["doc_starts.npy", "meta.npy", "sha256.npy", "stream.npy", "suffix_array.npy"]


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = _index().save(tmp_path / "train.npz")
    data = path.read_bytes()
    for name, content in (("half.npz", data[: len(data) // 2]), ("empty.npz", b""), ("noise.npz", os.urandom(4096))):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=r"not a valid antimemo token index \(truncated/corrupt\): .*" + name):
            TokenIndex.load(bad)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.arange(3))
    with pytest.raises(ValueError, match=r"truncated/corrupt.*missing arrays"):
        TokenIndex.load(other)
    with pytest.raises(FileNotFoundError, match="no token index"):
        TokenIndex.load(tmp_path / "absent.npz")


def _rewrite(src: Path, dst: Path, **changes) -> None:
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    np.savez(dst, **arrays)


def test_edited_files_are_refused(tmp_path):
    path = _index().save(tmp_path / "train.npz")
    with np.load(path) as z:
        stream, meta = z["stream"].copy(), str(z["meta"][()])
    stream[5] += 1
    _rewrite(path, tmp_path / "tokens.npz", stream=stream)
    with pytest.raises(ValueError, match="tokens.npz' was modified after it was saved"):
        TokenIndex.load(tmp_path / "tokens.npz")
    _rewrite(path, tmp_path / "meta.npz", meta=np.array(meta.replace('"num_docs": 20', '"num_docs": 21')))
    with pytest.raises(ValueError, match="was modified"):
        TokenIndex.load(tmp_path / "meta.npz")
    # flipping one byte inside the stored suffix array (the zip CRC catches it first, or the digest)
    raw = bytearray(path.read_bytes())
    at = raw.find(b"suffix_array.npy") + 400
    raw[at] ^= 0xFF
    (tmp_path / "flip.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="not a valid antimemo token index|was modified"):
        TokenIndex.load(tmp_path / "flip.npz")


class _Trap:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["ANTIMEMO_TRAP"]),))


def test_load_never_unpickles(tmp_path, monkeypatch):
    trap = tmp_path / "unpickled"
    monkeypatch.setenv("ANTIMEMO_TRAP", str(trap))
    obj = np.empty((), dtype=object)
    obj[()] = _Trap()
    bad = tmp_path / "pickled.npz"
    path = _index().save(tmp_path / "train.npz")
    _rewrite(path, bad, meta=obj)
    with pytest.raises(ValueError, match="truncated/corrupt"):
        TokenIndex.load(bad)
    plain = tmp_path / "plain.npz"
    plain.write_bytes(pickle.dumps(_Trap()))
    with pytest.raises(ValueError, match="truncated/corrupt"):
        TokenIndex.load(plain)
    assert not trap.exists()


# ---------------------------------------------------------------------------------------- nv-recall
def test_nv_recall_hand_example():
    ref = list(range(100, 120))  # 20 tokens
    gen = [1, 2] + ref[0:8] + [7] + ref[9:15] + [8, 9] + ref[15:17] + [5]
    # blocks: ref[0:8] (8), ref[9:15] (6), ref[15:17] (2): with min_block=5 the first two count
    assert nv_recall_blocks(gen, ref, 5) == [(0, 2, 8), (9, 11, 6)]
    assert nv_recall(gen, ref, 5) == pytest.approx(14 / 20)
    assert nv_recall(gen, ref, 7) == pytest.approx(8 / 20)
    assert nv_recall(gen, ref, 2) == pytest.approx(16 / 20)
    assert nv_recall(ref, ref, 20) == 1.0 and nv_recall(ref, ref, 21) == 0.0
    assert nv_recall(ref[10:] + ref[:10], ref, 5) == pytest.approx(10 / 20)  # order matters: one half only
    assert nv_recall(torch.tensor(gen), np.array(ref), 5) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="min_block must be an integer >= 1"):
        nv_recall(gen, ref, 0)


# ---------------------------------------------------------------------------------------- metric
VOCAB, DOC_LEN = 1000, 30


def _training() -> tuple[list[list[int]], TokenIndex]:
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, VOCAB, DOC_LEN).tolist() for _ in range(12)]
    return docs, TokenIndex.build(docs, progress=False)


def _generations(docs: list[list[int]]) -> torch.Tensor:
    """Four 64-token generations of never-trained tokens (>= 5000) with planted training spans."""
    gen = 5000 + torch.arange(4 * 64).reshape(4, 64)
    gen[0, 10:30] = torch.tensor(docs[3][5:25])  # 20 tokens
    gen[0, 40:52] = torch.tensor(docs[7][0:12])  # 12 tokens
    gen[1, 0:20] = torch.tensor(docs[3][5:25])  # the same 20 tokens again: not a new distinct span
    gen[3, 50:56] = torch.tensor(docs[1][10:16])  # 6 tokens: below min_span
    return gen  # generation 2 holds no training token


def test_metric_on_planted_spans():
    docs, index = _training()
    metric = UntargetedExtraction(index, min_span=8, nv_min_block=4)
    metric.update(_generations(docs))
    out = metric.compute()
    assert set(out) == {
        "untargeted/extraction_rate", "untargeted/token_coverage", "untargeted/distinct_spans",
        "untargeted/longest_match", "untargeted/nv_recall_mean", "untargeted/nv_recall_max",
        "untargeted/generations",
    }
    assert out["untargeted/extraction_rate"].item() == pytest.approx(2 / 4)
    assert out["untargeted/token_coverage"].item() == pytest.approx((20 + 12 + 20) / (4 * 64))
    assert out["untargeted/distinct_spans"].item() == 2
    assert out["untargeted/longest_match"].item() == 20
    # nv-recall: generations 0 and 1 hold 20 of document 3's 30 tokens, generation 3 6 of document 1's
    assert out["untargeted/nv_recall_max"].item() == pytest.approx(20 / 30)
    assert out["untargeted/nv_recall_mean"].item() == pytest.approx((20 / 30 + 20 / 30 + 0 + 6 / 30) / 4)
    assert out["untargeted/generations"].item() == 4


def test_metric_span_definition_and_updates_accumulate():
    docs, index = _training()
    # two overlapping training spans: docs[2][0:10] then, overlapping by nothing, docs[2][0:10] again
    # right after: two occurrences of the same content -> one distinct span, coverage 20
    row = 5000 + torch.arange(40)
    row[5:15] = torch.tensor(docs[2][0:10])
    row[15:25] = torch.tensor(docs[2][0:10])
    metric = UntargetedExtraction(index, min_span=8)
    metric.update(row[None])
    metric.update(5000 + torch.arange(40)[None])  # a second batch without any training token
    out = metric.compute()
    assert out["untargeted/distinct_spans"].item() == 1
    assert out["untargeted/token_coverage"].item() == pytest.approx(20 / 80)
    assert out["untargeted/extraction_rate"].item() == pytest.approx(1 / 2)
    # sub-spans of a memorized span are not counted separately: a longer planted span is 1 span
    metric.reset()
    row = 5000 + torch.arange(40)
    row[0:25] = torch.tensor(docs[4][0:25])
    metric.update(row[None])
    assert metric.compute()["untargeted/distinct_spans"].item() == 1


def test_metric_argument_errors():
    docs, index = _training()
    with pytest.raises(ValueError, match=r"min_span=31 exceeds the longest training document in the index \(30 tokens\)"):
        UntargetedExtraction(index, min_span=31)
    with pytest.raises(TypeError, match="index must be an antimemo.suffix_index.TokenIndex"):
        UntargetedExtraction(docs)
    with pytest.raises(ValueError, match="nv_min_block must be an integer >= 1"):
        UntargetedExtraction(index, min_span=8, nv_min_block=0)
    metric = UntargetedExtraction(index, min_span=8)
    with pytest.raises(TypeError, match="integer token ids"):
        metric.update(torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"shape \[N, T\]"):
        metric.update(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="negative token id -100"):
        metric.update(torch.tensor([[1, -100]]))
    with pytest.raises(RuntimeError, match="before any generation"):
        metric.compute()


def test_merged_instances_equal_one_instance():
    """Two instances merged with torchmetrics' merge_state equal one instance on all the data."""
    docs, index = _training()
    gen = _generations(docs)
    one = UntargetedExtraction(index, min_span=8, nv_min_block=4)
    one.update(gen)
    a = UntargetedExtraction(index, min_span=8, nv_min_block=4)
    b = UntargetedExtraction(index, min_span=8, nv_min_block=4)
    a.update(gen[[0, 2]])
    b.update(gen[[1, 3]])
    a.merge_state(b)
    assert {k: v.item() for k, v in a.compute().items()} == {k: v.item() for k, v in one.compute().items()}


WORLD_SIZE = 2
# rank 0: generations 0 and 2; rank 1: 1 and 3 (both hold the same planted span). In the second
# metric rank 1 adds nothing at all (empty cat states).
SHARDS = ([0, 2], [1, 3])


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        docs, index = _training()
        gen = _generations(docs)
        split = UntargetedExtraction(index, min_span=8, nv_min_block=4)
        split.update(gen[SHARDS[rank]])
        lopsided = UntargetedExtraction(index, min_span=8, nv_min_block=4)
        if rank == 0:
            lopsided.update(gen)
        results = [split.compute(), lopsided.compute()]
        torch.save({"results": results, "local": int(split.n_generations)}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_metric_under_ddp_equals_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    docs, index = _training()
    single = UntargetedExtraction(index, min_span=8, nv_min_block=4)
    single.update(_generations(docs))
    want = single.compute()
    assert want["untargeted/distinct_spans"].item() == 2  # the span both ranks saw counts once
    for rank in range(WORLD_SIZE):
        saved = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert saved["local"] == 2
        for got in saved["results"]:
            assert got.keys() == want.keys()
            for key in want:
                assert got[key].item() == want[key].item(), f"rank {rank}: {key}"


# ---------------------------------------------------------------------------------------- prompts
def test_prompt_kinds():
    assert untargeted_prompts("empty", 3, bos_id=10).tolist() == [[10]] * 3
    held = torch.arange(200, 200 + 5 * 16).reshape(5, 16)
    g = torch.Generator().manual_seed(0)
    p = untargeted_prompts("holdout", 40, holdout=held, length=6, generator=g)
    assert p.shape == (40, 6)
    for row in p:  # each prompt is 6 consecutive tokens of one held-out row
        r = int((row[0] - 200) // 16)
        start = int(row[0] - 200 - 16 * r)
        assert start <= 10 and torch.equal(row, held[r, start : start + 6])
    assert len({int(row[0] - 200) // 16 for row in p}) == 5  # rows drawn at random: all used
    again = untargeted_prompts("holdout", 40, holdout=held, length=6, generator=torch.Generator().manual_seed(0))
    other = untargeted_prompts("holdout", 40, holdout=held, length=6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(p, again) and not torch.equal(p, other)
    ds = [{"input_ids": r} for r in held]
    assert torch.equal(untargeted_prompts("holdout", 40, holdout=ds, length=6, generator=torch.Generator().manual_seed(0)), p)
    assert untargeted_prompts("repeat", 2, unit=[4, 5], repeats=3).tolist() == [[4, 5, 4, 5, 4, 5]] * 2
    rep = untargeted_prompts("repeat", 50, vocab_size=7, repeats=4, generator=torch.Generator().manual_seed(0))
    assert rep.shape == (50, 4) and bool((rep == rep[:, :1]).all()) and set(rep[:, 0].tolist()) == set(range(7))


def test_prompt_errors_name_the_argument():
    with pytest.raises(ValueError, match="kind must be one of"):
        untargeted_prompts("bos", 2)
    with pytest.raises(ValueError, match="kind='empty' needs bos_id"):
        untargeted_prompts("empty", 2)
    with pytest.raises(ValueError, match="kind='holdout' needs holdout="):
        untargeted_prompts("holdout", 2, length=4)
    with pytest.raises(ValueError, match="length=20 exceeds the held-out rows' length 16"):
        untargeted_prompts("holdout", 2, holdout=torch.zeros(3, 16, dtype=torch.long), length=20)
    with pytest.raises(ValueError, match="needs unit=.*or vocab_size="):
        untargeted_prompts("repeat", 2)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        untargeted_prompts("empty", 0, bos_id=1)


def test_end_to_end_with_sample_generate():
    """Prompts of each kind -> sample_generate -> the metric; a planted generation is caught."""
    from _builders import tiny_llama

    model = tiny_llama(vocab=48, max_positions=64)
    docs = [list(range(i, i + 20)) for i in range(0, 24, 3)]  # ids < 48
    index = TokenIndex.build(docs, progress=False)
    metric = UntargetedExtraction(index, min_span=8, nv_min_block=4)
    g = torch.Generator().manual_seed(0)
    prompts = [
        untargeted_prompts("empty", 4, bos_id=1),
        untargeted_prompts("holdout", 4, holdout=torch.randint(0, 48, (6, 12), generator=g), length=4, generator=g),
        untargeted_prompts("repeat", 4, vocab_size=48, repeats=8, generator=g),
    ]
    for p in prompts:
        out = sample_generate(model, p, 24, top_k=10, generator=torch.Generator().manual_seed(0))
        assert out.shape == (4, 24)
        metric.update(out)
    planted = torch.tensor([[47] * 4 + docs[2][:20]])
    metric.update(planted)
    res = metric.compute()
    assert res["untargeted/generations"].item() == 13
    assert res["untargeted/longest_match"].item() >= 20
    assert res["untargeted/nv_recall_max"].item() == 1.0
