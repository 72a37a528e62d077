"""Every invalid DifferentialPrivacy argument or trainer combination fails with a clear error."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from antimemo.callbacks.dp import DifferentialPrivacy

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one of noise_multiplier or target_epsilon"),
        ({"noise_multiplier": 1.0, "target_epsilon": 3.0}, ValueError, "exactly one of"),
        ({"noise_multiplier": -1.0}, ValueError, "noise_multiplier must be a finite number >= 0, got -1.0"),
        ({"noise_multiplier": float("nan")}, ValueError, "noise_multiplier must be"),
        ({"noise_multiplier": float("inf")}, ValueError, "noise_multiplier must be"),
        ({"noise_multiplier": True}, ValueError, "noise_multiplier must be"),
        ({"target_epsilon": 0.0}, ValueError, "target_epsilon must be a finite number > 0, got 0.0"),
        ({"target_epsilon": float("inf")}, ValueError, "target_epsilon must be"),
        ({"noise_multiplier": 1.0, "delta": 0.0}, ValueError, "delta must be in"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, ValueError, "delta must be in"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, ValueError, "max_grad_norm must be a finite number > 0"),
        ({"noise_multiplier": 1.0, "max_grad_norm": -2}, ValueError, "max_grad_norm must be"),
        ({"noise_multiplier": 1.0, "epochs": 3}, ValueError, "epochs=3 is only used with target_epsilon"),
        ({"target_epsilon": 3.0, "epochs": 0}, ValueError, "epochs must be an integer >= 1"),
        ({"target_epsilon": 3.0, "epochs": 2.5}, ValueError, "epochs must be an integer >= 1"),
        ({"noise_multiplier": 1.0, "accountant": "moments"}, ValueError, "accountant must be one of"),
        ({"noise_multiplier": 1.0, "poisson_sampling": False}, ValueError, "poisson_sampling=False is not supported"),
        ({"noise_multiplier": 1.0, "poisson_sampling": "yes"}, TypeError, "poisson_sampling must be a bool"),
        ({"noise_multiplier": 1.0, "grad_sample_mode": "ew"}, ValueError, "grad_sample_mode must be one of"),
        ({"noise_multiplier": 1.0, "fix": 1}, TypeError, "fix must be a bool"),
        ({"noise_multiplier": 1.0, "secure_mode": "on"}, TypeError, "secure_mode must be a bool"),
        ({"noise_multiplier": 1.0, "secure_mode": True}, ImportError, "torchcsprng"),
    ],
)
def test_invalid_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DifferentialPrivacy(**kwargs)


def test_valid_constructions():
    assert DifferentialPrivacy(noise_multiplier=0.5).noise_multiplier == 0.5
    dp = DifferentialPrivacy(target_epsilon=3, epochs=2, accountant="rdp", grad_sample_mode="ghost", delta=1e-6)
    assert (dp.target_epsilon, dp.epochs, dp.delta_arg, dp.grad_sample_mode) == (3.0, 2, 1e-6, "ghost")
    with pytest.warns(UserWarning, match="no privacy guarantee"):
        DifferentialPrivacy(noise_multiplier=0)


# ---------------------------------------------------------------- trainer / data combinations

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


class Toy(pl.LightningModule):
    def __init__(self, n_opt=1):
        super().__init__()
        self.n_opt = n_opt
        self.net = torch.nn.Linear(4, 2)
        if n_opt > 1:
            self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        opts = [torch.optim.SGD(self.parameters(), lr=0.1) for _ in range(self.n_opt)]
        return opts[0] if self.n_opt == 1 else opts


def _fit(dp, model=None, loader=None, **kw):
    trainer = pl.Trainer(
        accelerator="cpu", callbacks=dp if isinstance(dp, list) else [dp], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_epochs=1, **kw,
    )
    trainer.fit(model or Toy(), loader if loader is not None else DataLoader(TensorDataset(X, Y), batch_size=8))
    return trainer


@pytest.mark.parametrize(
    ("trainer_kwargs", "match"),
    [
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
        ({"gradient_clip_val": 1.0}, "gradient_clip_val=1.0"),
        ({"precision": "16-true"}, "precision='16-true'"),
    ],
)
def test_incompatible_trainer_settings(trainer_kwargs, match):
    with pytest.raises(ValueError, match=match):
        _fit(DifferentialPrivacy(noise_multiplier=1.0), **trainer_kwargs)


def test_two_dp_callbacks():
    # Lightning itself refuses two stateful callbacks with the same state_key before any hook runs
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `DifferentialPrivacy`"):
        _fit([DifferentialPrivacy(noise_multiplier=1.0), DifferentialPrivacy(noise_multiplier=2.0)])


def test_multiple_optimizers():
    with pytest.raises(ValueError, match="exactly one optimizer, configure_optimizers returned 2"):
        _fit(DifferentialPrivacy(noise_multiplier=1.0), model=Toy(n_opt=2))


def test_delta_must_be_below_one_over_n():
    # N = 64: 1/N = 0.015625
    with pytest.raises(ValueError, match=r"delta=0.02 must be below 1/N = 1/64"):
        _fit(DifferentialPrivacy(noise_multiplier=1.0, delta=0.02))
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=0.01)
    _fit(dp)
    assert dp.delta == 0.01


def test_batch_larger_than_dataset():
    with pytest.raises(ValueError, match="exceeds the 64 training examples"):
        _fit(DifferentialPrivacy(noise_multiplier=1.0), loader=DataLoader(TensorDataset(X, Y), batch_size=65))


class Stream(IterableDataset):
    def __iter__(self):
        return iter(zip(X, Y))


def test_iterable_dataset_and_custom_batch_sampler():
    with pytest.raises(TypeError, match="map-style training dataset"):
        _fit(DifferentialPrivacy(noise_multiplier=1.0), loader=DataLoader(Stream(), batch_size=8))
    ds = TensorDataset(X, Y)
    batches = DataLoader(ds, batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="batch_size=None"):
        _fit(DifferentialPrivacy(noise_multiplier=1.0), loader=batches)


def test_target_epsilon_without_a_planned_length():
    with pytest.raises(ValueError, match="needs the planned length of training"):
        trainer = pl.Trainer(accelerator="cpu", callbacks=[DifferentialPrivacy(target_epsilon=3.0)], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, max_epochs=-1, max_time="00:00:00:05")
        trainer.fit(Toy(), DataLoader(TensorDataset(X, Y), batch_size=8))
