"""MemorizationMonitor(probe_dataset=...): probes drawn from a named datamodule dataset."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from antimemo.callbacks import MemorizationMonitor
from antimemo.lm import CausalLMModule, TextDataModule


def _fit(monitor: MemorizationMonitor, data: TextDataModule) -> None:
    model = CausalLMModule(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)


def test_probes_come_from_the_named_dataset():
    data = TextDataModule(seq_len=16, num_train=24, num_holdout=8, batch_size=8, duplicates=3, duplicate_copies=4)
    monitor = MemorizationMonitor(
        num_probes=3, prefix_length=8, suffix_length=8, probe_dataset="duplicated_dataset", log_prefix="mem_dup"
    )
    _fit(monitor, data)
    dup = data.duplicated_dataset.input_ids
    assert monitor.probes.shape == (3, 16)
    assert sorted(map(tuple, monitor.probes.tolist())) == sorted(map(tuple, dup.tolist()))
    assert set(monitor.last_results) >= {"exact_match", "token_match", "near_verbatim"}


def test_missing_dataset_attribute_is_a_clear_error():
    data = TextDataModule(seq_len=16, num_train=24, num_holdout=8, batch_size=8)  # no duplicates: attribute is None
    monitor = MemorizationMonitor(num_probes=2, prefix_length=8, suffix_length=8, probe_dataset="duplicated_dataset")
    with pytest.raises(ValueError, match="has no map-style dataset attribute 'duplicated_dataset'"):
        _fit(monitor, data)


@pytest.mark.parametrize("bad", ["", "not a name", 3])
def test_bad_probe_dataset_argument(bad):
    with pytest.raises(ValueError, match="probe_dataset must be None or the name of a datamodule attribute"):
        MemorizationMonitor(probe_dataset=bad)


def test_default_still_probes_the_training_set():
    torch.manual_seed(0)
    data = TextDataModule(seq_len=16, num_train=24, num_holdout=8, batch_size=8)
    monitor = MemorizationMonitor(num_probes=4, prefix_length=8, suffix_length=8)
    _fit(monitor, data)
    train = {tuple(r) for r in data.train_dataset.input_ids.tolist()}
    assert all(tuple(r) in train for r in monitor.probes.tolist())
