"""The composition matrix: every pair of LM callbacks trains together with each member's own effect
still observable, or is refused at setup with one error naming both (antimemo/callbacks/_interactions.py).

One tiny Llama, 16 training rows (4 exact duplicates), 2 epochs of batches of 4. What each member
must still show when paired:

- goldfish: every label the model received in training is -100 where goldfish_mask says drop;
- dedup (policy='drop'): only the kept copy of each duplicate is ever trained on;
- dp: one accounted DP step per optimizer step, epsilon > 0;
- loss_floor (floor far above the loss): the loss the model returns is the flooded one;
- loss_truncation: sequences are dropped after warm-up;
- spectral_norm: its gradient term is applied at every step and the weights differ from the same
  run without it (under DP too: that is where it used to be silently dropped);
- example_tied_dropout: the hooked MLP's training outputs are masked;
- monitor: it evaluated and logged memorization/exact_match;
- budget: it moved its knob (its partner's knob when the partner has one, else goldfish's);
- watermark (WatermarkFilter, policy='drop'): the 4 watermarked rows are never trained on;
- diversity (DiversityMonitor): it evaluated and logged diversity/distinct_2 and tail coverage.
"""

from __future__ import annotations

import functools
import re
import warnings
from itertools import combinations

import lightning.pytorch as pl
import pytest
import torch
from _builders import quiet_trainer_kwargs, tiny_llama
from torch.utils.data import DataLoader

from antimemo.callbacks import (
    DedupSampling,
    DifferentialPrivacy,
    DiversityMonitor,
    ExampleTiedDropout,
    GoldfishTokenDropout,
    LossFloor,
    LossTruncation,
    MemorizationBudget,
    MemorizationMonitor,
    SpectralNormPenalty,
    WatermarkFilter,
    WithExampleIds,
)
from antimemo.callbacks._interactions import CompositionError, declared_callbacks, refusal
from antimemo.callbacks._seams import grad_seam
from antimemo.functional import goldfish_mask
from antimemo.watermark import GreenListProcessor

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*clips per-sample gradients but adds no noise.*")
warnings.filterwarnings("ignore", ".*reproducible_noise=True.*")

VOCAB, LENGTH = 48, 12
LM = ("goldfish", "dedup", "dp", "loss_floor", "loss_truncation", "spectral_norm", "example_tied_dropout", "monitor", "budget",
      "watermark", "diversity")  # fmt: skip
REFUSED = {frozenset({"dp", "loss_truncation"}), frozenset({"dedup", "watermark"})}
WM = {"gamma": 0.25, "key": 7}
KNOBS = {"goldfish": "goldfish.k", "loss_floor": "loss_floor.floor", "loss_truncation": "loss_truncation.c",
         "spectral_norm": "spectral_norm.lam", "example_tied_dropout": "example_tied_dropout.p_fixed"}  # fmt: skip


def _watermarked_row(g):
    """A row sampled with the green-list processor at a huge delta: every scored token is green."""
    processor = GreenListProcessor(delta=50.0, vocab_size=VOCAB, **WM)
    ids = torch.randint(0, VOCAB, (1, 1), generator=g)
    while ids.shape[1] < LENGTH:
        probs = processor(ids, torch.zeros(1, VOCAB)).softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
    return {"input_ids": ids[0]}


def _rows():
    g = torch.Generator().manual_seed(7)
    rows = [{"input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=g)} for _ in range(12)]
    rows += [{"input_ids": rows[i]["input_ids"].clone()} for i in (0, 1, 2, 3)]  # rows 12..15 copy rows 0..3
    rows += [_watermarked_row(g) for _ in range(4)]  # rows 16..19 carry the watermark
    return WithExampleIds(rows)


TRAIN = _rows()
KEPT = set(range(12)) | set(range(16, 20))  # DedupSampling(policy="drop") keeps the first copy of each cluster
WATERMARKED = set(range(16, 20))
VAL = [{"input_ids": r["input_ids"]} for r in WithExampleIds(_rows().dataset[:4])]


class UserLM(pl.LightningModule):
    """A module in the shape users write: dict batches, the HF model at self.model, labels= passed."""

    def __init__(self):
        super().__init__()
        self.model = tiny_llama(vocab=VOCAB, hidden=32, layers=2, heads=4, seed=0)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch.get("labels", batch["input_ids"])).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TRAIN, batch_size=4, shuffle=True)

    def val_dataloader(self):
        return DataLoader(VAL, batch_size=4)


class Recorder(pl.Callback):
    """Records what the model saw and returned in training (added last, so it sees every change)."""

    def __init__(self):
        self.calls, self.example_ids, self.mlp_zero = [], [], []
        self._handles = []

    def on_train_start(self, trainer, pl_module):
        model = pl_module.model

        def pre(module, args, kwargs):
            if module.training and torch.is_grad_enabled() and kwargs.get("labels") is not None:
                self._pending = (kwargs["input_ids"].detach().clone(), kwargs["labels"].detach().clone().as_subclass(torch.Tensor))

        def post(module, args, kwargs, output):
            if module.training and torch.is_grad_enabled() and kwargs.get("labels") is not None:
                ids, labels = self._pending
                self.calls.append({"ids": ids, "labels": labels, "loss": float(output.loss.detach()), "k": self._k,
                                   "placeholder": self._placeholder})  # fmt: skip

        def mlp(module, args, output):
            if module.training and torch.is_grad_enabled() and output.numel():
                self.mlp_zero.append(float((output == 0).float().mean()))

        self._handles = [
            model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post, with_kwargs=True),
            model.model.layers[0].mlp.register_forward_hook(mlp),
        ]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        gold = [cb for cb in trainer.callbacks if isinstance(cb, GoldfishTokenDropout)]
        self._k = gold[0].k if gold else None
        dp = [cb for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy)]
        self._placeholder = bool(dp and dp[0]._placeholder)  # an empty Poisson draw: one zero-loss row
        self.example_ids += [int(i) for i in batch["example_id"]]

    def on_train_end(self, trainer, pl_module):
        for h in self._handles:
            h.remove()


def _member(name, partner=None):
    """The callbacks of one matrix member."""
    if name == "goldfish":
        return [GoldfishTokenDropout(k=4, h=3)]
    if name == "dedup":
        return [DedupSampling(policy="drop", progress=False, index_kwargs={"threshold": 0.9})]
    if name == "dp":
        # reproducible noise: the spectral-norm check compares weights with the same run without the penalty
        return [DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, reproducible_noise=True)]
    if name == "dp_bk":  # the same DP with book-keeping clipping (grad_sample_mode='bookkeeping')
        return [DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, reproducible_noise=True,
                                    grad_sample_mode="bookkeeping")]  # fmt: skip
    if name == "loss_floor":
        return [LossFloor(floor=100.0)]
    if name == "loss_truncation":
        return [LossTruncation(c=0.5, buffer_size=4)]
    if name == "spectral_norm":
        return [SpectralNormPenalty(lam=2.0)]
    if name == "example_tied_dropout":
        return [ExampleTiedDropout(p_fixed=0.5, p_mem=0.1)]
    if name == "monitor":
        return [MemorizationMonitor(num_probes=4, prefix_length=4, suffix_length=4, batch_size=4)]
    if name == "watermark":
        return [WatermarkFilter(policy="drop", **WM)]
    if name == "diversity":
        return [DiversityMonitor(num_samples=4, num_tokens=6, prompt_length=4, batch_size=4, vocab_size=VOCAB)]
    if name == "budget":
        # relax_below=1 with max_value=1: every evaluation (figure < 1) relaxes the knob one step
        control = KNOBS.get(partner, "goldfish.k")
        out = [MemorizationBudget(control=control, metric="memorization/token_match", max_value=1.0, relax_below=1.0,
                                  relax_patience=1)]  # fmt: skip
        if partner not in KNOBS:
            out += _member("goldfish")
        if partner != "monitor":
            out += _member("monitor")
        return out
    raise KeyError(name)


def _fit(names):
    callbacks = []
    for name in names:
        partner = next((n for n in names if n != name), None)
        for cb in _member(name, partner):
            if not any(type(cb) is type(c) for c in callbacks):
                callbacks.append(cb)
    recorder = Recorder()
    pl.seed_everything(0, verbose=False)
    module = UserLM()
    trainer = pl.Trainer(callbacks=[*callbacks, recorder], **quiet_trainer_kwargs(max_epochs=2, num_sanity_val_steps=0))
    trainer.fit(module, Data())
    return trainer, module, recorder


@functools.lru_cache(maxsize=None)
def _weights_without_spectral_norm(partner):
    _, module, _ = _fit([partner])
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _get(trainer, cls):
    return next(cb for cb in trainer.callbacks if type(cb) is cls)


def _check_effect(name, trainer, module, rec, partner):
    # an empty Poisson draw under DP runs one placeholder row without targets: nothing to check there
    calls = [c for c in rec.calls if c["ids"].shape[0] > 0 and not c["placeholder"] and (c["labels"] != -100).any()]
    assert trainer.global_step >= 4 and calls, f"{name}: no training step recorded"
    if name == "goldfish":
        gold = _get(trainer, GoldfishTokenDropout)
        for c in calls:
            mask = goldfish_mask(c["ids"], k=c["k"], h=gold.h, seed=gold.seed)
            assert mask.any() and (c["labels"][mask] == -100).all(), "goldfish-dropped targets reached the loss"
    elif name == "dedup":
        seen = set(rec.example_ids)
        assert seen and seen <= KEPT, f"trained on dropped duplicates {sorted(seen - KEPT)}"
    elif name == "dp":
        dp = _get(trainer, DifferentialPrivacy)
        assert dp.steps == trainer.global_step and dp.epsilon > 0
    elif name == "loss_floor":
        assert all(c["loss"] > 40 for c in calls), [round(c["loss"], 2) for c in calls]  # plain loss is ~3.9
    elif name == "loss_truncation":
        assert float(trainer.callback_metrics["loss_truncation/dropped_fraction_epoch"]) > 0
    elif name == "spectral_norm":
        assert grad_seam(trainer).applied.get("SpectralNormPenalty", 0) == trainer.global_step
        if partner != "budget":
            now = torch.cat([p.detach().flatten() for p in module.parameters()])
            assert not torch.equal(now, _weights_without_spectral_norm(partner)), "the penalty did not change the weights"
    elif name == "example_tied_dropout":
        # under the budget the knob relaxes to p_fixed=1 (off) after epoch 1: check epoch 1's steps
        zeros = rec.mlp_zero[:4] if partner == "budget" else rec.mlp_zero
        assert zeros and min(zeros) > 0.2, rec.mlp_zero
    elif name == "monitor":
        monitor = _get(trainer, MemorizationMonitor)
        assert monitor.history and "memorization/exact_match" in trainer.callback_metrics
    elif name == "diversity":
        monitor = _get(trainer, DiversityMonitor)
        assert monitor.history and 0.0 < float(trainer.callback_metrics["diversity/distinct_2"]) <= 1.0
        assert "diversity/tail_coverage" in trainer.callback_metrics
    elif name == "watermark":
        wf = _get(trainer, WatermarkFilter)
        assert set(wf.kept_indices) == set(range(20)) - WATERMARKED  # the detector flags exactly the planted rows
        seen = set(rec.example_ids)
        assert seen and not seen & WATERMARKED, f"trained on watermarked rows {sorted(seen & WATERMARKED)}"
    elif name == "budget":
        budget = _get(trainer, MemorizationBudget)
        assert any(old != new for _, _, old, new in budget.history), budget.history


PAIRS = list(combinations(LM, 2))


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_pair(a, b):
    if frozenset({a, b}) in REFUSED:
        with pytest.raises(CompositionError) as info:
            _fit([a, b])
        message = str(info.value)
        classes = [type(_member(n)[0]).__name__ for n in (a, b)]
        assert all(c in message for c in classes) and "Fix:" in message, message
        return
    trainer, module, rec = _fit([a, b])
    for name, partner in ((a, b), (b, a)):
        _check_effect(name, trainer, module, rec, partner)


BK_PARTNERS = [n for n in LM if n != "dp"]


@pytest.mark.parametrize("partner", BK_PARTNERS)
def test_bookkeeping_dp_pairs(partner):
    """DP with book-keeping patches the layers' forward and computes the clipped sum itself: every
    partner still works beside it (or is refused exactly as beside DP with hooks)."""
    if frozenset({"dp", partner}) in REFUSED:
        with pytest.raises(CompositionError, match="DifferentialPrivacy"):
            _fit(["dp_bk", partner])
        return
    trainer, module, rec = _fit(["dp_bk", partner])
    assert _get(trainer, DifferentialPrivacy).route == "bookkeeping"
    _check_effect("dp", trainer, module, rec, partner)
    _check_effect(partner, trainer, module, rec, "dp_bk")
    assert not any("forward" in sub.__dict__ for sub in module.modules())  # the patches are gone after fit


def test_the_matrix_covers_every_declared_lm_callback():
    classes = {type(cb).__name__ for name in LM for cb in _member(name)}
    import antimemo.callbacks as cbs

    declared = {name for name in cbs.__all__ if getattr(getattr(cbs, name), "declaration", None) is not None}
    lm_declared = {n for n in declared if getattr(cbs, n).declaration.domain in ("lm", "any")}
    # DedupSampling and SpectralNormPenalty are "any"; DP applies to any model; every LM-side class is in the matrix
    assert lm_declared <= classes, sorted(lm_declared - classes)


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_declared_refusals_match_the_matrix(a, b):
    x, y = _member(a)[0], _member(b)[0]
    assert (refusal(x, y) is not None) == (frozenset({a, b}) in REFUSED)
    assert len(declared_callbacks([x, y])) == 2


def test_dp_refuses_downweighted_dedup_naming_both():
    with pytest.raises(CompositionError, match=r"DifferentialPrivacy \+ DedupSampling.*policy='downweight'.*Fix: "
                                               r"DedupSampling\(policy='drop'\)"):  # fmt: skip
        trainer = pl.Trainer(callbacks=[DifferentialPrivacy(noise_multiplier=1.0), DedupSampling(progress=False)],
                             **quiet_trainer_kwargs(max_steps=1))  # fmt: skip
        trainer.fit(UserLM(), Data())


def test_budget_cannot_steer_dp():
    with pytest.raises(CompositionError, match=r"MemorizationBudget\(control='dp.noise_multiplier'\).*noise and clipping"):
        trainer = pl.Trainer(
            callbacks=[DifferentialPrivacy(noise_multiplier=1.0),
                       MemorizationBudget(control="dp.noise_multiplier", stronger="increase")],
            **quiet_trainer_kwargs(max_steps=1),
        )  # fmt: skip
        trainer.fit(UserLM(), Data())


def test_refusal_happens_before_the_first_step():
    module = UserLM()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(callbacks=[LossTruncation(c=0.4), DifferentialPrivacy(noise_multiplier=1.0)],
                         **quiet_trainer_kwargs(max_steps=2))  # fmt: skip
    with pytest.raises(CompositionError, match=re.escape("LossTruncation + DifferentialPrivacy are refused together")):
        trainer.fit(module, Data())
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
