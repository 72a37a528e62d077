"""The regularizer callbacks in a real pl.Trainer: gradients equal the pure functions' gradients,
strength 0 is plain training bit for bit, validation losses are untouched."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import transformers
from torch.utils.data import DataLoader

from antimemo.callbacks.regularizers import (
    ExampleTiedDropout,
    LossFloor,
    LossTruncation,
    SpectralNormPenalty,
    WithExampleIds,
    spectral_norm_weights,
)
from antimemo.functional.regularizers import (
    example_tied_dropout,
    example_tied_dropout_mask,
    init_power_iteration_vectors,
    loss_truncation_loss,
    per_sequence_lm_loss,
    sequence_flooding_loss,
    spectral_norm_penalty,
)

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*litlogger.*")

VOCAB, LENGTH, BATCH = 48, 12, 4


def _rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=g)} for _ in range(n)]


TRAIN = WithExampleIds(_rows(8, seed=100))  # 2 batches of 4 per epoch
VAL = _rows(4, seed=200)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config)


class TinyLM(pl.LightningModule):
    def __init__(self, positional=False):
        super().__init__()
        self.model = _llama()
        self.positional = positional

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        if self.positional:  # labels passed positionally, tuple output
            loss = self.model(ids, None, None, None, None, ids, return_dict=False)[0]
        else:
            loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss, batch_size=ids.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss, batch_size=ids.shape[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Recorder(pl.Callback):
    """Per optimizer step: the weights and batch(es) before it, and the gradients the optimizer gets."""

    def __init__(self):
        self.steps = []
        self.current = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.current is None:
            weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
            self.current = {"weights": weights, "batches": []}
        self.current["batches"].append({k: v.clone() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.current["grads"] = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()}
        self.steps.append(self.current)
        self.current = None


def _fit(callbacks, max_steps=2, val=False, module=None, **kwargs):
    module = module or TinyLM()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=None if val else 0, callbacks=callbacks, **kwargs,
    )
    trainer.fit(module, DataLoader(TRAIN, batch_size=BATCH), DataLoader(VAL, batch_size=2) if val else None)
    return trainer, module


def _model(weights):
    model = _llama()
    model.load_state_dict(weights)
    return model


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def _assert_grads_close(got, expected):
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _plain_grads(step):
    model = _model(step["weights"])
    ids = step["batches"][0]["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    return _grads(model)


# ---------------------------------------------------------------------------------------------
# The callback changes the gradient exactly as its function says
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positional", [False, True])
def test_loss_floor_gradient_equals_function(positional):
    ids0 = torch.stack([TRAIN[i]["input_ids"] for i in range(BATCH)])
    with torch.no_grad():
        initial, _ = per_sequence_lm_loss(_llama()(input_ids=ids0).logits, ids0)
    s = initial.sort().values
    floor = float(s[1] + s[2]) / 2  # two sequences of the first batch below the floor, two above
    rec = Recorder()
    _fit([LossFloor(floor=floor), rec], max_steps=2, module=TinyLM(positional=positional))
    assert len(rec.steps) == 2
    for step in rec.steps:
        model = _model(step["weights"])
        ids = step["batches"][0]["input_ids"]
        losses, n = per_sequence_lm_loss(model(input_ids=ids).logits, ids)
        sequence_flooding_loss(losses, n, floor).backward()
        _assert_grads_close(step["grads"], _grads(model))
    below = (initial < floor).sum().item()
    assert below == 2  # not vacuous: the floor flips the gradient of two sequences
    assert _max_diff(rec.steps[0]["grads"], _plain_grads(rec.steps[0])) > 1e-3


def test_loss_truncation_gradient_equals_function_with_rolling_buffer():
    cb = LossTruncation(c=0.5, buffer_size=6)
    rec = Recorder()
    _fit([cb, rec], max_steps=2)
    first, second = rec.steps
    # step 1: 4 losses seen < buffer_size 6 -> warm-up, the model's own loss, bit for bit
    plain = _plain_grads(first)
    assert all(torch.equal(first["grads"][k], plain[k]) for k in plain)
    with torch.no_grad():
        ids1 = first["batches"][0]["input_ids"]
        losses1, _ = per_sequence_lm_loss(_model(first["weights"])(input_ids=ids1).logits, ids1)
    # step 2: the ring buffer (slot k = loss number k mod 6) holds batch-1 losses 2, 3 and all of batch 2
    model = _model(second["weights"])
    ids2 = second["batches"][0]["input_ids"]
    losses2, n2 = per_sequence_lm_loss(model(input_ids=ids2).logits, ids2)
    reference = torch.cat([losses1[2:], losses2.detach()])
    loss_truncation_loss(losses2, n2, 0.5, reference=reference).backward()
    _assert_grads_close(second["grads"], _grads(model))
    expected_buffer = torch.stack([losses2[2], losses2[3], losses1[2], losses1[3], losses2[0], losses2[1]]).detach()
    torch.testing.assert_close(cb.buffer, expected_buffer, rtol=1e-6, atol=1e-6)
    assert cb.count == 8
    kept = losses2.detach() <= torch.quantile(reference, 0.5)
    assert 0 < kept.sum() < 4  # not vacuous: some sequences are dropped, some kept


@pytest.mark.parametrize("accumulate", [1, 2])
def test_spectral_norm_gradient_equals_function(accumulate):
    lam = 0.5
    cb = SpectralNormPenalty(lam=lam, seed=7)
    rec = Recorder()
    _fit([cb, rec], max_steps=2 if accumulate == 1 else 1, accumulate_grad_batches=accumulate)
    names = [n for n, _ in spectral_norm_weights(_llama())]
    assert len(names) == 14  # 2 layers x (q, k, v, o, gate, up, down); no embeddings, lm_head or norms
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names)
    assert cb.names == names
    us = init_power_iteration_vectors([p for _, p in spectral_norm_weights(_llama())], seed=7)
    for step in rec.steps:
        model = _model(step["weights"])
        loss = 0
        for batch in step["batches"]:  # Lightning divides each micro-batch loss by accumulate
            ids = batch["input_ids"]
            loss = loss + model(input_ids=ids, labels=ids).loss / accumulate
        weights = [p for _, p in spectral_norm_weights(model)]
        penalty, us = spectral_norm_penalty(weights, us, lam)
        (loss + penalty).backward()
        _assert_grads_close(step["grads"], _grads(model))
    assert len(rec.steps[0]["batches"]) == accumulate
    for name, u in zip(names, us):  # the carried vectors are the function's
        torch.testing.assert_close(cb.vectors[name], u, rtol=1e-6, atol=1e-7)
    if accumulate == 1:
        assert _max_diff(rec.steps[0]["grads"], _plain_grads(rec.steps[0])) > 1e-3  # not vacuous


def test_example_tied_dropout_gradient_equals_function():
    cb = ExampleTiedDropout(p_fixed=0.25, p_mem=0.3, seed=5)
    rec = Recorder()
    _fit([cb, rec], max_steps=2)
    assert cb.hooked_modules == []  # detached at teardown
    for step in rec.steps:
        model = _model(step["weights"])
        batch = step["batches"][0]
        ids, example_ids = batch["input_ids"], batch["example_id"]
        for layer in model.model.layers:  # hand-made hooks calling the pure function
            layer.mlp.register_forward_hook(
                lambda m, a, out: example_tied_dropout(out, example_ids, p_fixed=0.25, p_mem=0.3, seed=5)
            )
        model(input_ids=ids, labels=ids).loss.backward()
        _assert_grads_close(step["grads"], _grads(model))
    # the MLP output neuron j (row j of down_proj) gets no gradient unless some example in the batch owns it
    first = rec.steps[0]
    mask = example_tied_dropout_mask(first["batches"][0]["example_id"], 32, 0.25, 0.3, seed=5).any(0)
    row_norms = first["grads"]["model.layers.0.mlp.down_proj.weight"].abs().sum(1)
    assert torch.equal(row_norms == 0, ~mask)
    assert (~mask).any() and mask[8:].any()  # not vacuous: some memorization neurons used, some not


# ---------------------------------------------------------------------------------------------
# Strength 0 is plain training, bit for bit; strength > 0 is not
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_weights():
    _, module = _fit([], max_steps=3)
    return module.model.state_dict()


@pytest.mark.parametrize(
    "off, on",
    [
        (lambda: LossFloor(floor=0.0), lambda: LossFloor(floor=5.0)),
        (lambda: LossTruncation(c=0.0, buffer_size=4), lambda: LossTruncation(c=0.5, buffer_size=4)),
        (lambda: SpectralNormPenalty(lam=0.0), lambda: SpectralNormPenalty(lam=0.5)),
        (lambda: ExampleTiedDropout(p_fixed=1.0, p_mem=0.3), lambda: ExampleTiedDropout(p_fixed=0.5, p_mem=0.3)),
    ],
    ids=["floor", "truncation", "spectral", "example_tied"],
)
def test_strength_zero_is_plain_training_bit_for_bit(plain_weights, off, on):
    _, module = _fit([off()], max_steps=3)
    got = module.model.state_dict()
    assert all(torch.equal(got[k], plain_weights[k]) for k in plain_weights)
    _, module = _fit([on()], max_steps=3)
    got = module.model.state_dict()
    assert any(not torch.equal(got[k], plain_weights[k]) for k in plain_weights)


# ---------------------------------------------------------------------------------------------
# Validation losses are never altered (example-tied dropout evaluates its own evaluation network)
# ---------------------------------------------------------------------------------------------


def _val_loss(model):
    with torch.no_grad():
        losses = [model(input_ids=ids, labels=ids).loss for ids in torch.stack([r["input_ids"] for r in VAL]).split(2)]
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize(
    "make",
    [lambda: LossFloor(floor=5.0), lambda: LossTruncation(c=0.5, buffer_size=4), lambda: SpectralNormPenalty(lam=0.5)],
    ids=["floor", "truncation", "spectral"],
)
def test_validation_loss_is_the_plain_loss(make):
    trainer, module = _fit([make()], max_steps=2, val=True)  # one epoch, validated at its end
    final = _model(module.model.state_dict())
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(_val_loss(final), rel=1e-6)


def test_example_tied_dropout_validation_uses_the_evaluation_network():
    cb = ExampleTiedDropout(p_fixed=0.25, p_mem=0.1)
    trainer, module = _fit([cb], max_steps=2, val=True)
    final = _model(module.model.state_dict()).eval()
    plain = _val_loss(final)
    attached = ExampleTiedDropout(p_fixed=0.25, p_mem=0.1).attach(final)
    assert attached.hooked_modules == ["model.layers.0.mlp", "model.layers.1.mlp"]
    expected = _val_loss(final)  # memorization neurons dropped, the rest scaled by 0.35 / 0.25
    attached.detach()
    assert _val_loss(final) == plain
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(expected, rel=1e-6)
    assert abs(expected - plain) > 1e-4  # not vacuous: the evaluation network differs from the plain one


def test_logged_statistics():
    trainer, _ = _fit([LossTruncation(c=0.5, buffer_size=4)], max_steps=2)
    m = trainer.callback_metrics
    assert {"loss_truncation/plain_loss", "loss_truncation/threshold", "loss_truncation/dropped_fraction"} <= set(m)
    assert 0.0 < float(m["loss_truncation/dropped_fraction"]) < 1.0
    assert float(m["train_loss"]) < float(m["loss_truncation/plain_loss"])  # the rewritten loss is what trains
    trainer, _ = _fit([LossFloor(floor=5.0)], max_steps=1)
    assert float(trainer.callback_metrics["loss_floor/below_floor_fraction"]) == 1.0  # every loss < 5 at init
    trainer, _ = _fit([SpectralNormPenalty(lam=0.5)], max_steps=1)
    m = trainer.callback_metrics
    assert float(m["spectral_norm/penalty"]) == pytest.approx(0.25 * float(m["spectral_norm/sigma_sum"]))


def test_works_with_the_recipe_module():
    from antimemo.lm.module import CausalLMModule

    def fit(callbacks):
        module = CausalLMModule(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
                                warmup_steps=0, min_lr_ratio=1.0, pad_token_id=None)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             callbacks=callbacks)
        trainer.fit(module, DataLoader(TRAIN, batch_size=BATCH), DataLoader(VAL, batch_size=2))
        return trainer

    m = fit([LossFloor(floor=5.0), SpectralNormPenalty(lam=0.01), ExampleTiedDropout(p_fixed=0.25, p_mem=0.1)]).callback_metrics
    assert {"train_loss", "val_loss", "loss_floor/plain_loss", "spectral_norm/sigma_sum"} <= set(m)
    # train_loss logged by the recipe is the flooded loss: every sequence is below 5, so 2*5 - L > L
    assert float(m["train_loss_epoch"]) > float(m["loss_floor/plain_loss_epoch"])
    m = fit([LossTruncation(c=0.5, buffer_size=4)]).callback_metrics
    assert float(m["train_loss"]) < float(m["loss_truncation/plain_loss"])
