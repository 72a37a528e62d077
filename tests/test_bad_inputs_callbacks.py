"""Bad inputs to the callbacks, table-driven (issue 14): each raises the stated exception type with a
message that names the argument (or, for setups, both callbacks / the setting) and the fix."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from _builders import quiet_trainer_kwargs, tiny_llama
from torch.utils.data import DataLoader

import antimemo.callbacks as cbs
from antimemo.callbacks._interactions import CompositionError

warnings.filterwarnings("ignore", ".*does not have many workers.*")

# (class, kwargs, exception, regex naming the argument)
CONSTRUCTOR_CASES = [
    ("GoldfishTokenDropout", {"k": 1}, ValueError, r"^k must be an integer >= 2, got 1"),
    ("GoldfishTokenDropout", {"h": 0}, ValueError, r"^h must be an integer >= 1, got 0"),
    ("GoldfishTokenDropout", {"ignore_index": "x"}, TypeError, r"^ignore_index must be an integer label value, got 'x'"),
    ("GoldfishTokenDropout", {"labels_key": ""}, TypeError, r"^labels_key must be a non-empty string batch key"),
    ("GoldfishTokenDropout", {"input_ids_key": 3}, TypeError, r"^input_ids_key must be a non-empty string batch key"),
    ("LossFloor", {"floor": -1.0}, ValueError, r"^floor must be a finite number >= 0 .*got -1.0"),
    ("LossFloor", {"floor": float("nan")}, ValueError, r"^floor must be a finite number >= 0 .*got nan"),
    ("LossFloor", {"module_name": 3}, TypeError, r"^module_name must be a string, got 3"),
    ("LossTruncation", {"c": 1.0}, ValueError, r"^c must be a number in \[0, 1\), got 1.0"),
    ("LossTruncation", {"buffer_size": 0}, ValueError, r"^buffer_size must be an integer >= 1, got 0"),
    ("SpectralNormPenalty", {"lam": -0.1}, ValueError, r"^lam must be a finite number >= 0, got -0.1"),
    ("SpectralNormPenalty", {"n_power_iterations": 0}, ValueError, r"^n_power_iterations must be an integer >= 1, got 0"),
    ("ExampleTiedDropout", {"p_fixed": 0.0}, ValueError, r"^p_fixed must be a number in \(0, 1\], got 0.0"),
    ("ExampleTiedDropout", {"p_mem": 1.5}, ValueError, r"^p_mem must be a number in \[0, 1\], got 1.5"),
    ("ExampleTiedDropout", {"module_pattern": "("}, ValueError, r"^module_pattern='\(' is not a valid regular expression"),
    ("DedupSampling", {"policy": "keep"}, ValueError, r"^policy must be one of .*got 'keep'"),
    ("DedupSampling", {"seed": -2}, ValueError, r"^seed must be an integer >= 0, got -2"),
    ("DedupSampling", {"policy": "drop", "num_samples": 3}, ValueError, r"^num_samples applies only to policy='downweight'"),
    ("DedupSampling", {"policy": "cap", "max_copies": 0}, ValueError, r"^max_copies must be an integer >= 1, got 0"),
    ("DedupSampling", {"index": 3.5}, TypeError, r"^index must be a DuplicateIndex, the path of a saved one, or None"),
    ("MemorizationMonitor", {"num_probes": 0}, ValueError, r"^num_probes must be an integer >= 1, got 0"),
    ("MemorizationMonitor", {"prefix_length": 0}, ValueError, r"^prefix_length must be an integer >= 1, got 0"),
    ("MemorizationMonitor", {"every_n_epochs": 0}, ValueError, r"^every_n_epochs must be an integer >= 1, got 0"),
    ("MemorizationMonitor", {"near_verbatim_threshold": 2.0}, ValueError, r"^near_verbatim_threshold must be a number in \[0, 1\], got 2.0"),
    ("MemorizationMonitor", {"mia_scores": ("nope",)}, ValueError, r"^mia_scores must be distinct names from"),
    ("MemorizationBudget", {"control": "k"}, ValueError, r"^control must be '<callback>.<attribute>'.*got 'k'"),
    ("MemorizationBudget", {"max_value": -1}, ValueError, r"^max_value must be a finite number >= 0, got -1"),
    ("MemorizationBudget", {"relax_below": 2}, ValueError, r"^relax_below must be a number in \[0, 1\], got 2"),
    ("MemorizationBudget", {"factor": 1.0}, ValueError, r"^factor must be a number > 1, got 1.0"),
    ("MemorizationBudget", {"step": 0}, ValueError, r"^step must be a number > 0 or None"),
    ("MemorizationBudget", {"control": "x.y"}, ValueError, r"^stronger is required for the knob 'x.y'"),
    ("MemorizationBudget", {"bounds": (3, 1)}, ValueError, r"^bounds must be \(low, high\) numbers with low <= high, got \(3, 1\)"),
    ("MemorizationBudget", {"metric": ""}, ValueError, r"^metric must be a non-empty metric key"),
    ("ConditioningNoise", {"std": -1.0}, ValueError, r"^std must be a number >= 0, got -1.0"),
    ("LabelRandomization", {"p": 1.5}, ValueError, r"^p must be a probability in \[0, 1\], got 1.5"),
    ("ReplicaPenalty", {"strength": -1.0}, ValueError, r"^strength must be a finite number >= 0, got -1.0"),
    ("ReplicaMonitor", {"threshold": float("nan")}, ValueError, r"^threshold must be a finite number for similarity='cosine'"),
    ("ReplicaMonitor", {"threshold": 5.0}, ValueError, r"^threshold=5.0 is outside \[-1, 1\) for similarity='cosine'"),
]


@pytest.mark.parametrize("name,kwargs,exc,match", CONSTRUCTOR_CASES, ids=[f"{c[0]}-{next(iter(c[1]))}" for c in CONSTRUCTOR_CASES])
def test_constructor_rejects(name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        getattr(cbs, name)(**kwargs)


VOCAB = 32


class LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama(vocab=VOCAB, hidden=16, layers=1, heads=2, seed=0)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch.get("labels", batch["input_ids"])).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _rows(n=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (12,), generator=g)} for _ in range(n)]


def _fit(callbacks, max_epochs=1):
    trainer = pl.Trainer(callbacks=callbacks, **quiet_trainer_kwargs(max_epochs=max_epochs, num_sanity_val_steps=0))
    trainer.fit(LM(), DataLoader(_rows(), batch_size=4), DataLoader(_rows(4), batch_size=4))
    return trainer


def _monitor():
    return cbs.MemorizationMonitor(num_probes=2, prefix_length=4, suffix_length=4)


SETUP_CASES = [
    # a budget whose metric is never logged would never act: raise at the first evaluation, listing the keys
    (lambda: [cbs.GoldfishTokenDropout(), _monitor(), cbs.MemorizationBudget(metric="memorization/exact_mach")],
     ValueError, r"MemorizationBudget\(metric='memorization/exact_mach'\): the metric is not in "
                 r"trainer.callback_metrics.*Keys present: \[.*'memorization/exact_match'"),
    (lambda: [cbs.GoldfishTokenDropout(), cbs.MemorizationBudget(metric="val_los")],
     ValueError, r"MemorizationBudget\(metric='val_los'\).*Keys present: \[.*'val_loss'"),
    (lambda: [cbs.MemorizationBudget(control="goldfish.k")], ValueError,
     r"MemorizationBudget\(control='goldfish.k'\): no callback of class GoldfishTokenDropout"),
    (lambda: [cbs.LossFloor(floor=0.5), cbs.LossFloor(floor=1.0)], CompositionError,
     r"LossFloor \+ LossFloor are refused together.*Fix: keep one LossFloor"),
    (lambda: [cbs.LossTruncation(), cbs.DifferentialPrivacy(noise_multiplier=1.0)], CompositionError,
     r"LossTruncation \+ DifferentialPrivacy are refused together.*per-example sensitivity"),
    (lambda: [cbs.GoldfishTokenDropout(), cbs.ReplicaPenalty()], CompositionError,
     r"GoldfishTokenDropout \+ ReplicaPenalty are refused together"),
    (lambda: [cbs.LossFloor(module_name="net")], ValueError, r"has no submodule 'net' \(module_name\)"),
    (lambda: [cbs.ExampleTiedDropout()], KeyError, r"no key 'example_id' \(example_ids_key\)"),
]


@pytest.mark.parametrize("make,exc,match", SETUP_CASES, ids=[str(i) for i in range(len(SETUP_CASES))])
def test_setup_rejects(make, exc, match):
    with pytest.raises(exc, match=match):
        _fit(make())


def test_there_are_enough_cases():
    assert len(CONSTRUCTOR_CASES) + len(SETUP_CASES) >= 40
