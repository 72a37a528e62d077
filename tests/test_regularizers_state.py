"""Regularizer callbacks: exact resume from checkpoints, state_dict format, and error messages."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import transformers
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from antimemo.callbacks.regularizers import (
    ExampleTiedDropout,
    LossFloor,
    LossTruncation,
    SpectralNormPenalty,
    WithExampleIds,
)

warnings.filterwarnings("ignore", ".*does not have many workers.*")

VOCAB, LENGTH = 48, 12


def _rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=g)} for _ in range(n)]


ROWS = _rows(8, seed=300)
TRAIN = WithExampleIds(ROWS)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config)


class TinyLM(pl.LightningModule):
    def __init__(self, with_labels=True):
        super().__init__()
        self.model = _llama()
        self.with_labels = with_labels

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        if self.with_labels:
            return self.model(input_ids=ids, labels=ids).loss
        logits = self.model(input_ids=ids).logits  # own loss: the loss-rewriting callbacks cannot act
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(callbacks, max_steps, data=TRAIN, module=None, ckpt_path=None, checkpointing=False, root=None):
    module = module or TinyLM()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=checkpointing,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
        default_root_dir=root,
    )
    trainer.fit(module, DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return module


def _states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            _states_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


# ---------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [lambda: LossTruncation(c=0.5, buffer_size=6), lambda: SpectralNormPenalty(lam=0.5, seed=3)],
    ids=["truncation", "spectral"],
)
def test_resume_is_exact(tmp_path, make):
    straight_cb = make()
    straight = _fit([straight_cb], max_steps=4).model.state_dict()

    first_cb = make()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="half")
    _fit([first_cb, saver], max_steps=2, checkpointing=True, root=tmp_path)
    path = tmp_path / "half.ckpt"
    checkpoint = torch.load(path, weights_only=True)  # tensors and plain Python values only
    key = type(first_cb).__qualname__
    _states_equal(checkpoint["callbacks"][key], first_cb.state_dict())

    resumed_cb = make()
    resumed = _fit([resumed_cb], max_steps=4, ckpt_path=path).model.state_dict()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    _states_equal(resumed_cb.state_dict(), straight_cb.state_dict())

    # not vacuous: resuming without the callback's state (fresh buffer / fresh vectors) diverges
    del checkpoint["callbacks"][key]
    torch.save(checkpoint, tmp_path / "stateless.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = _fit([make()], max_steps=4, ckpt_path=tmp_path / "stateless.ckpt").model.state_dict()
    assert any(not torch.equal(fresh[k], straight[k]) for k in straight)


def test_state_dicts_load_with_weights_only(tmp_path):
    callbacks = [
        LossFloor(floor=0.5),
        LossTruncation(c=0.4, buffer_size=5),
        SpectralNormPenalty(lam=0.01),
        ExampleTiedDropout(p_fixed=0.2, p_mem=0.1),
    ]
    for i, cb in enumerate(callbacks):
        torch.save(cb.state_dict(), tmp_path / f"{i}.pt")
        _states_equal(torch.load(tmp_path / f"{i}.pt", weights_only=True), cb.state_dict())


def test_spectral_state_loaded_before_setup_is_applied_at_setup():
    trained = SpectralNormPenalty(lam=0.5, seed=1)
    _fit([trained], max_steps=1)
    state = trained.state_dict()
    fresh = SpectralNormPenalty(lam=0.5, seed=2)
    fresh.load_state_dict(state)  # no model known yet: kept pending
    fresh.setup(pl.Trainer(logger=False), TinyLM(), "fit")
    _states_equal({k: v for k, v in fresh.state_dict().items() if k != "seed"}, {k: v for k, v in state.items() if k != "seed"})


def test_load_state_dict_mismatches_raise():
    state = LossTruncation(c=0.4, buffer_size=5).state_dict()
    with pytest.raises(ValueError, match=r"buffer holds 5 losses but this run uses buffer_size=6.*LossTruncation\(buffer_size=5\)"):
        LossTruncation(c=0.4, buffer_size=6).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        LossTruncation().load_state_dict({"c": 0.4})
    with pytest.raises(ValueError, match=r"trained with ExampleTiedDropout\(.*'p_fixed': 0.2.*changes which neurons"):
        ExampleTiedDropout(p_fixed=0.3).load_state_dict(ExampleTiedDropout(p_fixed=0.2).state_dict())
    cb = SpectralNormPenalty()
    cb.setup(pl.Trainer(logger=False), TinyLM(), "fit")
    bad = cb.state_dict()
    bad["names"] = bad["names"][:-1]
    with pytest.raises(ValueError, match="tracked 13 matrices .* this model has 14"):
        cb.load_state_dict(bad)


# ---------------------------------------------------------------------------------------------
# Errors: knobs, missing ids, missing labels, conflicts, module lookup
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: LossFloor(floor=-1), ValueError, r"floor must be a finite number >= 0 .*got -1.*floor=0 disables"),
        (lambda: LossTruncation(c=1.0), ValueError, r"c must be a number in \[0, 1\), got 1.0"),
        (lambda: LossTruncation(buffer_size=0), ValueError, r"buffer_size must be an integer >= 1, got 0"),
        (lambda: SpectralNormPenalty(lam=-0.1), ValueError, r"lam must be a finite number >= 0, got -0.1"),
        (lambda: SpectralNormPenalty(n_power_iterations=0), ValueError, "n_power_iterations must be an integer >= 1"),
        (lambda: ExampleTiedDropout(p_fixed=0.0), ValueError, r"p_fixed must be a number in \(0, 1\], got 0.0"),
        (lambda: ExampleTiedDropout(p_mem=1.5), ValueError, r"p_mem must be a number in \[0, 1\], got 1.5"),
        (lambda: ExampleTiedDropout(module_pattern="("), ValueError, "module_pattern='\\(' is not a valid regular"),
        (lambda: ExampleTiedDropout(example_ids_key=""), ValueError, "example_ids_key must be a non-empty"),
        (lambda: LossFloor(module_name=3), TypeError, "module_name must be a string, got 3"),
        (lambda: LossFloor(ignore_index=1.5), TypeError, "ignore_index must be an integer"),
    ],
)
def test_invalid_knobs(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_missing_example_ids_names_the_key_and_the_fix():
    with pytest.raises(KeyError, match=r"no key 'example_id' \(example_ids_key\); got \['input_ids'\].*WithExampleIds"):
        _fit([ExampleTiedDropout()], max_steps=1, data=ROWS)


def test_example_tied_dropout_pattern_must_match():
    with pytest.raises(ValueError, match=r"no submodule of LlamaForCausalLM matches module_pattern='blocks'.*model\.layers"):
        _fit([ExampleTiedDropout(module_pattern="blocks")], max_steps=1)


def test_example_tied_dropout_training_forward_outside_a_batch_raises():
    model = _llama().train()
    cb = ExampleTiedDropout().attach(model)
    with pytest.raises(RuntimeError, match=r"ran in training mode outside a training batch.*model\.eval\(\)"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    cb.detach()
    model(input_ids=torch.zeros(1, 4, dtype=torch.long))  # plain forward again


def test_loss_callbacks_need_a_labelled_forward():
    with pytest.raises(RuntimeError, match=r"LossFloor saw no forward call of pl_module.model with labels.*per_sequence_lm_loss"):
        _fit([LossFloor(floor=0.5)], max_steps=1, module=TinyLM(with_labels=False))


def test_two_instances_of_one_loss_callback_are_refused():
    with pytest.raises(ValueError, match=r"LossFloor \+ LossFloor are refused together: two LossFloor callbacks.*keep one"):
        _fit([LossFloor(floor=0.5), LossFloor(floor=0.2)], max_steps=1)


@pytest.mark.parametrize("make", [lambda: LossFloor(module_name="net"), lambda: SpectralNormPenalty(module_name="net"),
                                  lambda: ExampleTiedDropout(module_name="net")])
def test_unknown_module_name(make):
    with pytest.raises(ValueError, match=r"has no submodule 'net' \(module_name\); its children are \['model'\]"):
        _fit([make()], max_steps=1)


def test_with_example_ids_errors():
    with pytest.raises(TypeError, match="needs dataset items that are dicts, got Tensor at index 0"):
        WithExampleIds([torch.zeros(3)])[0]
    with pytest.raises(ValueError, match="already has the key 'example_id'"):
        WithExampleIds([{"example_id": 1}])[0]
    with pytest.raises(TypeError, match="map-style dataset"):
        WithExampleIds(iter([]))
    assert WithExampleIds([{"a": 1}], key="idx")[0] == {"a": 1, "idx": 0}
