"""The shared test builders (tests/_builders.py) and their conftest fixtures do what they say."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from _builders import TinyCausalLM, token_rows  # tests/ is on sys.path (pytest's rootdir-relative import)


def test_tiny_llama_is_seeded_and_leaves_the_global_rng_alone(builders):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = builders.tiny_llama(seed=0), builders.tiny_llama(seed=0), builders.tiny_llama(seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert tuple(wa.shape) == (48, 32) and a.config.num_hidden_layers == 2 and a.config.intermediate_size == 64


def test_fixtures(tiny_llama, quiet_trainer_kwargs, tiny_causal_lm):
    assert tiny_llama.config.vocab_size == 48
    assert quiet_trainer_kwargs == {
        "logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
    }  # fmt: skip
    assert isinstance(tiny_causal_lm, pl.LightningModule) and tiny_causal_lm.model.config.vocab_size == 48


def test_token_rows_are_seeded():
    rows = token_rows(3, vocab=10, length=5, seed=7)
    assert [tuple(r["input_ids"].shape) for r in rows] == [(5,)] * 3
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(rows, token_rows(3, 10, 5, seed=7)))
    assert int(max(r["input_ids"].max() for r in rows)) < 10


def test_tiny_causal_lm_trains_quietly(tmp_path, builders):
    module = TinyCausalLM(optimizer="adam", lr=1e-2, vocab=16, max_positions=16)
    before = module.model.lm_head.weight.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, default_root_dir=tmp_path, **builders.quiet_trainer_kwargs())
    trainer.fit(module, DataLoader(token_rows(4, 16, 8, seed=0), batch_size=2))
    assert trainer.global_step == 2 and not torch.equal(before, module.model.lm_head.weight)
