"""DifferentialPrivacy(grad_sample_mode="auto"): which per-sample-gradient route it picks, and that it trains."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
import transformers
from torch import nn

from antimemo.callbacks.dp import DifferentialPrivacy, _bit_checksum
from antimemo.dp import compute_epsilon
from antimemo.dp import routes
from antimemo.dp.routes import HOOKS_MEMORY_FACTOR, MEMORY_SHARE, choose_route, ghost_blocker, per_sample_gradient_bytes
from antimemo.lm.data import TextDataModule
from antimemo.lm.module import CausalLMModule

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")

TINY = {"vocab_size": 257, "hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128}


def _llama(tie: bool = False) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=257, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg)


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=257, n_embd=64, n_layer=1, n_head=2, n_positions=64, tie_word_embeddings=False)
    return transformers.GPT2LMHeadModel(cfg)


GB = 2**30


def _no_bookkeeping(monkeypatch):
    """Make book-keeping unavailable, so that auto's memory rule (hooks, else ghost) decides."""
    import antimemo.dp.bookkeeping as bk

    monkeypatch.setattr(bk, "bookkeeping_blocker", lambda module: "blocked by the test")


def test_auto_takes_bookkeeping_where_it_is_valid_and_says_why_not_elsewhere():
    for lm in (_llama(), nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))):
        choice = choose_route(lm, None, 16, 1)  # memory does not matter: no per-sample gradients are stored
        assert choice.route == "bookkeeping" and "one backward pass" in choice.reason
    tied = choose_route(_llama(tie=True), "parameters shared between layers (tied embeddings)", 16, 8 * GB)
    assert tied.route == "hooks" and tied.reason.startswith("book-keeping is not possible (a parameter is shared by the layers")
    gpt2 = choose_route(_gpt2(), None, 16, 8 * GB)  # Conv1D layers: Opacus samplers, not book-keeping's fast path
    assert gpt2.route == "hooks" and "sit in nn.Linear / nn.Embedding layers" in gpt2.reason


def test_auto_takes_hooks_while_its_per_sample_gradients_fit_and_ghost_when_they_do_not(monkeypatch):
    _no_bookkeeping(monkeypatch)
    lm = _llama()
    n = sum(p.numel() for p in lm.parameters())
    assert per_sample_gradient_bytes(lm, 16) == 16 * n * 4
    need = HOOKS_MEMORY_FACTOR * 16 * n * 4
    fits, tight = choose_route(lm, None, 16, int(need / MEMORY_SHARE)), choose_route(lm, None, 16, int(need))
    assert fits.route == "hooks" and "fit in 50%" in fits.reason
    assert tight.route == "ghost" and "stores per-sample norms only" in tight.reason
    unknown = choose_route(lm, None, 16, None)
    assert unknown.route == "hooks" and "unknown" in unknown.reason
    assert routes.available_memory(torch.device("cpu")) > 0


@pytest.mark.parametrize(
    ("model", "seq_len", "loss_is_lm_loss", "reason"),
    [
        (lambda: _llama(tie=True), 8, True, "tied embeddings"),  # ghost refuses shared parameters
        (_llama, 8, False, "not known to be the LM's own"),  # a custom training_step's loss
        (lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)), 8, False, "0 Hugging Face causal LMs"),
        (lambda: nn.ModuleList([_llama(), _llama()]), 8, True, "2 Hugging Face causal LMs"),
    ],
)
def test_auto_picks_hooks_where_ghost_is_invalid(model, seq_len, loss_is_lm_loss, reason, monkeypatch):
    _no_bookkeeping(monkeypatch)
    m = model()
    blocker = ghost_blocker(m, loss_is_lm_loss)
    assert blocker is not None and reason in blocker
    choice = choose_route(m, blocker, 16, 1)  # even when hooks' per-sample gradients cannot fit
    assert choice.route == "hooks" and reason in choice.reason


def test_auto_keeps_hooks_for_gpt2_conv1d_even_when_memory_is_tight(monkeypatch):
    _no_bookkeeping(monkeypatch)
    gpt2 = _gpt2()
    assert ghost_blocker(gpt2, True) is None  # valid for ghost, but its Conv1D layers have no ghost norm sampler
    choice = choose_route(gpt2, None, 16, 1)
    assert choice.route == "hooks" and "ghost norm sampler" in choice.reason


def test_lora_adapters_need_little_per_sample_memory():
    import peft

    lora = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # only the adapters train: Linear(64, 4) and Linear(4, 64) for q and v
    assert per_sample_gradient_bytes(lora, 16) == 16 * 2 * (64 * 4 + 4 * 64) * 4
    assert choose_route(lora, None, 16, 64 * 2**20).route == "bookkeeping"  # the adapters are nn.Linear


def test_unknown_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"grad_sample_mode must be one of \('hooks', 'functorch', 'ghost', 'bookkeeping', 'auto'\), got 'ew'"):
        DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="ew")
    assert DifferentialPrivacy(noise_multiplier=1.0).grad_sample_mode == "hooks"  # the default is unchanged
    auto = DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="auto")
    assert auto.route is None and auto.guarantee()["grad_sample_mode"] == "auto"


def test_bit_checksum_sees_every_single_change():
    g = torch.Generator().manual_seed(0)
    # 64-bit words (contiguous, even), element width (odd length), and a non-contiguous view
    for w in (torch.randn(1000, generator=g), torch.randn(1001, generator=g), torch.randn(40, 25, generator=g).t()):
        base = _bit_checksum(w)
        flat = w.reshape(-1).numel()
        for change in (lambda t: t.neg_(), lambda t: t.copy_(torch.nextafter(t, torch.tensor(float("inf"))))):
            for i in (0, 17, flat - 1):
                v = w.clone()
                change(v.view(-1)[i : i + 1] if v.is_contiguous() else v[i % v.shape[0], i // v.shape[0]].view(1))
                assert _bit_checksum(v) != base
        assert _bit_checksum(w.clone()) == base
    assert _bit_checksum(w.to(torch.bfloat16)).dtype == torch.int64


class GradSampleSpy(pl.Callback):
    """After DP's pre-step checks: the per-sample gradient (or ghost norm) shape of every trainable parameter."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []
        self.norms: list[tuple[int, ...]] = []
        self.batch = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.shapes, self.norms = [], []
        for p in pl_module.parameters():
            if p.requires_grad:
                gs, ns = getattr(p, "grad_sample", None), getattr(p, "_norm_sample", None)
                if gs is not None:
                    self.shapes.append((tuple(gs.shape), tuple(p.shape)))
                if ns is not None:
                    self.norms.append(tuple(ns.shape))


class _Records(logging.Handler):
    """Collects Lightning's rank-zero messages on that logger itself: Lightning sets
    ``propagate=False`` on ``lightning.pytorch`` when the root logger has no handler at its
    import, so pytest's caplog (a root handler) sees them or not depending on test order."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "_Records":
        self._log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        self._level = self._log.level
        self._log.setLevel(logging.INFO)
        self._log.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._log.removeHandler(self)
        self._log.setLevel(self._level)


def _fit(mode: str, seq_len: int):
    pl.seed_everything(0, verbose=False)
    model = CausalLMModule(**TINY, max_position_embeddings=64, seed=0)
    data = TextDataModule(seq_len=seq_len, num_train=64, num_holdout=8, batch_size=8, seed=0)
    dp = DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode=mode, reproducible_noise=True)
    spy = GradSampleSpy()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[dp, spy],
    )
    trainer.fit(model, data)
    return dp, spy, trainer


def test_auto_trains_with_ghost_when_memory_is_tight_and_accounts_as_ghost(monkeypatch):
    _no_bookkeeping(monkeypatch)
    monkeypatch.setattr(routes, "available_memory", lambda device: 1024)  # hooks' per-sample gradients cannot fit
    monkeypatch.setattr("antimemo.callbacks.dp.available_memory", lambda device: 1024)
    with _Records() as logs:
        auto, spy, trainer = _fit("auto", seq_len=16)
    assert auto.route == "ghost"
    chosen = [r.getMessage() for r in logs.records if "grad_sample_mode='auto' chose" in r.getMessage()]
    assert len(chosen) == 1 and "chose 'ghost'" in chosen[0] and "stores per-sample norms only" in chosen[0]
    g = auto.guarantee()
    assert g["grad_sample_mode"] == "ghost" and "would pass 50%" in g["grad_sample_mode_reason"]
    # every trainable parameter got a per-sample gradient norm for the batch; no per-sample gradients stored
    assert spy.norms and len({n for n in spy.norms}) == 1 and not spy.shapes
    # accounting does not depend on the route: the same history and epsilon as an explicit ghost run
    ghost, _, _ = _fit("ghost", seq_len=16)
    assert auto.history == ghost.history and auto.steps == 3
    assert auto.epsilon == pytest.approx(compute_epsilon(ghost.history, ghost.delta, "prv"))
    assert float(trainer.callback_metrics["dp/epsilon"]) == pytest.approx(auto.epsilon)


def test_auto_trains_with_bookkeeping_and_accounts_as_hooks():
    with _Records() as logs:
        auto, spy, trainer = _fit("auto", seq_len=16)
    assert auto.route == "bookkeeping" and "one backward pass" in auto.route_reason
    assert any("grad_sample_mode='auto' chose 'bookkeeping'" in r.getMessage() for r in logs.records)
    assert not spy.shapes and not spy.norms  # neither per-sample gradients nor Opacus' norm samples
    assert auto.guarantee()["grad_sample_mode"] == "bookkeeping"
    hooks, _, _ = _fit("hooks", seq_len=16)
    assert auto.history == hooks.history and auto.epsilon == pytest.approx(hooks.epsilon)
    assert float(trainer.callback_metrics["dp/epsilon"]) == pytest.approx(auto.epsilon)


def test_auto_trains_with_hooks_when_per_sample_gradients_fit(monkeypatch):
    _no_bookkeeping(monkeypatch)
    with _Records() as logs:
        auto, spy, _ = _fit("auto", seq_len=16)
    assert auto.route == "hooks" and "fit in 50%" in auto.route_reason
    assert any("grad_sample_mode='auto' chose 'hooks'" in r.getMessage() for r in logs.records)
    # per-sample gradients [B, *p.shape] for every trainable parameter
    assert len(spy.shapes) == sum(1 for _ in CausalLMModule(**TINY).parameters())
    assert all(gs[1:] == shape and gs[0] == spy.shapes[0][0][0] for gs, shape in spy.shapes)
    hooks, _, _ = _fit("hooks", seq_len=16)
    assert auto.history == hooks.history and auto.epsilon == pytest.approx(hooks.epsilon)
