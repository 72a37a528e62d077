"""antimemo.probes: the Lightning-free probe draw, including variable-length and padded items."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from antimemo.probes import draw_probes, fetch_probes, probe_window

P, S = 4, 4
L = P + S


def _padded(lengths, width=12, pad=0, left=False):
    """Dict items padded to ``width`` with an attention_mask, text tokens 1..n."""
    items = []
    for n in lengths:
        ids = torch.full((width,), pad, dtype=torch.long)
        mask = torch.zeros(width, dtype=torch.long)
        text = torch.arange(1, n + 1)
        where = slice(width - n, width) if left else slice(0, n)
        ids[where], mask[where] = text, 1
        items.append({"input_ids": ids, "attention_mask": mask})
    return items


def test_the_probes_module_does_not_import_lightning_or_the_callbacks():
    code = (
        "import sys, antimemo.probes\n"
        "bad = sorted(m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', "
        "'pytorch_lightning', 'antimemo.callbacks')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_unpadded_items_of_varying_length_keep_the_first_tokens_of_the_long_enough_ones():
    docs = [{"input_ids": torch.arange(100, 100 + n)} for n in (3, 8, 20, 7, 9, 1)]
    draw = draw_probes(docs, count=None, length=L, seed=0)
    assert sorted(draw.indices) == [1, 2, 4]
    assert (draw.scanned, draw.too_short, draw.padded) == (6, 3, 0)
    for index, row in zip(draw.indices, draw.rows):
        assert torch.equal(row, docs[index]["input_ids"][:L])
    # the documented order: the seeded permutation, skipping the short ones
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(0)).tolist()
    assert draw.indices == [i for i in order if len(docs[i]["input_ids"]) >= L]


@pytest.mark.parametrize("left", [False, True])
def test_padding_is_never_part_of_a_probe(left):
    items = _padded([5, 12, 8, 10, 2], left=left)
    draw = draw_probes(items, count=None, length=L, seed=1)
    assert sorted(draw.indices) == [1, 2, 3]  # the items with >= 8 text tokens
    assert draw.too_short == 2
    for index, row in zip(draw.indices, draw.rows):
        assert torch.equal(row, torch.arange(1, L + 1))  # the first 8 text tokens, no pad id 0


def test_a_mask_with_padding_inside_the_window_is_skipped_and_counted():
    ids = torch.arange(1, 13)
    holes = {"input_ids": ids, "attention_mask": torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0])}
    assert probe_window(holes, L) == (None, "padded")
    draw = draw_probes([holes, {"input_ids": ids}], count=None, length=L, seed=0)
    assert draw.indices == [1] and draw.padded == 1
    bool_mask = {"input_ids": ids, "attention_mask": torch.ones(12, dtype=torch.bool)}
    row, reason = probe_window(bool_mask, L)
    assert reason is None and torch.equal(row, ids[:L])


def test_bad_masks_raise_naming_the_key():
    ids = torch.arange(12)
    with pytest.raises(ValueError, match=r"\['attention_mask'\] must be a 1-D mask .* shape \(12,\), got \(11,\)"):
        probe_window({"input_ids": ids, "attention_mask": torch.ones(11)}, L, where="item[0]")
    with pytest.raises(ValueError, match=r"must hold 0 \(padding\) and 1 \(text\)"):
        probe_window({"input_ids": ids, "attention_mask": torch.full((12,), 2)}, L)


def test_fetch_rechecks_the_mask():
    items = _padded([12, 5])
    assert torch.equal(fetch_probes(items, [0], L), torch.arange(1, L + 1).unsqueeze(0))
    with pytest.raises(ValueError, match="index 1 now has 5 unmasked tokens, fewer than the 8 needed"):
        fetch_probes(items, [1], L, what="training dataset")


def _fake_trainer(train):
    return SimpleNamespace(
        enable_validation=True, limit_val_batches=1.0, train_dataloader=DataLoader(train),
        val_dataloaders=None, world_size=1, global_rank=0,
    )


def test_the_monitor_draws_only_unmasked_windows_and_says_how_many_qualify():
    from antimemo.callbacks.monitor import MemorizationMonitor

    class Module(torch.nn.Module):
        model = torch.nn.Linear(1, 1)

    items = _padded([5, 12, 8, 10, 2, 3])
    monitor = MemorizationMonitor(num_probes=3, prefix_length=P, suffix_length=S)
    monitor.on_train_start(_fake_trainer(items), Module())
    assert sorted(monitor.probe_indices) == [1, 2, 3]
    assert torch.equal(monitor.probes, torch.arange(1, L + 1).repeat(3, 1))

    too_many = MemorizationMonitor(num_probes=4, prefix_length=P, suffix_length=S)
    match = (
        r"MemorizationMonitor\(num_probes=4\) needs 4 training examples .* = 8 tokens, but only 3 of "
        r"the 6 training examples qualify \(3 have fewer than 8 \(unmasked\) tokens\); lower num_probes"
    )
    with pytest.raises(ValueError, match=match):
        too_many.on_train_start(_fake_trainer(items), Module())

    holes = [{"input_ids": torch.arange(12), "attention_mask": torch.tensor([1] * 3 + [0] + [1] * 8)}]
    with pytest.raises(ValueError, match=r"only 0 of the 1 .*1 have attention_mask 0 \(padding\) inside"):
        MemorizationMonitor(num_probes=1, prefix_length=P, suffix_length=S).on_train_start(
            _fake_trainer(holes), Module()
        )
