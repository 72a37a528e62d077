"""Builders shared by the test files: a tiny Llama, token rows, a tiny LightningModule, quiet Trainer
arguments. Import them (``from _builders import tiny_llama``: ``tests/`` is on ``sys.path``, pytest's
rootdir-relative import) or use the fixtures of ``tests/conftest.py``. Everything here is defined at
module level, so ``ddp_spawn`` workers can unpickle it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import transformers


def tiny_llama(
    vocab: int = 48,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 64,
    seed: int = 0,
) -> transformers.LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` (no download), the same for the same ``seed``.

    ``intermediate`` defaults to ``2 * hidden``. The weights come from ``torch.manual_seed(seed)``
    inside ``torch.random.fork_rng()``: the caller's global RNG is left as it was.
    """
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden if intermediate is None else intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config)


def token_rows(n: int, vocab: int, length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` rows ``{"input_ids": LongTensor[length]}`` of uniform token ids from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (length,), generator=g)} for _ in range(n)]


class TinyCausalLM(pl.LightningModule):
    """A LightningModule around :func:`tiny_llama`: ``self.model``, loss = the model's own LM loss.

    Args:
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: learning rate.
        **llama: passed to :func:`tiny_llama`.
    """

    def __init__(self, optimizer: str = "sgd", lr: float = 0.5, **llama: Any) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.model = tiny_llama(**llama)
        self.optimizer, self.lr = optimizer, lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cls = torch.optim.SGD if self.optimizer == "sgd" else torch.optim.Adam
        return cls(self.parameters(), lr=self.lr)


def quiet_trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """``pl.Trainer`` arguments for a test: no logger, checkpoints, progress bar or model summary.

    ``overrides`` are added (or replace those), e.g. ``quiet_trainer_kwargs(max_steps=4)``.
    """
    return {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **overrides,
    }
