"""MemorizationMonitor(untargeted=...): sampled generations from prompts without a training prefix,
looked up in an index of the training tokens, with a held-out baseline; and the monitor in
trainer.validate (an audit of a finished model)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from _builders import quiet_trainer_kwargs, tiny_llama
from torch.utils.data import DataLoader

from antimemo.callbacks import MemorizationMonitor
from antimemo.functional.generation import sample_generate
from antimemo.metrics import UntargetedExtraction
from antimemo.probes_untargeted import UntargetedConfig
from antimemo.suffix_index import TokenIndex

warnings.filterwarnings("ignore", ".*does not have many workers.*")

VOCAB, LENGTH = 24, 24


def _rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=g)} for _ in range(n)]


TRAIN, VAL = _rows(8, 1), _rows(8, 2)


class LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama(vocab=VOCAB, hidden=32, layers=2, heads=4, seed=0)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Data(pl.LightningDataModule):
    def setup(self, stage=None):
        self.train_dataset, self.val_dataset = TRAIN, VAL

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=8, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.val_dataset, batch_size=8)


UNTARGETED = {"num_generations": 6, "num_tokens": 16, "min_span": 8, "bos_id": 0, "holdout_length": 4, "repeats": 4}


def _monitor(**kw):
    return MemorizationMonitor(num_probes=4, prefix_length=8, suffix_length=8, holdout="val", untargeted=UNTARGETED, **kw)


def test_untargeted_keys_match_an_independent_recount():
    module, monitor = LM(), _monitor()
    trainer = pl.Trainer(callbacks=[monitor], **quiet_trainer_kwargs(max_epochs=150, check_val_every_n_epoch=150,
                                                                     num_sanity_val_steps=0))  # fmt: skip
    trainer.fit(module, Data())
    res = monitor.last_results
    for kind in ("empty", "holdout", "repeat"):
        assert 0.0 <= res[f"untargeted/{kind}/extraction_rate"] <= 1.0
    assert res["untargeted/generations"] == 18 and res["untargeted/holdout_baseline/generations"] == 6
    # memorized after 150 steps on 8 rows: sampling from BOS reproduces training spans, held-out text does not
    assert res["untargeted/extraction_rate"] > res["untargeted/holdout_baseline/extraction_rate"]
    assert res["untargeted/longest_match"] >= 8
    # an independent recount of the empty-prompt kind with the same seeds
    index = TokenIndex.build(TRAIN)
    metric = UntargetedExtraction(index, min_span=8)
    g = torch.Generator().manual_seed(0 * 1000 + 100 + 0 * 7919 + 0)
    module.model.eval()
    generated = sample_generate(module.model, torch.zeros(6, 1, dtype=torch.long), 16, top_k=40, generator=g)
    metric.update(generated)
    # the evaluator's counter advanced once (one evaluation): its seed for that evaluation was 0
    assert float(metric.compute()["untargeted/extraction_rate"]) == res["untargeted/empty/extraction_rate"]


def test_monitor_evaluates_in_validate_with_probes_from_the_datamodule():
    module = LM()
    pl.Trainer(**quiet_trainer_kwargs(max_epochs=5, limit_val_batches=0)).fit(module, Data())
    monitor = _monitor(decode_every_n_evaluations=5)
    trainer = pl.Trainer(callbacks=[monitor], **quiet_trainer_kwargs())
    out = trainer.validate(module, Data(), verbose=False)[0]
    assert monitor.probes is not None and monitor.probes.shape == (4, 16)
    for key in ("exact_match", "token_match", "near_verbatim", "untargeted/extraction_rate", "mia/loss/auc"):
        assert f"memorization/{key}" in out, sorted(out)
    # the probes are the first rows of training examples
    assert any(torch.equal(monitor.probes[0], r["input_ids"][:16]) for r in TRAIN)


@pytest.mark.parametrize(
    "value,exc,match",
    [
        ({"num_generations": 0}, ValueError, r"untargeted\['num_generations'\] must be an integer >= 1"),
        ({"kinds": ["empty", "bogus"]}, ValueError, r"untargeted\['kinds'\] must be distinct names"),
        ({"temperature": 0}, ValueError, r"untargeted\['temperature'\] must be a number > 0"),
        ({"nope": 1}, ValueError, r"untargeted has unknown keys \['nope'\]"),
        ("yes", TypeError, r"untargeted must be None, a bool or a dict"),
    ],
)
def test_untargeted_config_errors(value, exc, match):
    with pytest.raises(exc, match=match):
        UntargetedConfig.from_argument(value)


def test_empty_prompts_without_a_bos_id_are_refused():
    monitor = MemorizationMonitor(num_probes=4, prefix_length=8, suffix_length=8, untargeted={"kinds": ["empty"]})
    trainer = pl.Trainer(callbacks=[monitor], **quiet_trainer_kwargs(max_epochs=1, num_sanity_val_steps=0))
    with pytest.raises(ValueError, match=r"includes 'empty' but the model has no bos_token_id; pass untargeted=\{'bos_id'"):
        m = LM()
        m.model.config.bos_token_id = None
        trainer.fit(m, Data())


def test_holdout_prompts_come_from_rows_of_different_lengths():
    from antimemo.probes_untargeted import UntargetedEvaluator

    holdout = [{"input_ids": torch.arange(n) % VOCAB} for n in (3, 10, 20)]
    cfg = UntargetedConfig.from_argument({"kinds": ["holdout"], "holdout_length": 8, "num_generations": 4,
                                          "num_tokens": 4, "min_span": 4})  # fmt: skip
    ev = UntargetedEvaluator(cfg, TRAIN, holdout)
    assert ev._holdout_windows.shape == (3 + 13, 8)  # windows of the 10- and 20-token rows only
    out = ev.evaluate(tiny_llama(vocab=VOCAB, hidden=32, layers=2, heads=4, seed=0), torch.device("cpu"))
    assert out["untargeted/generations"] == 4
    with pytest.raises(ValueError, match=r"untargeted\['holdout_length'\]=30 is longer than every held-out sequence"):
        UntargetedEvaluator(UntargetedConfig.from_argument({"kinds": ["holdout"], "holdout_length": 30}), TRAIN, holdout)
