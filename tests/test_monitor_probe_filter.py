"""MemorizationMonitor(min_distinct_suffix_tokens=...): degenerate suffixes are not drawn."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from antimemo.callbacks import MemorizationMonitor

P = S = 8
L = P + S


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(1, 1)


def _fake_trainer(train, val=None):
    return SimpleNamespace(
        enable_validation=True,
        limit_val_batches=1.0,
        train_dataloader=DataLoader(train),
        val_dataloaders=DataLoader(val) if val is not None else None,
        world_size=1,
        global_rank=0,
    )


def _example(i: int, distinct: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random prefix, then a suffix cycling through exactly ``distinct`` token ids."""
    prefix = torch.randint(0, 50, (P,), generator=generator)
    ids = torch.randperm(50, generator=generator)[:distinct] + 50
    suffix = ids[torch.arange(S) % distinct]
    return {"input_ids": torch.cat([prefix, suffix])}


def _dataset(distincts, seed):
    g = torch.Generator().manual_seed(seed)
    return [_example(i, d, g) for i, d in enumerate(distincts)]


DISTINCT = [1, 5, 2, 8, 3, 6, 4, 7, 1, 8, 2, 5, 6, 3, 8, 4]  # distinct ids in each suffix


def test_draw_skips_suffixes_with_too_few_distinct_tokens_following_the_documented_rule():
    train = _dataset(DISTINCT, seed=0)
    for n in (1, 4, 6):
        monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, seed=5, min_distinct_suffix_tokens=n)
        monitor.on_train_start(_fake_trainer(train), _Module())
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(5)).tolist()
        assert monitor.probe_indices == [i for i in order if DISTINCT[i] >= n][:4]
        suffix_distinct = [len(set(row[P:].tolist())) for row in monitor.probes]
        assert all(d >= n for d in suffix_distinct)
        if n == 1:  # default: the plain draw, degenerate suffixes included
            assert monitor.probe_indices == order[:4]


def test_mia_members_and_non_members_obey_the_same_rule_so_members_stay_the_probes():
    train, val = _dataset(DISTINCT, seed=1), _dataset(DISTINCT[::-1], seed=2)
    monitor = MemorizationMonitor(
        num_probes=4, prefix_length=P, suffix_length=S, holdout="val", min_distinct_suffix_tokens=5
    )
    monitor.on_train_start(_fake_trainer(train, val), _Module())
    assert monitor.mia_member_indices == monitor.probe_indices
    assert monitor._members_are_probes()
    assert all(DISTINCT[::-1][i] >= 5 for i in monitor.mia_non_member_indices)
    assert len(monitor.mia_non_member_indices) == 4


def test_explicit_probes_are_not_filtered():
    probes = torch.stack([e["input_ids"] for e in _dataset([1, 1, 2], seed=3)])
    monitor = MemorizationMonitor(prefix_length=P, suffix_length=S, probes=probes, min_distinct_suffix_tokens=4)
    monitor.on_train_start(_fake_trainer(_dataset(DISTINCT, seed=0)), _Module())
    assert torch.equal(monitor.probes, probes)


def test_too_few_eligible_examples_names_the_filter():
    monitor = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S, min_distinct_suffix_tokens=8)
    with pytest.raises(ValueError, match=r"min_distinct_suffix_tokens=8 distinct .* only 3 of the 16"):
        monitor.on_train_start(_fake_trainer(_dataset(DISTINCT, seed=0)), _Module())


@pytest.mark.parametrize(
    "value, match",
    [
        (0, "min_distinct_suffix_tokens must be an integer >= 1, got 0"),
        (True, "min_distinct_suffix_tokens must be an integer >= 1, got True"),
        (2.0, "min_distinct_suffix_tokens must be an integer >= 1, got 2.0"),
        (S + 1, r"min_distinct_suffix_tokens=9 can never be met by a suffix of suffix_length=8"),
    ],
)
def test_bad_values(value, match):
    with pytest.raises(ValueError, match=match):
        MemorizationMonitor(prefix_length=P, suffix_length=S, min_distinct_suffix_tokens=value)


def test_state_key_is_unchanged_by_default_and_differs_with_the_filter():
    plain = MemorizationMonitor(prefix_length=P, suffix_length=S)
    same = MemorizationMonitor(prefix_length=P, suffix_length=S, min_distinct_suffix_tokens=1)
    filtered = MemorizationMonitor(prefix_length=P, suffix_length=S, min_distinct_suffix_tokens=4)
    assert plain.state_key == same.state_key
    assert "min_distinct_suffix_tokens" not in plain.state_key  # checkpoints from before still resume
    assert filtered.state_key != plain.state_key
