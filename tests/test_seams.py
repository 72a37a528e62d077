"""The seams (antimemo/callbacks/_seams.py): the loss chain composes its stages exactly, the loader
chain is installed once and removed once, gradient terms wait for the DP noise, and goldfish proves
its labels reached the loss."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _builders import quiet_trainer_kwargs, tiny_llama
from torch.utils.data import DataLoader

from antimemo.callbacks import DedupSampling, DifferentialPrivacy, GoldfishTokenDropout, LossFloor, LossTruncation
from antimemo.callbacks._seams import (
    existing_loss_seam,
    grad_seam,
    loader_seam,
    loss_seam,
    per_sequence_reduction,
    track_use,
    was_used,
)
from antimemo.functional.regularizers import flood, per_sequence_lm_loss

warnings.filterwarnings("ignore", ".*does not have many workers.*")

VOCAB = 32


def _rows(n=16, length=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (length,), generator=g)} for _ in range(n)]


class LM(pl.LightningModule):
    """``labels`` picks what the training step passes: the batch's labels, its input ids, or a hand-written loss."""

    def __init__(self, labels="batch"):
        super().__init__()
        self.model = tiny_llama(vocab=VOCAB, hidden=16, layers=1, heads=2, seed=0)
        self.labels = labels

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        if self.labels == "batch":
            return self.model(input_ids=ids, labels=batch["labels"]).loss
        if self.labels == "input_ids":  # the usual HF way, which silently bypasses goldfish
            return self.model(input_ids=ids, labels=ids).loss
        logits = self.model(input_ids=ids).logits
        target = batch["labels"] if self.labels == "by_hand" else ids
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), target[:, 1:].flatten(), ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module, callbacks, max_steps=2, data=None):
    trainer = pl.Trainer(callbacks=callbacks, **quiet_trainer_kwargs(max_steps=max_steps))
    trainer.fit(module, DataLoader(data or _rows(), batch_size=4))
    return trainer


@pytest.mark.parametrize("labels", ["batch", "by_hand"])
def test_goldfish_accepts_a_loss_that_uses_the_rewritten_labels(labels):
    trainer = _fit(LM(labels), [GoldfishTokenDropout(k=2, h=2)])
    assert trainer.global_step == 2


@pytest.mark.parametrize(
    "labels,match",
    [
        ("input_ids", r"model \(LlamaForCausalLM\) was called with other labels.*Fix: pass the rewritten labels.*labels=batch\['labels'\]"),
        ("ignored", r"training_step never read it.*batch\['labels'\].*Fix: "),
    ],
)
def test_goldfish_that_cannot_reach_the_loss_raises_before_any_update(labels, match):
    module = LM(labels)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(callbacks=[GoldfishTokenDropout(k=2, h=2)], **quiet_trainer_kwargs(max_steps=2))
    with pytest.raises(RuntimeError, match=match):
        trainer.fit(module, DataLoader(_rows(), batch_size=4))
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_track_use_ignores_shape_queries_and_marks_real_reads():
    t = track_use(torch.arange(6).view(2, 3))
    _ = t.shape, t.size(0), t.dim(), len(t), t.dtype, t.device, t.numel()
    assert not was_used(t)
    out = t[:, 1:] + 1
    assert was_used(t) and type(out) is torch.Tensor  # results are plain tensors: tracking does not spread


def _batch(b=4, s=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = ids.clone()
    labels[0, 6:] = -100  # sequences with different target counts
    return ids, labels


def test_floor_and_truncation_compose_in_the_documented_order():
    model = tiny_llama(vocab=VOCAB, hidden=16, layers=1, heads=2, seed=0).train()
    ids, labels = _batch()
    floor, trunc = LossFloor(floor=3.45), LossTruncation(c=0.5, buffer_size=4)
    seam = loss_seam(model)
    handles = [seam.add_stage(floor, 200, floor._stage, floor._enabled), seam.add_stage(trunc, 100, trunc._stage, trunc._enabled)]
    assert seam.stage_owners == ["LossTruncation", "LossFloor"]
    seam.open(0)
    out = model(input_ids=ids, labels=labels)
    seam.close()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    losses, n = per_sequence_lm_loss(logits, labels)
    keep = losses <= torch.quantile(losses, 0.5)  # the buffer holds exactly this batch's 4 losses
    expected = (flood(losses, 3.45) * n * keep).sum() / n.sum()
    assert 0 < int(keep.sum()) < 4 and (losses < 3.45).any()  # both stages really act on this batch
    assert torch.allclose(out.loss, expected, atol=1e-6)
    for h in handles:
        h.remove()
    assert existing_loss_seam(model) is None  # the hook is gone with the last stage
    seam_free = model(input_ids=ids, labels=labels).loss
    assert torch.allclose(seam_free, (losses * n).sum() / n.sum(), atol=1e-6)


def test_dp_reduction_is_the_mean_of_per_sequence_values():
    model = tiny_llama(vocab=VOCAB, hidden=16, layers=1, heads=2, seed=0).train()
    ids, labels = _batch()
    floor = LossFloor(floor=3.45)
    seam = loss_seam(model)
    handles = [seam.add_stage(floor, 200, floor._stage, floor._enabled), seam.set_reduction(object(), per_sequence_reduction)]
    seam.open(0)
    out = model(input_ids=ids, labels=labels)
    with torch.no_grad():
        losses, _ = per_sequence_lm_loss(model(input_ids=ids).logits, labels)
    assert torch.allclose(out.loss, flood(losses, 3.45).mean(), atol=1e-6)  # one sequence = one unit
    assert torch.allclose(seam.last_per_sequence, flood(losses, 3.45), atol=1e-6)
    for h in handles:
        h.remove()


def test_validation_forwards_are_untouched():
    model = tiny_llama(vocab=VOCAB, hidden=16, layers=1, heads=2, seed=0)
    ids, labels = _batch()
    plain = model.eval()(input_ids=ids, labels=labels).loss
    floor = LossFloor(floor=100.0)
    handle = loss_seam(model).add_stage(floor, 200, floor._stage, floor._enabled)
    loss_seam(model).open(0)
    with torch.no_grad():
        assert torch.equal(model.train()(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss)
    assert torch.equal(model.eval()(input_ids=ids, labels=labels).loss, plain)
    handle.remove()


def test_loader_chain_is_installed_once_and_removed_once():
    trainer = _fit(LM("input_ids"), [DifferentialPrivacy(noise_multiplier=1.0), DedupSampling(policy="drop", progress=False)])
    source = trainer.fit_loop._data_source
    assert "dataloader" not in vars(source)  # restored after teardown, whatever the order of the two
    # a second fit on the same trainer objects' kind works from a clean source
    trainer = _fit(LM("input_ids"), [DedupSampling(policy="drop", progress=False)])
    assert "dataloader" not in vars(trainer.fit_loop._data_source)


def test_a_stale_loader_wrapper_is_replaced_not_stacked():
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_steps=1))
    source = trainer.fit_loop._data_source
    seam = loader_seam(trainer)
    calls = []
    handle = seam.register(object(), 10, lambda loader: calls.append(1) or loader)
    seam._transforms = []  # as if the fit died before teardown: the wrapper stays, the seam is forgotten
    seam._source = None
    from antimemo.callbacks import _seams

    _seams._LOADER_SEAMS.pop(trainer, None)
    fresh = loader_seam(trainer)
    handle2 = fresh.register(object(), 10, lambda loader: calls.append(2) or loader)
    trainer.fit(LM("input_ids"), DataLoader(_rows(), batch_size=4))
    assert calls == [2]  # the stale transform did not run
    handle2.remove()
    handle.remove()
    assert "dataloader" not in vars(source)


def test_dp_poisson_samples_only_the_deduplicated_examples():
    rows = _rows(12)
    rows += [{"input_ids": rows[i]["input_ids"].clone()} for i in range(4)]  # 12..15 duplicate 0..3
    seen = []

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(trainer.train_dataloader.dataset)

    dp = DifferentialPrivacy(noise_multiplier=1.0)
    _fit(LM("input_ids"), [dp, DedupSampling(policy="drop", progress=False), Spy()], data=rows)
    assert dp.dataset_size == 12 and dp.sample_rate == pytest.approx(4 / 12)
    assert list(seen[0].indices) == list(range(12))


def test_gradient_terms_wait_for_the_claimer():
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_steps=1))
    seam = grad_seam(trainer)
    applied = []
    owner = object()
    seam.add(owner, lambda: applied.append("now"))
    assert applied == ["now"]
    handle = seam.claim(object())
    seam.add(owner, lambda: applied.append("later"))
    assert applied == ["now"]
    seam.flush()
    assert applied == ["now", "later"]
    handle.remove()
    assert seam.claimed_by is None


def test_dp_keeps_the_spectral_norm_penalty():
    """DP used to overwrite the penalty's gradient with the noised one: the weights did not move at all
    under an extreme lam. Now the penalty is applied after the noise: the weights move by lr * lam/2 u v^T."""
    from antimemo.callbacks import SpectralNormPenalty

    def run(lam):
        pl.seed_everything(0, verbose=False)
        module = LM("input_ids")
        # max_grad_norm tiny: the private data gradient is ~0, so what moves the weights is the penalty
        dp = DifferentialPrivacy(noise_multiplier=0.5, max_grad_norm=1e-8)
        _fit(module, [dp, SpectralNormPenalty(lam=lam)], max_steps=1)
        return module.model.model.layers[0].mlp.down_proj.weight.detach().clone()

    start = LM("input_ids").model.model.layers[0].mlp.down_proj.weight.detach()
    assert (run(0.0) - start).abs().max() < 1e-6
    moved = run(1.0) - start
    # one SGD step of lr * lam/2 * u v^T: a rank-one change of spectral norm 0.1 * 1/2
    assert torch.linalg.matrix_norm(moved, ord=2) == pytest.approx(0.05, rel=1e-3)


# --------------------------------------------------------------------------------------------
# No mitigation can be silently inert: each misuse raises (goldfish and the loss stages above and in
# test_regularizers_state.py; LabelRandomization in test_conditioning.py)
# --------------------------------------------------------------------------------------------


def test_spectral_norm_on_weights_the_optimizer_does_not_train_raises():
    from antimemo.callbacks import SpectralNormPenalty

    class Frozen(LM):
        def configure_optimizers(self):
            return torch.optim.SGD(self.model.lm_head.parameters(), lr=0.1)  # lm_head is not penalized

    with pytest.raises(RuntimeError, match=r"SpectralNormPenalty: none of the \d+ weights of pl_module.model.*optimizer"):
        _fit(Frozen("input_ids"), [SpectralNormPenalty(lam=0.1)], max_steps=1)


def test_example_tied_dropout_whose_modules_never_run_raises():
    from antimemo.callbacks import ExampleTiedDropout, WithExampleIds

    class Bypass(LM):
        def training_step(self, batch, batch_idx):  # embeddings and head only: the MLPs never run
            h = self.model.model.embed_tokens(batch["input_ids"])
            return self.model.lm_head(h).logsumexp(-1).mean()

    with pytest.raises(RuntimeError, match=r"ExampleTiedDropout: none of the hooked modules .*ran in training mode"):
        _fit(Bypass("input_ids"), [ExampleTiedDropout(p_fixed=0.5)], max_steps=1, data=WithExampleIds(_rows()))


def test_dedup_sampling_refuses_a_loader_that_bypassed_it():
    dedup = DedupSampling(policy="drop", progress=False)

    class Unhook(pl.Callback):
        def setup(self, trainer, pl_module, stage):  # something removes the chain before the loader is built
            dedup._patched.remove()

    with pytest.raises(RuntimeError, match="DedupSampling: the train loader was not built through"):
        _fit(LM("input_ids"), [dedup, Unhook()], max_steps=1)


def test_dp_empty_poisson_batch_trains_an_hf_lm_with_noise_only():
    """An empty Poisson draw used to crash a Llama forward; it now runs one zero-loss placeholder row:
    the per-sample gradients are exactly zero (the step is noise only) and goldfish has nothing to check."""
    from antimemo.dp import sampler as dp_sampler

    seen = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(max(float(p.grad_sample.abs().max()) for p in pl_module.parameters() if p.requires_grad))

    original = dp_sampler.PoissonBatchSampler.__iter__

    def always_empty(self):  # every draw is empty
        for _ in original(self):
            yield []

    dp = DifferentialPrivacy(noise_multiplier=1.0)
    try:
        dp_sampler.PoissonBatchSampler.__iter__ = always_empty
        _fit(LM("batch"), [GoldfishTokenDropout(k=2, h=2), dp, Spy()], max_steps=2)
    finally:
        dp_sampler.PoissonBatchSampler.__iter__ = original
    assert dp.steps == 2 and seen == [0.0, 0.0]
