"""The diffusion callbacks together: every pair trains on the tiny DiffusionModule with each member's
own effect still observable (and, for the members left out, absent); DP and LM-only callbacks are
refused with them at setup, naming both callbacks.

Observations (one ``Recorder``, last in the callback list, so it sees what the model saw):

- ConditioningNoise: in training, the class embedding's output (after the noise hook) differs
  from the embedding's plain ``forward`` of the same labels.
- LabelRandomization (p=1): labels fed to the class embedding differ from the dataset's labels of
  the drawn examples.
- ReplicaPenalty (threshold=-1, min_noise=0: always active): ``train/replica_penalty`` > 0 logged.
- ReplicaMonitor: ``replication/rate`` logged after validation and ``last_results`` filled.
- DedupSampling (policy="drop"): the training set holds byte-identical copies; the loader draws
  exactly the sampler's ``kept_indices()``, one per distinct image.
"""

from __future__ import annotations

from itertools import combinations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from antimemo import (
    ConditioningNoise,
    DedupSampling,
    DifferentialPrivacy,
    GoldfishTokenDropout,
    LabelRandomization,
    ReplicaMonitor,
    ReplicaPenalty,
)
from antimemo.callbacks._interactions import CompositionError, Declaration, refusal
from antimemo.diffusion import ImageDataset

from _tiny_diffusion import X, Y, tiny  # tests/ is on sys.path (pytest's rootdir-relative import)

# 24 training items: 20 distinct digits, then byte-identical copies of digits 0, 0, 1 and 2
TRAIN_ROWS = list(range(20)) + [0, 0, 1, 2]
DISTINCT = 20


class PosDataset(ImageDataset):
    """ImageDataset items plus ``pos``: the item's position in the dataset (``index`` is the image row)."""

    def __getitem__(self, i):
        return {**super().__getitem__(i), "pos": torch.tensor(i)}


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(PosDataset(X[:20], Y[:20], rows=TRAIN_ROWS), batch_size=12, shuffle=False)

    def val_dataloader(self):
        return DataLoader(ImageDataset(X[100:108], Y[100:108]), batch_size=8, shuffle=False)


def make(name):
    return {
        "ReplicaMonitor": lambda: ReplicaMonitor(
            num_samples=4, batch_size=4, extra_similarities=(), num_pictures=0, background=False, num_inference_steps=2
        ),
        "ConditioningNoise": lambda: ConditioningNoise(std=1.0, seed=3),
        "LabelRandomization": lambda: LabelRandomization(p=1.0, seed=5),
        "ReplicaPenalty": lambda: ReplicaPenalty(strength=1.0, threshold=-1.0, min_noise=0.0),
        "DedupSampling": lambda: DedupSampling(policy="drop", progress=False),
    }[name]()


NAMES = ("ReplicaMonitor", "ConditioningNoise", "LabelRandomization", "ReplicaPenalty", "DedupSampling")
PAIRS = list(combinations(NAMES, 2))
DIFFUSION_ONLY = [n for n in NAMES if n != "DedupSampling"]  # DedupSampling's domain is "any"


class Recorder(Callback):
    """Per training batch: drawn positions, dataset labels, and what the class embedding received and returned."""

    def setup(self, trainer, pl_module, stage):
        self.positions, self.dataset_labels, self.embedded = [], [], []
        emb = pl_module.unet.class_embedding

        def hook(module, args, output):
            if module.training and torch.is_grad_enabled():
                # module.forward runs no hooks: the plain embedding of the same labels
                self.embedded.append((args[0].detach().clone(), output.detach().clone(), module.forward(*args).detach()))

        self.handle = emb.register_forward_hook(hook)  # after ConditioningNoise's (its setup runs first)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.positions.append(batch["pos"].clone())
        self.dataset_labels.append(Y[batch["index"]])

    def teardown(self, trainer, pl_module, stage):
        self.handle.remove()


def _fit(callbacks):
    pl.seed_everything(0)
    rec = Recorder()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[*callbacks, rec], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
    )
    trainer.fit(tiny(), datamodule=Data())
    return trainer, rec


def _effects(trainer, rec, cbs):
    """Whether each callback's effect shows in this run (by name)."""
    seen_labels = torch.cat([lab for lab, _, _ in rec.embedded])
    positions = torch.cat(rec.positions)
    out = {
        "ConditioningNoise": all(not torch.allclose(o, plain) for _, o, plain in rec.embedded),
        "LabelRandomization": bool((seen_labels != torch.cat(rec.dataset_labels)).any()),
        "ReplicaPenalty": float(trainer.callback_metrics.get("train/replica_penalty", 0.0)) > 0,
        "ReplicaMonitor": "replication/rate" in trainer.callback_metrics,
        "DedupSampling": len(positions) == DISTINCT,
    }
    # sanity of the record itself: one embedding call per training batch, on the labels of the batch
    assert len(rec.embedded) == len(rec.positions) == trainer.global_step
    assert seen_labels.shape == positions.shape
    return out


@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_pair_trains_with_each_members_effect(pair):
    cbs = {name: make(name) for name in pair}
    trainer, rec = _fit(list(cbs.values()))
    assert trainer.state.finished and trainer.global_step > 0
    effects = _effects(trainer, rec, cbs)
    for name in NAMES:
        assert effects[name] == (name in pair), (name, effects)
    positions = torch.cat(rec.positions)
    if "DedupSampling" in cbs:
        kept = cbs["DedupSampling"].sampler.kept_indices()
        assert sorted(positions.tolist()) == kept.tolist()  # exactly the kept examples, each once
        rows = torch.tensor(TRAIN_ROWS)[kept]
        assert len(set(rows.tolist())) == DISTINCT  # one per distinct image
    else:
        assert sorted(positions.tolist()) == list(range(len(TRAIN_ROWS)))
    if "ReplicaMonitor" in cbs:
        monitor = cbs["ReplicaMonitor"]
        assert 0.0 <= monitor.last_results["rate"] <= 1.0 and len(monitor.history) == 1
        assert monitor.reference.shape[0] == DISTINCT  # copies merged in the reference
    if "LabelRandomization" in cbs:
        assert cbs["LabelRandomization"].replaced > 0


def test_every_pair_is_declared_and_not_refused():
    cbs = [make(n) for n in NAMES]
    for cb in cbs:
        assert isinstance(type(cb).declaration, Declaration), type(cb).__name__
    for a, b in combinations(cbs, 2):
        assert refusal(a, b) is None, (type(a).__name__, type(b).__name__, refusal(a, b))
    # two monitors may share a trainer; two copies of a mitigation may not
    assert refusal(make("ReplicaMonitor"), make("ReplicaMonitor")) is None
    for name in NAMES[1:]:
        assert "Fix: keep one" in refusal(make(name), make(name))


def _refused_at_setup(callbacks):
    trainer = pl.Trainer(
        max_epochs=1, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    with pytest.raises(CompositionError) as err:
        trainer.fit(tiny(), datamodule=Data())
    assert trainer.global_step == 0
    return str(err.value)


@pytest.mark.parametrize("name", DIFFUSION_ONLY)
@pytest.mark.parametrize("dp_first", [True, False], ids=["dp_first", "dp_last"])
def test_dp_with_a_diffusion_callback_is_refused(name, dp_first):
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    cbs = [dp, make(name)] if dp_first else [make(name), dp]
    msg = _refused_at_setup(cbs)
    assert "DifferentialPrivacy" in msg and name in msg and "not verified" in msg and "Fix:" in msg


@pytest.mark.parametrize("name", DIFFUSION_ONLY)
def test_lm_callback_with_a_diffusion_callback_is_refused(name):
    msg = _refused_at_setup([GoldfishTokenDropout(k=4), make(name)])
    assert "GoldfishTokenDropout" in msg and name in msg and "DiffusionModule" in msg and "Fix:" in msg
