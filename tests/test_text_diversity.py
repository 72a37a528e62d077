"""Diversity and tail metrics of generated text (model collapse): the pure functions, the DDP-exact
metrics and the ``DiversityMonitor`` callback.

Every expected value below is computed by hand in the comment next to it.
"""

from __future__ import annotations

import math
import os
import random
import socket
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _builders import quiet_trainer_kwargs, tiny_llama
from torch.utils.data import DataLoader

from antimemo.callbacks import DiversityMonitor
from antimemo.functional import distinct_n, ngram_entropy, rare_ngrams, tail_coverage, tail_probability_coverage
from antimemo.functional.text_diversity import NgramCounts, ngram_counts, ngram_keys, ngram_log_probs
from antimemo.metrics import TailCoverage, TextDiversity

# ------------------------------------------------------------------------------ n-gram keys

_M64 = (1 << 64) - 1
_G = 0x9E3779B97F4A7C15


def _py_mix64(z: int) -> int:
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _py_key(gram: list[int]) -> int:
    """The documented hash, in plain Python integers."""
    h = _py_mix64(len(gram) * _G)
    for t in gram:
        h = _py_mix64(h + (t + 1) * _G)
    return h - (1 << 64) if h >= (1 << 63) else h


def test_hashed_keys_follow_the_documented_scheme_bit_for_bit():
    ids = torch.tensor([[0, 5, 50_000, 7], [3, 3, 3, 1]])
    for n in (1, 2, 3):
        want = [_py_key(row[j : j + n]) for row in ids.tolist() for j in range(4 - n + 1)]
        assert ngram_keys(ids, n).tolist() == want


def test_packed_keys_are_base_v_digits_and_fall_back_to_the_hash_when_too_large():
    assert ngram_keys(torch.tensor([[1, 2, 3]]), 3, vocab_size=10).tolist() == [123]
    big = 2**22  # big**3 = 2**66 > 2**63: hashed
    assert ngram_keys(torch.tensor([[1, 2, 3]]), 3, vocab_size=big).tolist() == [_py_key([1, 2, 3])]
    with pytest.raises(ValueError, match=r"token id 10 is >= vocab_size=10"):
        ngram_keys(torch.tensor([[1, 10]]), 2, vocab_size=10)


def test_ngrams_skip_padding_and_never_span_rows():
    ids = torch.tensor([[1, 2, -100, 3, 4], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0]])
    # bigrams on text only: (1,2), (3,4), (5,6), (6,7)
    assert ngram_keys(ids, 2, mask, vocab_size=10).tolist() == [12, 34, 56, 67]
    rows = [torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([9])]
    assert ngram_keys(rows, 2, vocab_size=10).tolist() == [12, 34]
    with pytest.raises(ValueError, match=r"token_ids holds a negative token id \(-100\).*attention_mask"):
        ngram_keys(ids, 2)


# --------------------------------------------------------------------- distinct-n and entropy


def test_distinct_n_and_entropy_by_hand():
    gens = torch.tensor([[1, 2, 1, 2], [3, 3, 3, 3]])
    # unigrams: 1 x2, 2 x2, 3 x4 -> distinct 3/8; H = -(2 * 1/4 log 1/4 + 1/2 log 1/2)
    assert float(distinct_n(gens, 1)) == pytest.approx(3 / 8)
    assert float(ngram_entropy(gens, 1)) == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.5)), abs=1e-6)
    # bigrams: (1,2) x2, (2,1) x1, (3,3) x3 -> distinct 3/6; H = -(1/3 log 1/3 + 1/6 log 1/6 + 1/2 log 1/2)
    assert float(distinct_n(gens, 2)) == pytest.approx(0.5)
    h2 = -(1 / 3 * math.log(1 / 3) + 1 / 6 * math.log(1 / 6) + 0.5 * math.log(0.5))
    assert float(ngram_entropy(gens, 2)) == pytest.approx(h2, abs=1e-6)
    # 4-grams: (1,2,1,2), (3,3,3,3) -> 2/2, H = log 2
    assert float(distinct_n(gens, 4)) == 1.0
    assert float(ngram_entropy(gens, 4)) == pytest.approx(math.log(2), abs=1e-6)
    # the key scheme does not change the values
    assert float(ngram_entropy(gens, 2, vocab_size=4)) == pytest.approx(h2, abs=1e-6)
    # no 5-gram at all: nan, not 0
    assert math.isnan(float(distinct_n(gens, 5))) and math.isnan(float(ngram_entropy(gens, 5)))


def test_distinct_n_with_a_mask_counts_text_only():
    gens = torch.tensor([[4, 4, 9, 9], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    # unigrams on text: 4, 4, 4, 5 -> 2 distinct of 4
    assert float(distinct_n(gens, 1, mask)) == 0.5


# ------------------------------------------------------------------------------------- tails


def test_rare_ngrams_bottom_quantile_with_ties_included():
    # training unigram counts: 1 x5, 2 x3, 3 x1, 4 x1, 5 x0 (unseen)
    train = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 3, 4]])
    held = torch.tensor([[1, 2, 3, 4, 5]])  # candidates sorted by count: 5:0, 3:1, 4:1, 2:3, 1:5
    r = rare_ngrams(held, train, 1, quantile=0.2, vocab_size=10)  # k = ceil(0.2*5) = 1 -> threshold 0
    assert (r.keys.tolist(), r.threshold, r.num_candidates) == ([5], 0, 5)
    r = rare_ngrams(held, train, 1, quantile=0.4, vocab_size=10)  # k = 2 -> threshold c_(2) = 1; 4 ties with 3
    assert (r.keys.tolist(), r.train_counts.tolist(), r.threshold) == ([3, 4, 5], [1, 1, 0], 1)
    r = rare_ngrams(held, train, 1, quantile=0.25, vocab_size=10, include_unseen=False)  # 4 candidates, k = 1
    assert (r.keys.tolist(), r.threshold, r.num_candidates) == ([3, 4], 1, 4)
    # precomputed counts give the same set
    counts = ngram_counts(train, 1, vocab_size=10)
    assert rare_ngrams(held, counts, 1, quantile=0.4, vocab_size=10).keys.tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match=r"n=1, vocab_size=10.*n=2"):
        rare_ngrams(held, counts, 2, vocab_size=10)


def test_tail_coverage_by_hand():
    train = torch.tensor([[1, 2, 1, 2, 1, 2]])  # bigrams (1,2) x3, (2,1) x2
    held = torch.tensor([[1, 2, 3, 1, 2, 4]])  # held-out bigrams: (1,2):3 (2,3):0 (3,1):0 (2,4):0
    rare = rare_ngrams(held, train, 2, quantile=0.1, vocab_size=10)
    assert rare.keys.tolist() == [23, 24, 31]
    gen = torch.tensor([[2, 3, 3, 3], [3, 1, 1, 1]])  # contains (2,3) and (3,1), not (2,4)
    assert float(tail_coverage(gen, rare)) == pytest.approx(2 / 3)
    # the same from the key tensor (then n and vocab_size are needed)
    assert float(tail_coverage(gen, rare.keys, n=2, vocab_size=10)) == pytest.approx(2 / 3)
    assert float(tail_coverage(torch.tensor([[1, 2, 1, 2]]), rare)) == 0.0


def test_tail_probability_coverage_by_hand():
    ids = torch.tensor([[0, 1, 2, 3, 1, 2]])
    v = 4
    logits = torch.zeros(1, 6, v)  # uniform: every token 1/4
    logits[0, 0] = torch.tensor([0.0, 10.0, 0.0, 0.0])  # after position 0 the model is sure of 1
    logits[0, 1] = torch.tensor([0.0, 0.0, 10.0, 0.0])  # and of 2 after position 1
    keys, lp = ngram_log_probs(logits, ids, 2, vocab_size=v)
    # scored bigrams start at j >= 1: (1,2) j=1, (2,3) j=2, (3,1) j=3, (1,2) j=4
    assert keys.tolist() == [6, 11, 13, 6]
    p_sure = torch.softmax(torch.tensor([0.0, 10.0, 0.0, 0.0]), 0)[1].item()
    assert lp[0].item() == pytest.approx(2 * math.log(p_sure), abs=1e-5)
    assert lp[1].item() == pytest.approx(math.log(p_sure) + math.log(0.25), abs=1e-5)  # 2 sure, then 3 at 1/4
    assert lp[2].item() == pytest.approx(2 * math.log(0.25), abs=1e-5)
    # rare: (1,2) (covered: its best occurrence j=1 has p ~ 1 per token) and (3,1) (1/4 per token)
    rare = torch.tensor([6, 13])
    assert float(tail_probability_coverage(logits, ids, rare, 0.5, n=2, vocab_size=v)) == 0.5
    assert float(tail_probability_coverage(logits, ids, rare, 0.2, n=2, vocab_size=v)) == 1.0
    # log-probs give the same as logits
    lps = torch.log_softmax(logits, -1)
    assert float(tail_probability_coverage(lps, ids, rare, 0.5, n=2, vocab_size=v)) == 0.5
    # (0,1) occurs only at the start (no context): not scored -> nan
    assert math.isnan(float(tail_probability_coverage(logits, ids, torch.tensor([1]), 0.5, n=2, vocab_size=v)))


def test_tail_coverage_metric_heldout_loss_is_the_mean_token_nll():
    ids = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    m = TailCoverage(torch.tensor([1, 2]), n=1, vocab_size=5)
    m.update_heldout(logits, ids)
    lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    assert float(m.compute()["heldout_loss"]) == pytest.approx(-lp.mean().item(), abs=1e-5)
    assert math.isnan(float(m.compute()["tail_coverage"]))  # no generations yet


# ------------------------------------------------------------------------------------ errors


def test_argument_errors_name_the_argument_and_the_value():
    gens = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0"):
        distinct_n(gens, 0)
    with pytest.raises(ValueError, match=r"token_ids must be an integer tensor \[B, T\].*float32"):
        ngram_entropy(gens.float(), 1)
    with pytest.raises(ValueError, match=r"quantile must be a number in \(0, 1\], got 0"):
        rare_ngrams(gens, gens, 1, quantile=0)
    with pytest.raises(ValueError, match=r"threshold must be a per-token probability in \(0, 1\], got 2"):
        TailCoverage(torch.tensor([1]), n=1, threshold=2)
    with pytest.raises(ValueError, match=r"rare is empty"):
        TailCoverage(torch.zeros(0, dtype=torch.long), n=1)
    with pytest.raises(ValueError, match=r"n is required"):
        tail_coverage(gens, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"ns must hold distinct n-gram lengths, got \(2, 2\)"):
        TextDiversity(ns=(2, 2))
    with pytest.raises(ValueError, match=r"vocab_size must be an integer >= 1, got 0"):
        ngram_keys(gens, 1, vocab_size=0)
    with pytest.raises(ValueError, match=r"num_samples must be an integer >= 1, got 0"):
        DiversityMonitor(num_samples=0)
    with pytest.raises(ValueError, match=r"rare_quantile must be a number in \(0, 1\], got 1.5"):
        DiversityMonitor(rare_quantile=1.5)
    with pytest.raises(ValueError, match=r"heldout must be 'val'.*got 'train'"):
        DiversityMonitor(heldout="train")
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        DiversityMonitor(temperature=0)


# --------------------------------------------------------------------------------------- DDP

WORLD = 2


def _ddp_data():
    g = torch.Generator().manual_seed(3)
    gens = torch.randint(0, 6, (7, 9), generator=g)
    gens[4] = gens[0]  # the same generation on both ranks: a per-rank distinct count would double it
    held = torch.randint(0, 6, (5, 8), generator=g)
    logits = torch.randn(5, 8, 6, generator=g)
    train = torch.randint(0, 6, (10, 8), generator=g)
    rare = rare_ngrams(held, train, 2, quantile=0.3)
    return gens, held, logits, rare


def _ddp_metrics(rare):
    return TextDiversity(ns=(1, 2, 3)), TailCoverage(rare, threshold=0.1)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        gens, held, logits, rare = _ddp_data()
        div, tails = _ddp_metrics(rare)
        part = slice(0, 4) if rank == 0 else slice(4, 7)  # uneven shards
        hpart = slice(0, 1) if rank == 0 else slice(1, 5)
        div.update(gens[part])
        tails.update(gens[part])
        tails.update_heldout(logits[hpart], held[hpart])
        torch.save({**div.compute(), **tails.compute()}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_under_two_process_ddp_equal_the_single_process_union(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    gens, held, logits, rare = _ddp_data()
    div, tails = _ddp_metrics(rare)
    div.update(gens)
    tails.update(gens)
    tails.update_heldout(logits, held)
    want = {**div.compute(), **tails.compute()}
    # the same values from the functions, and not trivial
    assert float(want["distinct_2"]) == pytest.approx(float(distinct_n(gens, 2)))
    assert float(want["tail_coverage"]) == pytest.approx(float(tail_coverage(gens, rare)))
    assert float(want["tail_probability_coverage"]) == pytest.approx(
        float(tail_probability_coverage(logits, held, rare, 0.1))
    )
    assert 0 < float(want["tail_coverage"]) < 1 and float(want["distinct_3"]) < 1
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], msg=f"rank {rank}: {key}")


# ---------------------------------------------------------------------------------- callback

VOCAB, LENGTH = 48, 24


class _LM(pl.LightningModule):
    def __init__(self, lr: float = 1e-2):
        super().__init__()
        self.model = tiny_llama(vocab=VOCAB, hidden=32, layers=2, heads=4, seed=0)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


_g = torch.Generator().manual_seed(11)
_REPEATED = torch.randint(0, VOCAB, (LENGTH,), generator=_g)
TRAIN = [{"input_ids": _REPEATED.clone()} for _ in range(32)]  # one sequence, 32 times
HELD = [{"input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=_g)} for _ in range(16)]


class _Data(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TRAIN, batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(HELD, batch_size=8)


class _Around(pl.Callback):
    """Records the RNG states and module modes at validation epoch end (placed before and after the monitor)."""

    def __init__(self):
        self.seen = []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.seen.append(
            (
                torch.get_rng_state().clone(),
                random.getstate(),
                np.random.get_state()[1].copy(),
                [m.training for m in pl_module.modules()],
            )
        )


def _monitor(**kw):
    args = dict(num_samples=16, num_tokens=24, prompt_length=4, batch_size=8, ns=(1, 2), tail_n=2, seed=0)
    return DiversityMonitor(**{**args, **kw})


def test_monitor_logs_its_keys_leaves_rng_alone_and_sees_a_repeating_model_collapse():
    monitor = _monitor()
    before, after = _Around(), _Around()
    trainer = pl.Trainer(
        callbacks=[before, monitor, after], num_sanity_val_steps=0,
        **quiet_trainer_kwargs(max_epochs=6, accelerator="cpu", devices=1),
    )  # fmt: skip
    torch.manual_seed(0)
    trainer.fit(_LM(), _Data())
    keys = ["distinct_1", "entropy_1", "distinct_2", "entropy_2", "tail_coverage", "tail_probability_coverage", "heldout_loss"]
    for key in keys:
        assert f"diversity/{key}" in trainer.callback_metrics, key
    assert len(monitor.history) == 6
    # the monitor neither consumed nor reset any RNG, nor changed a module's mode
    for b, a in zip(before.seen, after.seen):
        assert torch.equal(b[0], a[0]) and b[1] == a[1] and np.array_equal(b[2], a[2]) and b[3] == a[3]
    # the rare held-out bigrams: all of them never occur in the (one-sequence) training data
    assert monitor.rare is not None and monitor.rare.threshold == 0 and monitor.rare.keys.numel() > 100
    trained = monitor.last_results

    untrained_monitor = _monitor()
    validate = pl.Trainer(callbacks=[untrained_monitor], **quiet_trainer_kwargs(accelerator="cpu", devices=1))
    validate.validate(_LM(), _Data())  # the untrained model; the monitor reads the datamodule's training set
    untrained = untrained_monitor.last_results
    assert torch.equal(untrained_monitor.rare.keys, monitor.rare.keys)
    # a model that repeats its one training sequence generates fewer distinct n-grams and fewer rare ones
    assert trained["distinct_2"] < 0.5 * untrained["distinct_2"], (trained, untrained)
    assert trained["entropy_2"] < untrained["entropy_2"] - 1.0
    assert trained["tail_coverage"] < 0.5 * untrained["tail_coverage"], (trained, untrained)
    assert trained["tail_probability_coverage"] < untrained["tail_probability_coverage"]
    assert trained["heldout_loss"] > untrained["heldout_loss"]


def test_monitor_state_dict_is_plain_and_round_trips(tmp_path):
    monitor = _monitor()
    monitor.history = [(0, 4, {"distinct_2": 0.5})]
    torch.save(monitor.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["settings"]["ns"] == [1, 2] and state["settings"]["tail_n"] == 2
    restored = _monitor()
    restored.load_state_dict(state)
    assert restored.history == [(0, 4, {"distinct_2": 0.5})] and restored.last_results == {"distinct_2": 0.5}
    with pytest.warns(UserWarning, match=r"tail_n=2 now 3"):
        _monitor(tail_n=3).load_state_dict(state)


def test_monitor_refuses_too_long_prompts_naming_prompt_length():
    trainer = pl.Trainer(callbacks=[_monitor(prompt_length=LENGTH + 1)], **quiet_trainer_kwargs(accelerator="cpu", devices=1))
    with pytest.raises(ValueError, match=r"prompt_length=25.*lower prompt_length"):
        trainer.validate(_LM(), _Data())
