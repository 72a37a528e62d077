"""Bad DifferentialPrivacy inputs and setups, table-driven (issue 14, "Fail closed").

Each row builds one bad input (a constructor argument, a trainer setting, a data loader, a model,
a resume, a misuse during training) and states the exception type and a regex that names the
argument or setting at fault. Nothing trains non-privately while an epsilon is reported.
"""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from antimemo.callbacks import LossTruncation
from antimemo.callbacks._interactions import CompositionError
from antimemo.callbacks.dp import DifferentialPrivacy

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)

N = 32
X = torch.randn(N, 4, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()


class Toy(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TwoOptimizers(Toy):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


class ForeignParameter(Toy):
    def configure_optimizers(self):
        self.stray = [torch.nn.Parameter(torch.zeros(3))]  # a list hides it from the module's parameters
        return torch.optim.SGD([*self.parameters(), *self.stray], lr=0.1)


class WithBatchNorm(Toy):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


class Bypass(Toy):
    def training_step(self, batch, batch_idx):  # runs the weights without calling the hooked modules
        h = torch.tanh(F.linear(batch[0], self.net[0].weight, self.net[0].bias))
        return F.cross_entropy(F.linear(h, self.net[2].weight, self.net[2].bias), batch[1])


class RawStep(Toy):
    """Manual optimization that keeps the original optimizer and steps it (the issue's 0.0627 weight change)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self):
        self.raw = torch.optim.SGD(self.parameters(), lr=0.1)
        return self.raw

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self.net(batch[0]), batch[1]))
        self.raw.step()
        opt.step()


class SecondOptimizer(RawStep):
    def configure_optimizers(self):
        self.raw = torch.optim.SGD(self.parameters(), lr=0.1)  # not the one Lightning wraps
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Unfreezes(Toy):
    def __init__(self):
        super().__init__()
        self.net[2].requires_grad_(False)

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx == 1:
            self.net[2].requires_grad_(True)


class Stream(IterableDataset):
    def __iter__(self):
        return iter(zip(X, Y))


def _loader(batch_size=8, **kw):
    return DataLoader(TensorDataset(X, Y), batch_size=batch_size, **kw)


def _fit(dp=None, model=None, loader=None, ckpt_path=None, callbacks=(), **trainer_kwargs):
    trainer_kwargs.setdefault("max_epochs", 1)
    trainer = pl.Trainer(
        accelerator="cpu", callbacks=[*([dp] if dp is not None else []), *callbacks], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(model or Toy(), loader if loader is not None else _loader(), ckpt_path=ckpt_path)
    return trainer


def _dp(**kwargs):
    kwargs.setdefault("noise_multiplier", 1.0)
    return DifferentialPrivacy(**kwargs)


def _non_private_resume(tmp_path):
    trainer = _fit(None, max_epochs=1)  # 4 plain SGD steps
    ckpt = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(ckpt)
    _fit(_dp(), ckpt_path=ckpt, max_epochs=2)


def _budget_forced_past(tmp_path):
    _fit(_dp(noise_multiplier=None, target_epsilon=1.0, epochs=1, accountant="rdp"), max_epochs=6, min_epochs=6)


# (id, build(tmp_path) that must raise, exception type, regex naming the argument or setting)
CASES = [
    # ---- constructor arguments
    ("no-noise-argument", lambda t: DifferentialPrivacy(), ValueError, r"noise_multiplier or target_epsilon"),
    ("both-noise-arguments", lambda t: _dp(target_epsilon=3.0), ValueError, r"exactly one of noise_multiplier or target_epsilon"),
    ("noise_multiplier-negative", lambda t: _dp(noise_multiplier=-0.5), ValueError, r"noise_multiplier must be .* got -0\.5"),
    ("noise_multiplier-string", lambda t: _dp(noise_multiplier="1"), ValueError, r"noise_multiplier must be a finite number"),
    ("target_epsilon-nan", lambda t: DifferentialPrivacy(target_epsilon=float("nan")), ValueError, r"target_epsilon must be"),
    ("delta-above-1", lambda t: _dp(delta=1.5), ValueError, r"delta must be in \(0, 1\).* got 1\.5"),
    ("max_grad_norm-zero", lambda t: _dp(max_grad_norm=0), ValueError, r"max_grad_norm must be a finite number > 0, got 0"),
    ("epochs-without-target", lambda t: _dp(epochs=2), ValueError, r"epochs=2 is only used with target_epsilon"),
    ("epochs-zero", lambda t: DifferentialPrivacy(target_epsilon=2.0, epochs=0), ValueError, r"epochs must be an integer >= 1"),
    ("accountant-unknown", lambda t: _dp(accountant="moments"), ValueError, r"accountant must be one of .*'moments'"),
    ("poisson_sampling-off", lambda t: _dp(poisson_sampling=False), ValueError, r"poisson_sampling=False is not supported"),
    ("poisson_sampling-not-bool", lambda t: _dp(poisson_sampling=1), TypeError, r"poisson_sampling must be a bool"),
    ("grad_sample_mode-unknown", lambda t: _dp(grad_sample_mode="ew"), ValueError, r"grad_sample_mode must be one of .*'ew'"),
    ("secure_mode-not-bool", lambda t: _dp(secure_mode="yes"), TypeError, r"secure_mode must be a bool.*'yes'"),
    ("secure_mode-without-torchcsprng", lambda t: _dp(secure_mode=True), ImportError, r"secure_mode=True needs torchcsprng"),
    ("fix-not-bool", lambda t: _dp(fix=1), TypeError, r"fix must be a bool.*got 1"),
    ("allow_nonprivate_start-not-bool", lambda t: _dp(allow_nonprivate_start="no"), TypeError,
     r"allow_nonprivate_start must be a bool \(True or False\), got 'no' of type str"),
    ("reproducible_noise-not-bool", lambda t: _dp(reproducible_noise=None), TypeError, r"reproducible_noise must be a bool.*None"),
    ("secure_mode-and-reproducible_noise", lambda t: _dp(secure_mode=True, reproducible_noise=True), ValueError,
     r"secure_mode=True and reproducible_noise=True contradict"),
    # ---- trainer settings
    ("accumulate_grad_batches", lambda t: _fit(_dp(), accumulate_grad_batches=2), ValueError, r"accumulate_grad_batches=2"),
    ("gradient_clip_val", lambda t: _fit(_dp(), gradient_clip_val=0.5), ValueError, r"gradient_clip_val=0\.5.*max_grad_norm"),
    ("fp16-precision", lambda t: _fit(_dp(), precision="16-true"), ValueError, r"precision='16-true'.*bf16-mixed"),
    ("target_epsilon-without-length", lambda t: _fit(_dp(noise_multiplier=None, target_epsilon=3.0), max_epochs=-1,
                                                     max_time="00:00:00:05"), ValueError, r"epochs=.*max_epochs.*max_steps"),
    ("min_epochs-past-the-budget", _budget_forced_past, RuntimeError, r"target_epsilon=1.*min_epochs"),
    # ---- data
    ("delta-at-least-1-over-N", lambda t: _fit(_dp(delta=0.05)), ValueError, r"delta=0\.05 must be below 1/N = 1/32"),
    ("batch_size-above-N", lambda t: _fit(_dp(), loader=_loader(batch_size=33)), ValueError,
     r"batch_size=33 x world_size=1 exceeds the 32 training examples"),
    ("iterable-dataset", lambda t: _fit(_dp(), loader=DataLoader(Stream(), batch_size=8)), TypeError,
     r"map-style training dataset.*IterableDataset Stream"),
    ("loader-without-batch_size", lambda t: _fit(_dp(), loader=DataLoader(TensorDataset(X, Y), batch_sampler=[[0, 1]])),
     ValueError, r"batch_size=None.*DataLoader\(batch_size=\.\.\.\)"),
    # ---- models and optimizers
    ("two-optimizers", lambda t: _fit(_dp(), model=TwoOptimizers()), ValueError, r"exactly one optimizer, configure_optimizers returned 2"),
    ("optimizer-parameter-outside-module", lambda t: _fit(_dp(), model=ForeignParameter()), ValueError,
     r"configure_optimizers returned holds a trainable parameter of shape \(3,\)"),
    ("batchnorm-without-fix", lambda t: _fit(_dp(), model=WithBatchNorm()), ValueError, r"(?s)net\.1 \(BatchNorm1d\).*fix=True"),
    ("forward-bypasses-hooks", lambda t: _fit(_dp(), model=Bypass()), RuntimeError, r"parameter net\.0\.weight has no per-sample gradient"),
    # ---- pairs with other callbacks (docs/design.md, "Declared interactions")
    ("loss-truncation-pair", lambda t: _fit(_dp(), callbacks=[LossTruncation()]), CompositionError,
     r"DifferentialPrivacy.*LossTruncation|LossTruncation.*DifferentialPrivacy"),
    # ---- misuse over a run
    ("non-private-resume", _non_private_resume, RuntimeError, r"no DifferentialPrivacy state.*allow_nonprivate_start=True"),
    ("raw-optimizer-step", lambda t: _fit(_dp(max_grad_norm=1e-6), model=RawStep()), RuntimeError,
     r"configure_optimizers returned \(SGD\) was stepped directly.*self\.optimizers\(\)"),
    ("second-optimizer-step", lambda t: _fit(_dp(), model=SecondOptimizer()), RuntimeError,
     r"parameter\(s\) net\.0\.weight.*without going through the DP optimizer's step"),
    ("unfreeze-mid-run", lambda t: _fit(_dp(), model=Unfreezes()), RuntimeError,
     r"parameter net\.2\.weight became trainable after DP started.*Unfreeze it before fit"),
]


@pytest.mark.parametrize("build,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_dp_input_is_refused(build, exc, match, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(exc, match=match):
            build(tmp_path)


def test_the_table_covers_every_kind_of_bad_input():
    ids = {c[0] for c in CASES}
    assert len(CASES) >= 15
    for needed in ("accumulate_grad_batches", "gradient_clip_val", "fp16-precision", "non-private-resume",
                   "raw-optimizer-step", "unfreeze-mid-run", "delta-at-least-1-over-N", "batch_size-above-N",
                   "iterable-dataset", "loader-without-batch_size"):
        assert needed in ids
