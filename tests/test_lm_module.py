"""CausalLMModule: model construction, seeded init, label handling, optimisation, LR schedule."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from _builders import quiet_trainer_kwargs  # tests/ is on sys.path (pytest's rootdir-relative import)
from antimemo.lm import CausalLMModule, TextDataModule

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)


def _batch(seed: int = 0, b: int = 4, s: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 256, (b, s), generator=g)}


def _manual_loss(module: CausalLMModule, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted mean cross-entropy over targets that are not -100 (what HF's causal-LM loss does)."""
    logits = module.model(input_ids=input_ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def test_builds_a_byte_level_llama_at_model():
    m = CausalLMModule(**TINY)
    assert isinstance(m.model, LlamaForCausalLM)
    cfg = m.model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (257, 32, 1, 2)
    assert cfg.intermediate_size == 64
    assert CausalLMModule(hidden_size=32, num_layers=1, num_heads=2).model.config.intermediate_size == 128  # 4 * 32
    assert m(torch.zeros(2, 5, dtype=torch.long)).logits.shape == (2, 5, 257)


def test_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = CausalLMModule(**TINY, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = CausalLMModule(**TINY, seed=7)
    c = CausalLMModule(**TINY, seed=8)
    for (na, pa), (_, pb), (_, pc) in zip(a.model.named_parameters(), b.model.named_parameters(), c.model.named_parameters()):
        assert torch.equal(pa, pb), na
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.model.parameters(), c.model.parameters()))


def test_training_step_uses_labels_when_present_else_input_ids():
    m = CausalLMModule(**TINY)
    batch = _batch()
    ids = batch["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        plain = m.training_step(dict(batch), 0)
        torch.testing.assert_close(plain, _manual_loss(m, ids, ids))
        labels = ids.clone()
        labels[:, 1::2] = -100  # goldfish-style: half of the targets dropped
        masked = m.training_step({"input_ids": ids, "labels": labels}, 0)
        torch.testing.assert_close(masked, _manual_loss(m, ids, labels))
        assert not torch.isclose(masked, plain)
        # validation never uses the (goldfish) labels: it equals the plain loss
        val = m.validation_step({"input_ids": ids, "labels": labels}, 0)
        torch.testing.assert_close(val, plain)


def test_bad_batch_raises_type_error():
    m = CausalLMModule(**TINY)
    with pytest.raises(TypeError, match="'input_ids'"):
        m.training_step(torch.zeros(2, 4, dtype=torch.long), 0)
    with pytest.raises(TypeError, match=r"keys \['ids'\]"):
        m.validation_step({"ids": torch.zeros(2, 4, dtype=torch.long)}, 0)


def test_loss_decreases_with_its_own_optimizer():
    torch.manual_seed(0)
    m = CausalLMModule(**TINY, lr=3e-3, warmup_steps=0)
    opt = m.configure_optimizers()["optimizer"]
    batch = _batch(b=8, s=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = float(m.training_step(batch, 0))
        for _ in range(40):
            opt.zero_grad()
            m.training_step(batch, 0).backward()
            opt.step()
        last = float(m.training_step(batch, 0))
    # untrained: about ln(257) = 5.55 nats; 40 steps on one batch must cut it clearly
    assert abs(first - math.log(257)) < 0.3
    assert last < 0.8 * first, (first, last)


def test_optimizer_groups_exclude_norms_from_weight_decay():
    m = CausalLMModule(**TINY, weight_decay=0.1)
    opt = m.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.model.parameters()))


class _LRRecorder(pl.Callback):
    def __init__(self):
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_fit_in_a_trainer_logs_losses_and_follows_the_lr_schedule(tmp_path):
    dm = TextDataModule(seq_len=16, num_train=40, num_holdout=8, batch_size=2)
    m = CausalLMModule(**TINY, lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    rec = _LRRecorder()
    trainer = pl.Trainer(max_epochs=1, callbacks=[rec], default_root_dir=tmp_path, **quiet_trainer_kwargs())
    trainer.fit(m, datamodule=dm)
    assert trainer.global_step == 20  # 40 sequences / batch 2
    assert {"train_loss_epoch", "val_loss"} <= set(trainer.callback_metrics)
    assert math.isfinite(float(trainer.callback_metrics["val_loss"]))
    # LR before optimizer step s (total 20 steps, warm-up 4, cosine to 0.1 * lr):
    #   s < 4: lr * (s + 1) / 4                    -> 2.5e-4, 5e-4, 7.5e-4, 1e-3
    #   s >= 4: lr * (0.1 + 0.9 * 0.5 * (1 + cos(pi * (s - 4) / 16)))
    #   s = 4 -> 1e-3; s = 12 -> 0.1 + 0.45 = 0.55e-3; s = 19 -> 0.1 + 0.45 * (1 + cos(15 pi / 16)) = 0.108647e-3
    expected = {0: 2.5e-4, 1: 5e-4, 2: 7.5e-4, 3: 1e-3, 4: 1e-3, 12: 5.5e-4, 19: 1.08647e-4}
    for step, lr in expected.items():
        assert rec.lrs[step] == pytest.approx(lr, rel=1e-4), step


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 30, "num_heads": 4}, "hidden_size must be divisible by num_heads, got hidden_size=30, num_heads=4"),
        ({"lr": 0}, "lr must be a positive number, got 0"),
        ({"num_layers": 0}, "num_layers must be an integer >= 1, got 0"),
        ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\], got 1.5"),
        ({"pad_token_id": 300}, "pad_token_id must be in"),
        ({"weight_decay": -1.0}, "weight_decay must be a number >= 0, got -1.0"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalLMModule(**{**TINY, **kwargs})
