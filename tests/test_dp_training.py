"""DifferentialPrivacy in real (tiny, single-process) Lightning fits."""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import transformers
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

from antimemo.callbacks.dp import DifferentialPrivacy
from antimemo.callbacks._seams import existing_loss_seam
from antimemo.dp import PoissonBatchSampler, compute_epsilon

transformers.logging.set_verbosity_error()
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")

G = torch.Generator().manual_seed(0)
X = torch.randn(256, 8, generator=G)
Y = (X @ torch.randn(8, generator=G) > 0).long()  # linearly separable labels


class Toy(pl.LightningModule):
    def __init__(self, lr=0.5, bypass=False, none_loss=False):
        super().__init__()
        self.lr, self.bypass, self.none_loss = lr, bypass, none_loss
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def forward(self, x):
        if self.bypass:  # runs the weights without calling the (hooked) modules
            h = torch.tanh(F.linear(x, self.net[0].weight, self.net[0].bias))
            return F.linear(h, self.net[2].weight, self.net[2].bias)
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        return None if self.none_loss else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _trainer(callbacks, **kw):
    kw.setdefault("max_epochs", 1)
    return pl.Trainer(
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def _loader(n=256, batch_size=32, extra=()):
    return DataLoader(TensorDataset(X[:n], Y[:n], *extra), batch_size=batch_size, shuffle=True)


def _evaluate(model):
    with torch.no_grad():
        logits = model.net(X)
    return float(F.cross_entropy(logits, Y)), float((logits.argmax(1) == Y).float().mean())


def _fit(dp, model=None, loader=None, seed=0, ckpt_path=None, **kw):
    pl.seed_everything(seed, verbose=False)
    model = model or Toy()
    trainer = _trainer([dp] if dp is not None else [], **kw)
    trainer.fit(model, loader if loader is not None else _loader(), ckpt_path=ckpt_path)
    return trainer, model


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---------------------------------------------------------------- the noise is real


def test_noise_changes_the_weights_and_runs_are_reproducible():
    # reproducible_noise=True: sampling and noise follow the global seed (tests only)
    _, m0 = _fit(DifferentialPrivacy(noise_multiplier=0.0, reproducible_noise=True), max_epochs=2)
    _, m0b = _fit(DifferentialPrivacy(noise_multiplier=0.0, reproducible_noise=True), max_epochs=2)
    _, m1 = _fit(DifferentialPrivacy(noise_multiplier=1.0, reproducible_noise=True), max_epochs=2)
    _, plain = _fit(None, max_epochs=2)
    assert torch.equal(_weights(m0), _weights(m0b))  # same seed: same Poisson batches, same updates
    diff = float((_weights(m1) - _weights(m0)).norm())
    # noise std per coordinate and step is lr * sigma * C / (q N) = 0.5 * 1 * 1 / 32 = 0.016 over 16 steps
    assert diff > 0.1
    assert not torch.equal(_weights(m0), _weights(plain))  # clipping + Poisson batches differ from plain SGD


def test_huge_noise_destroys_learning_and_no_noise_learns():
    loss0, _ = _evaluate(Toy())
    assert loss0 == pytest.approx(0.68, abs=0.05)
    _, plain = _fit(None, max_epochs=5)
    # reproducible_noise=True: a fixed draw, so the chance-level check cannot flake on a lucky draw
    _, clip_only = _fit(DifferentialPrivacy(noise_multiplier=0.0, reproducible_noise=True), max_epochs=5)
    _, noisy = _fit(DifferentialPrivacy(noise_multiplier=1000.0, reproducible_noise=True), max_epochs=5)
    assert _evaluate(plain)[1] > 0.95
    assert _evaluate(clip_only)[1] > 0.9  # clipping alone still learns the task
    loss, acc = _evaluate(noisy)
    assert loss > loss0 and acc < 0.7  # sigma = 1000: the updates are noise, accuracy ~ chance (0.5)


# ---------------------------------------------------------------- accounting


def test_epsilon_equals_opacus_accountant_for_the_same_sigma_q_steps():
    dp = DifferentialPrivacy(noise_multiplier=1.3, max_grad_norm=0.5)
    trainer, _ = _fit(dp, loader=_loader(n=64, batch_size=8), max_epochs=2)
    # N = 64, batch_size 8: q = 8 / 64 = 0.125, int(1/q) = 8 steps/epoch, 2 epochs = 16 steps;
    # default delta = 1 / (10 N) = 1/640
    assert dp.sample_rate == 0.125 and dp.delta == pytest.approx(1 / 640)
    assert dp.history == [(1.3, 0.125, 16)]
    acc = create_accountant("prv")
    acc.history = [(1.3, 0.125, 16)]
    expected = acc.get_epsilon(1 / 640)
    assert dp.epsilon == expected
    assert float(trainer.callback_metrics["dp/epsilon"]) == pytest.approx(expected, rel=1e-6)
    assert 0.5 < expected < 20


def test_zero_noise_reports_infinite_epsilon():
    dp = DifferentialPrivacy(noise_multiplier=0.0)
    trainer, _ = _fit(dp, loader=_loader(n=64, batch_size=16))
    assert dp.epsilon == math.inf and math.isinf(float(trainer.callback_metrics["dp/epsilon"]))


class Inspector(pl.Callback):
    """Runs after DifferentialPrivacy's own checks and records what the DP step sees."""

    def __init__(self):
        self.sizes, self.seen = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(batch[0].shape[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        b = self.sizes[-1]
        ok = isinstance(optimizer, DPOptimizer) and isinstance(trainer.train_dataloader.batch_sampler, PoissonBatchSampler)
        for p in pl_module.parameters():
            ok &= p.grad_sample is not None and tuple(p.grad_sample.shape) == (b, *p.shape)
        self.seen.append(ok)


def test_dp_optimizer_per_sample_grads_and_poisson_batches_are_in_place():
    inspector = Inspector()
    pl.seed_everything(0, verbose=False)
    model = Toy()
    trainer = _trainer([DifferentialPrivacy(noise_multiplier=1.0), inspector], max_epochs=2)
    original = model.configure_optimizers  # the module's own optimizer class
    trainer.fit(model, _loader())
    assert len(inspector.seen) == 16 and all(inspector.seen)  # 256 / 32 = 8 steps/epoch
    assert len(set(inspector.sizes)) > 3  # Poisson: sizes vary around 32
    # after fit the strategy gets its own optimizer back and the hooks are gone
    assert type(trainer.strategy.optimizers[0]) is type(original())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_empty_poisson_batches_are_trained_through():
    inspector = Inspector()
    ds = _loader(n=8, batch_size=1)  # q = 1/8: P(empty batch) = (7/8)^8 = 0.34
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    pl.seed_everything(0, verbose=False)
    _trainer([dp, inspector], max_epochs=3).fit(Toy(), ds)
    assert 0 in inspector.sizes and len(inspector.sizes) == 24
    assert dp.steps == 24 and all(inspector.seen)


# ---------------------------------------------------------------- fail closed


def test_forward_that_bypasses_the_hooked_modules_is_refused():
    with pytest.raises(RuntimeError, match="no per-sample gradient"):
        _fit(DifferentialPrivacy(noise_multiplier=1.0), model=Toy(bypass=True))


def test_training_step_without_loss_is_refused():
    with pytest.raises(RuntimeError, match="training_step returned no loss"):
        _fit(DifferentialPrivacy(noise_multiplier=1.0), model=Toy(none_loss=True))


# ---------------------------------------------------------------- target epsilon


def test_target_epsilon_stops_before_the_budget_is_exceeded():
    dp = DifferentialPrivacy(target_epsilon=2.0, epochs=1, accountant="rdp")
    trainer, _ = _fit(dp, loader=_loader(n=64, batch_size=8), max_epochs=4)
    sigma = dp.noise_multiplier
    # sigma is Opacus' noise for epsilon <= 2 after 1 epoch of int(1/q) = 8 steps at q = 0.125
    assert compute_epsilon([(sigma, 0.125, 8)], dp.delta, "rdp") <= 2.0
    assert dp.stopped_by_budget and trainer.should_stop
    assert 8 <= dp.steps < 32  # stopped before max_epochs=4 (32 steps)
    assert dp.epsilon <= 2.0 < compute_epsilon([(sigma, 0.125, dp.steps + 1)], dp.delta, "rdp")
    assert float(trainer.callback_metrics["dp/epsilon"]) == pytest.approx(dp.epsilon)


def test_min_epochs_cannot_force_steps_past_the_budget():
    dp = DifferentialPrivacy(target_epsilon=2.0, epochs=1, accountant="rdp")
    with pytest.raises(RuntimeError, match="would push epsilon past target_epsilon"):
        _fit(dp, loader=_loader(n=64, batch_size=8), max_epochs=4, min_epochs=4)
    assert dp.epsilon <= 2.0  # the refused step was never taken


# ---------------------------------------------------------------- checkpoint / resume


def test_resume_continues_the_privacy_spend(tmp_path):
    # reproducible_noise=True makes the weights comparable: a resumed run redraws steps 8..15 exactly
    full = DifferentialPrivacy(noise_multiplier=1.0, reproducible_noise=True)
    _, m_full = _fit(full, max_epochs=2)

    first = DifferentialPrivacy(noise_multiplier=1.0, reproducible_noise=True)
    trainer1, _ = _fit(first, max_epochs=1)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["DifferentialPrivacy"]
    assert saved["accountant"] == {"history": [[1.0, 0.125, 8]], "mechanism": "prv"}
    assert saved["nonprivate_steps"] == 0 and not any("seed" in key or "generator" in key for key in saved)

    resumed = DifferentialPrivacy(noise_multiplier=1.0, reproducible_noise=True)
    pl.seed_everything(0, verbose=False)
    m_res = Toy()
    _trainer([resumed], max_epochs=2).fit(m_res, _loader(), ckpt_path=ckpt)
    assert resumed.history == full.history == [(1.0, 0.125, 16)]  # not reset to 8 (nor to 0)
    assert resumed.epsilon == full.epsilon > first.epsilon
    # the resumed run draws the masks and noise of steps 8..15, as the uninterrupted run did
    assert torch.allclose(_weights(m_res), _weights(m_full), atol=1e-6)


def test_resume_with_another_accountant_is_refused(tmp_path):
    trainer1, _ = _fit(DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp"), loader=_loader(n=64, batch_size=16))
    ckpt = tmp_path / "a.ckpt"
    trainer1.save_checkpoint(ckpt)
    with pytest.raises(ValueError, match="accountant='rdp'"):
        _fit(DifferentialPrivacy(noise_multiplier=1.0), loader=_loader(n=64, batch_size=16), max_epochs=2, ckpt_path=ckpt)


# ---------------------------------------------------------------- unsupported layers


class WithBatchNorm(Toy):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2))


def test_batchnorm_is_named_in_the_error_and_fix_replaces_it():
    with pytest.raises(ValueError, match=r"net\.1 \(BatchNorm1d\)") as err:
        _fit(DifferentialPrivacy(noise_multiplier=1.0), model=WithBatchNorm())
    assert "fix=True" in str(err.value)
    dp = DifferentialPrivacy(noise_multiplier=1.0, fix=True)
    model = WithBatchNorm()
    with pytest.warns(UserWarning, match="BatchNorm1d -> GroupNorm"):
        _fit(dp, model=model)
    assert isinstance(model.net[1], torch.nn.GroupNorm) and dp.fixed_layers == ["net.1: BatchNorm1d -> GroupNorm"]
    assert dp.steps == 8


# ---------------------------------------------------------------- Hugging Face causal LMs

VOCAB = 40


def _lm_data(n=32, seq=12):
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, VOCAB, (seq,), generator=g)} for _ in range(n)]


class TinyLM(pl.LightningModule):
    def __init__(self, kind="llama", scale=1.0, tie=False):
        super().__init__()
        self.scale = scale
        with torch.random.fork_rng():
            torch.manual_seed(0)
            if kind == "llama":
                cfg = transformers.LlamaConfig(
                    vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tie,
                )
                self.model = transformers.LlamaForCausalLM(cfg)
            else:
                cfg = transformers.GPT2Config(
                    vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                )
                self.model = transformers.GPT2LMHeadModel(cfg)

    def training_step(self, batch, batch_idx):
        labels = batch["input_ids"].clone()
        labels[::2, -4:] = -100  # unequal target counts: the per-sequence loss matters
        return self.model(input_ids=batch["input_ids"], labels=labels).loss * self.scale

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LossSpy(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_size = batch["input_ids"].shape[0]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        seam = existing_loss_seam(pl_module.model)
        self.per_sequence_used = seam is not None and isinstance(seam.reduction_owner, DifferentialPrivacy) and seam.calls == 1
        self.grad_samples = {n: (tuple(p.grad_sample.shape), tuple(p.shape)) for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hf_causal_lm_takes_a_dp_step(kind):
    spy = LossSpy()
    model = TinyLM(kind)
    before = _weights(model)
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    pl.seed_everything(0, verbose=False)
    trainer = _trainer([dp, spy], max_steps=1)
    trainer.fit(model, DataLoader(_lm_data(), batch_size=8))
    assert dp.history == [(1.0, 0.25, 1)]  # q = 8 / 32
    assert spy.per_sequence_used  # the HF loss went through the per-sequence loss
    # every parameter (GPT-2: Conv1D, tied wte/lm_head, wpe included) has a [B, *shape] per-sample gradient
    assert len(spy.grad_samples) > 5 and spy.batch_size > 0
    assert all(gs == (spy.batch_size, *shape) for gs, shape in spy.grad_samples.values())
    assert not torch.equal(before, _weights(model))
    assert existing_loss_seam(model.model) is None  # the loss chain is removed after fit
    assert float(trainer.callback_metrics["dp/epsilon"]) == pytest.approx(dp.epsilon)


def _one_step(mode, seed=0):
    model = TinyLM("llama")
    pl.seed_everything(seed, verbose=False)
    dp = DifferentialPrivacy(noise_multiplier=0.0, grad_sample_mode=mode, max_grad_norm=0.05, reproducible_noise=True)
    _trainer([dp], max_steps=2).fit(model, DataLoader(_lm_data(), batch_size=8))
    return _weights(model)


@pytest.mark.parametrize("mode", ["ghost", "bookkeeping"])
def test_ghost_and_bookkeeping_clipping_equal_hooks_clipping(mode):
    # C = 0.05 clips every sequence; without noise every mode must apply the same clipped mean
    hooks, other = _one_step("hooks"), _one_step(mode)
    start = _weights(TinyLM("llama"))
    assert not torch.equal(hooks, start)
    assert torch.allclose(other, hooks, atol=1e-6)


def test_ghost_rejects_tied_weights_and_modified_losses():
    with pytest.raises(ValueError, match="shared between layers"):
        pl.seed_everything(0, verbose=False)
        _trainer([DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="ghost")], max_steps=1).fit(
            TinyLM("llama", tie=True), DataLoader(_lm_data(), batch_size=8)
        )
    with pytest.raises(RuntimeError, match="not the model's per-sequence loss"):
        pl.seed_everything(0, verbose=False)
        _trainer([DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="ghost")], max_steps=1).fit(
            TinyLM("llama", scale=2.0), DataLoader(_lm_data(), batch_size=8)
        )
