"""DifferentialPrivacy fails closed (issue 14): non-private starts, secret noise, raw optimizer steps,
mid-run unfreezing, and the guarantee as the report states it."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from antimemo.callbacks.dp import DifferentialPrivacy
from antimemo.report import build_report, format_report, write_report

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")

G = torch.Generator().manual_seed(0)
X = torch.randn(64, 4, generator=G)
Y = (X[:, 0] > 0).long()
IDX = torch.arange(64)


class Toy(pl.LightningModule):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        self.batches: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.batches.append(batch[2].tolist())
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _loader():
    return DataLoader(TensorDataset(X, Y, IDX), batch_size=8, shuffle=True)  # q = 8/64: 8 steps per epoch


def _trainer(callbacks, **kw):
    kw.setdefault("max_epochs", 1)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu", callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kw,
    )


def _fit(dp, model=None, seed=0, ckpt_path=None, **kw):
    pl.seed_everything(seed, verbose=False)
    model = model if model is not None else Toy()
    trainer = _trainer([dp] if dp is not None else [], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    return trainer, model


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _dp(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return DifferentialPrivacy(noise_multiplier=1.0, **kw)


# ---------------------------------------------------------------- 1. non-private starts


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    """A checkpoint of 3 epochs (24 steps) of plain, non-private SGD."""
    trainer, _ = _fit(None, max_epochs=3)
    path = tmp_path_factory.mktemp("plain") / "plain.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_resuming_a_non_private_checkpoint_is_refused(plain_ckpt):
    dp = _dp()
    model = Toy()
    with pytest.raises(RuntimeError, match=r"allow_nonprivate_start") as err:
        _fit(dp, model=model, max_epochs=4, ckpt_path=plain_ckpt)
    message = str(err.value)
    assert "no DifferentialPrivacy state" in message and "24 training steps without DP" in message
    assert "Fix:" in message and "plain.ckpt" in message
    assert dp.steps == 0 and dp.epsilon == 0.0  # refused before any step: nothing to report


def test_non_private_start_with_the_opt_in_is_counted_and_reported(plain_ckpt, tmp_path):
    dp = _dp(allow_nonprivate_start=True)
    pl.seed_everything(0, verbose=False)
    trainer = _trainer([dp], max_epochs=4)
    with pytest.warns(UserWarning, match=r"covers only the DP steps after the private start, not the 24 non-private"):
        trainer.fit(Toy(), _loader(), ckpt_path=plain_ckpt)
    assert dp.steps == 8 and dp.nonprivate_steps == 24 and dp.nonprivate_start
    assert float(trainer.callback_metrics["dp/nonprivate_steps"]) == 24.0
    g = dp.guarantee()
    assert g["private_steps"] == 8 and g["nonprivate_steps"] == 24 and g["nonprivate_start"] is True
    assert "ONLY the 8 steps after the private start" in g["statement"] and "24 non-private steps" in g["statement"]
    table = format_report(build_report(trainer))
    assert "DP non-private steps" in table and "24: WARNING epsilon covers only the 8 steps" in table

    # the count travels with the checkpoint; resuming it needs the opt-in again and keeps the count
    ckpt = tmp_path / "mixed.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["callbacks"]["DifferentialPrivacy"]["nonprivate_steps"] == 24
    with pytest.raises(RuntimeError, match=r"records 24 non-private training steps.*allow_nonprivate_start"):
        _fit(_dp(), max_epochs=5, ckpt_path=ckpt)
    again = _dp(allow_nonprivate_start=True)
    _fit(again, max_epochs=5, ckpt_path=ckpt)
    assert again.nonprivate_steps == 24 and again.steps == 16


def test_a_dp_history_shorter_than_the_global_step_is_refused(tmp_path):
    trainer, _ = _fit(_dp(), max_epochs=2)
    ckpt = tmp_path / "dp.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 16
    state["callbacks"]["DifferentialPrivacy"]["accountant"]["history"] = [[1.0, 0.125, 10]]  # 6 steps unaccounted
    torch.save(state, ckpt)
    with pytest.raises(RuntimeError, match=r"16 training steps but the DP history records only 10 private steps: 6"):
        _fit(_dp(), max_epochs=3, ckpt_path=ckpt)


def test_a_trainer_that_trained_without_dp_first_is_refused():
    # global_step > 0 with an empty accountant history, without any checkpoint
    pl.seed_everything(0, verbose=False)
    trainer = _trainer([], max_epochs=1)
    model = Toy()
    trainer.fit(model, _loader())
    assert trainer.global_step == 8
    dp = _dp()
    trainer.callbacks.append(dp)
    trainer.fit_loop.max_epochs = 2
    with pytest.raises(RuntimeError, match=r"8 training steps but the DP history records only 0 private steps"):
        trainer.fit(model, _loader())


def test_resuming_a_dp_checkpoint_needs_no_opt_in(tmp_path):
    trainer, _ = _fit(_dp(), max_epochs=1)
    ckpt = tmp_path / "dp.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = _dp()
    _fit(resumed, max_epochs=2, ckpt_path=ckpt)
    assert resumed.steps == 16 and resumed.nonprivate_steps == 0 and not resumed.nonprivate_start


# ---------------------------------------------------------------- 2. noise from the OS entropy source


def test_default_noise_and_sampling_do_not_follow_the_seed():
    _, a = _fit(_dp(), seed=0)
    _, b = _fit(_dp(), seed=0)
    assert not torch.equal(_weights(a), _weights(b))  # same seed, different noise
    assert a.batches != b.batches  # and different Poisson batches: the seed does not reveal who was sampled


def test_reproducible_noise_is_bit_identical_and_warns():
    with pytest.warns(UserWarning, match=r"reproducible_noise=True.*anyone who knows or guesses the seed"):
        DifferentialPrivacy(noise_multiplier=1.0, reproducible_noise=True)
    _, a = _fit(_dp(reproducible_noise=True), seed=0)
    _, b = _fit(_dp(reproducible_noise=True), seed=0)
    _, other = _fit(_dp(reproducible_noise=True), seed=1)
    assert torch.equal(_weights(a), _weights(b)) and a.batches == b.batches
    assert not torch.equal(_weights(a), _weights(other)) and a.batches != other.batches  # another seed


def test_the_noise_seed_is_not_in_the_checkpoint(tmp_path):
    trainer, _ = _fit(_dp(), max_epochs=1)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["DifferentialPrivacy"]
    assert sorted(saved) == [
        "accountant", "delta", "max_grad_norm", "noise_multiplier", "nonprivate_start", "nonprivate_steps", "sample_rate",
    ]


# ---------------------------------------------------------------- 3. raw optimizer steps


class Manual(Toy):
    """Manual optimization; ``raw`` picks what else steps the weights besides the DP optimizer."""

    def __init__(self, raw=None):
        super().__init__()
        self.automatic_optimization = False
        self.raw_kind = raw

    def configure_optimizers(self):
        self.raw = torch.optim.SGD(self.parameters(), lr=0.5)  # a reference to the original optimizer
        if self.raw_kind == "separate":
            self.other = torch.optim.SGD(self.parameters(), lr=0.5)
        return self.raw

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.manual_backward(loss)
        self.log("train_loss", loss)
        if self.raw_kind == "original":
            self.raw.step()  # the non-private step the issue reported (weights moved by 0.0627)
        elif self.raw_kind == "separate":
            self.other.step()
        opt.step()
        if self.raw_kind == "data":
            with torch.no_grad():
                self.net[0].weight.data.add_(0.01)  # bypasses version counters: caught by the value fingerprint


def test_manual_optimization_through_self_optimizers_works():
    dp = _dp()
    trainer, _ = _fit(dp, model=Manual())
    assert dp.steps == 8 == trainer.global_step and dp.epsilon > 0


def test_stepping_the_original_optimizer_directly_is_refused_before_it_changes_the_weights():
    model = Manual("original")
    before = _weights(model)
    with pytest.raises(RuntimeError, match=r"configure_optimizers returned \(SGD\) was stepped directly.*self\.optimizers\(\)"):
        _fit(_dp(max_grad_norm=1e-6), model=model)
    assert torch.equal(before, _weights(model))


@pytest.mark.parametrize("kind", ["separate", "data"])
def test_a_parameter_change_outside_the_dp_step_is_refused(kind):
    dp = _dp(max_grad_norm=1e-6)
    with pytest.raises(RuntimeError, match=r"net\.0\.weight.*changed .*without going through the DP optimizer's step.*Fix"):
        _fit(dp, model=Manual(kind))
    assert dp.steps <= 1


# ---------------------------------------------------------------- 4. unfreezing mid-run


class Unfreezes(Toy):
    def __init__(self):
        super().__init__()
        self.net[0].requires_grad_(False)

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx == 2:
            self.net[0].requires_grad_(True)


def test_unfreezing_a_layer_mid_run_is_named():
    dp = _dp()
    with pytest.raises(RuntimeError, match=r"parameter net\.0\.weight became trainable after DP started.*Unfreeze it before fit"):
        _fit(dp, model=Unfreezes())
    assert dp.steps == 2  # the two steps before the unfreeze were private


class WritesFrozen(Toy):
    """The first layer is frozen (as a LoRA base model is); training_step writes it through p.data."""

    def __init__(self, at_batch: int):
        super().__init__()
        self.net[0].requires_grad_(False)
        self.at_batch = at_batch

    def training_step(self, batch, batch_idx):
        if batch_idx == self.at_batch:
            with torch.no_grad():
                self.net[0].weight.data.add_(batch[0].mean())  # data-dependent, outside any DP step
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("mode", ["hooks", "bookkeeping"])
def test_a_write_to_a_frozen_parameter_is_refused_at_the_end_of_its_batch(mode):
    """Frozen weights are checked once per batch (not before and after every step, as trainable ones):
    the write is still refused, in the batch it happens, naming the parameter."""
    dp = _dp(grad_sample_mode=mode)
    with pytest.raises(RuntimeError, match=r"net\.0\.weight changed during this batch \(it was frozen at fit start"):
        _fit(dp, model=WritesFrozen(at_batch=3))
    assert dp.steps == 4  # batches 0-3 stepped; the end of batch 3 refused
    dp = _dp(grad_sample_mode=mode)
    _fit(dp, model=WritesFrozen(at_batch=-1))  # no write: trains through
    assert dp.steps == 8


# ---------------------------------------------------------------- 5. the guarantee in the report


def test_report_states_the_whole_guarantee(tmp_path):
    dp = _dp()
    trainer, _ = _fit(dp, max_epochs=2)
    report = build_report(trainer)
    g = report["dp_guarantee"]
    assert g["epsilon"] == pytest.approx(dp.epsilon) and g["delta"] == pytest.approx(1 / 640)
    assert (g["accountant"], g["private_steps"], g["noise_multiplier"], g["max_grad_norm"]) == ("prv", 16, 1.0, 1.0)
    assert g["sample_rate"] == 0.125 and g["dataset_size"] == 64
    assert g["reproducible_noise"] is False and g["noise"] == "secret"
    assert g["nonprivate_start"] is False and g["nonprivate_steps"] == 0
    assert "one training example" in g["unit"]
    path = write_report(report, tmp_path / "run" / "report.json")
    assert json.loads(path.read_text())["dp_guarantee"] == g
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in format_report(report).splitlines()[3:-1]}
    assert rows["DP guarantee (one example, all models)"] == f"epsilon={dp.epsilon:.3f}, delta=0.00156 (prv accountant)"
    assert rows["DP private steps"] == "16 (noise_multiplier=1.0000, max_grad_norm=1.0, sample_rate=0.125)"
    assert rows["DP noise"] == "secret (seeded from the OS entropy source)"
    assert rows["DP non-private steps"] == "0"
    assert "DP epsilon (dp/epsilon)" not in rows  # no bare epsilon next to the guarantee


def test_report_flags_reproducible_noise_and_no_noise():
    trainer, _ = _fit(_dp(reproducible_noise=True))
    table = format_report(build_report(trainer))
    assert "REPRODUCIBLE from the seed (reproducible_noise=True)" in table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dp0 = DifferentialPrivacy(noise_multiplier=0.0)
    trainer, _ = _fit(dp0)
    report = build_report(trainer)
    assert math.isinf(report["dp_guarantee"]["epsilon"]) and "no privacy guarantee" in report["dp_guarantee"]["statement"]
    assert "none: epsilon = inf" in format_report(report)


def test_an_old_report_without_the_guarantee_does_not_show_a_bare_epsilon():
    table = format_report({"goldfish": None, "metrics": {"dp/epsilon": 2.5}})
    assert "2.500 (no dp_guarantee in this report" in table


def test_report_json_is_written_atomically(tmp_path, monkeypatch):
    path = write_report({"exact_match": 1.0}, tmp_path / "report.json")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report({"exact_match": 0.0}, path)
    assert json.loads(path.read_text()) == {"exact_match": 1.0}  # the old report survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary file left behind
