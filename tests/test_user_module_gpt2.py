"""Goldfish and the monitor on a user's own module (examples/gpt2_user_module.py).

A Hugging Face GPT-2 from a config, a BPE tokenizer trained at run time, variable-length documents
padded on the right by the user's collate_fn. Checked here: the labels goldfish rewrites are the
labels the GPT-2 loss receives, padding is never supervised nor probed, and the monitor's logged
figures equal an independent greedy decode written below (a plain argmax loop, no KV cache).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import gpt2_user_module as example  # noqa: E402

from antimemo.functional.goldfish import goldfish_mask  # noqa: E402

K, H = 4, 13  # the example's goldfish settings


@pytest.fixture(autouse=True)
def one_thread():
    """A 64-wide model: one intra-op thread is as fast, and not slowed down by other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordModelInputs(pl.Callback):
    """Record the kwargs the GPT-2 model itself receives in training forwards."""

    def __init__(self) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self._handle = None

    def on_train_start(self, trainer, pl_module):
        def hook(module, args, kwargs):
            if module.training:
                self.calls.append({k: kwargs[k].detach().clone() for k in ("input_ids", "attention_mask", "labels")})

        self._handle = pl_module.model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_end(self, trainer, pl_module):
        self._handle.remove()


def independent_greedy(model: torch.nn.Module, prefixes: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation by the plainest loop: argmax of the last position's logits, append, repeat."""
    model.eval()
    ids = prefixes.clone()
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    return ids[:, prefixes.shape[1] :]


def _check_monitor_against_independent_decode(run) -> dict[str, float]:
    monitor, trainer, data = run["monitor"], run["trainer"], run["data"]
    p, s = monitor.prefix_length, monitor.suffix_length
    # the probes are the first p + s tokens of training documents long enough for them (unpadded)
    train = data.train_set
    lengths = [len(item["input_ids"]) for item in train]
    assert min(lengths) < p + s <= max(lengths)  # some documents are too short: the draw skips them
    assert len(monitor.probe_indices) == monitor.num_probes
    for index, row in zip(monitor.probe_indices, monitor.probes):
        assert lengths[index] >= p + s
        assert torch.equal(row, train[index]["input_ids"][: p + s])

    generated = independent_greedy(run["module"].model, monitor.probes[:, :p], s)
    hits = generated == monitor.probes[:, p:]
    expected = {"exact_match": hits.all(1).float().mean().item(), "token_match": hits.float().mean().item()}
    for key, value in expected.items():
        assert monitor.last_results[key] == pytest.approx(value, abs=1e-6), key
        assert float(trainer.callback_metrics[f"memorization/{key}"]) == pytest.approx(value, abs=1e-6), key
    # the last evaluation ran on the final weights (it is the last epoch's validation)
    assert monitor.history[-1][0] == trainer.max_epochs - 1
    return expected


def test_goldfish_labels_reach_the_gpt2_loss_and_the_monitor_agrees_with_a_plain_decode():
    recorder = RecordModelInputs()
    run = example.fit(goldfish_k=K, epochs=40, every_n_epochs=10, callbacks=[recorder])
    tokenizer = run["tokenizer"]
    eos, pad = tokenizer.token_to_id(example.EOS), tokenizer.token_to_id(example.PAD)
    assert run["goldfish"].k == K and run["goldfish"].h == H

    assert len(recorder.calls) == run["trainer"].global_step  # one training forward per step
    padded_batches = dropped_total = text_total = 0
    for call in recorder.calls:
        ids, mask, labels = call["input_ids"], call["attention_mask"], call["labels"]
        padding = mask == 0
        padded_batches += bool(padding.any())
        assert (ids[padding] == pad).all()
        assert (labels[padding] == example.IGNORE_INDEX).all()  # padding is never a target
        drop = goldfish_mask(ids, k=K, h=H, seed=0, exempt_token_ids=[eos], attention_mask=mask)
        expected = ids.masked_fill(padding, example.IGNORE_INDEX).masked_fill(drop, example.IGNORE_INDEX)
        assert torch.equal(labels, expected)  # exactly the goldfish labels reached the model's loss
        assert not drop[ids == eos].any()
        dropped_total += int((drop & ~padding)[:, 1:].sum())
        text_total += int((~padding)[:, 1:].sum())
    assert padded_batches > 0  # variable-length documents: the collate_fn padded
    assert 0.15 < dropped_total / text_total < 0.35  # about 1 target in k=4

    figures = _check_monitor_against_independent_decode(run)
    assert figures["token_match"] > 0.1  # the model learned its training documents, partly


def test_without_goldfish_the_monitor_agrees_with_a_plain_decode_on_memorized_probes():
    run = example.fit(goldfish_k=None, epochs=48, every_n_epochs=12)
    figures = _check_monitor_against_independent_decode(run)
    assert figures["exact_match"] > 0  # some probes are memorized verbatim
