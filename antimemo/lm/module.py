"""``CausalLMModule``: a small byte-level Llama as a LightningModule.

The Hugging Face model lives at ``self.model`` (``MemorizationMonitor`` generates with it).
``training_step`` trains on ``batch["labels"]`` when present (``GoldfishTokenDropout`` writes
them, with dropped targets at ``-100``) and on ``input_ids`` otherwise; Hugging Face shifts the
labels and averages the cross-entropy over the targets that are not ``-100``.
``validation_step`` always uses ``input_ids`` as labels, so ``val_loss`` is the plain held-out loss.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from antimemo._checks import check_int
from antimemo.lm.corpus import BYTE_PAD_ID, BYTE_VOCAB_SIZE

__all__ = ["CausalLMModule"]


class CausalLMModule(pl.LightningModule):
    """A ``LlamaForCausalLM`` built from a ``LlamaConfig`` (no download), trained with AdamW.

    The learning rate warms up linearly for ``warmup_steps`` optimizer steps, then follows a
    cosine from ``lr`` down to ``min_lr_ratio * lr`` at the last step
    (``trainer.estimated_stepping_batches``).

    Args:
        vocab_size: vocabulary size; 257 fits :class:`~antimemo.lm.corpus.ByteTokenizer`.
        hidden_size: model width.
        num_layers: number of decoder layers.
        num_heads: attention heads (``hidden_size`` must be divisible by it).
        intermediate_size: MLP width; ``None`` means ``4 * hidden_size``.
        max_position_embeddings: longest sequence the model accepts (RoPE table size).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (applied to matrices only, not to norms).
        warmup_steps: linear warm-up steps.
        min_lr_ratio: final learning rate as a fraction of ``lr`` (1.0 keeps it constant).
        pad_token_id: id the model treats as padding.
        seed: seed of the weight initialisation (independent of the global RNG, which is left as
            it was).

    Example:
        >>> m = CausalLMModule(hidden_size=32, num_layers=1, num_heads=2)
        >>> batch = {"input_ids": torch.randint(0, 256, (2, 16))}
        >>> float(m.training_step(batch, 0)) > 0
        True
    """

    def __init__(
        self,
        vocab_size: int = BYTE_VOCAB_SIZE,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 512,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        pad_token_id: int | None = BYTE_PAD_ID,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, 2, "257 fits the byte tokenizer")
        check_int("hidden_size", hidden_size, 1, "e.g. hidden_size=256")
        check_int("num_layers", num_layers, 1, "e.g. num_layers=4")
        check_int("num_heads", num_heads, 1, "e.g. num_heads=4")
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size must be divisible by num_heads, got hidden_size={hidden_size}, num_heads={num_heads}; "
                f"e.g. num_heads={math.gcd(hidden_size, 4) or 1}"
            )
        if intermediate_size is not None:
            check_int("intermediate_size", intermediate_size, 1, "or None for 4 * hidden_size")
        check_int("max_position_embeddings", max_position_embeddings, 2, "it must cover the sequence length")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}; e.g. lr=1e-3")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}; 0 disables it")
        check_int("warmup_steps", warmup_steps, 0, "0 disables warm-up")
        if not (isinstance(min_lr_ratio, (int, float)) and 0 <= min_lr_ratio <= 1):
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}; 1.0 keeps lr constant")
        if pad_token_id is not None and not 0 <= pad_token_id < vocab_size:
            raise ValueError(
                f"pad_token_id must be in [0, vocab_size={vocab_size}) or None, got {pad_token_id!r}"
            )
        check_int("seed", seed, 0, "e.g. seed=0")
        self.save_hyperparameters()
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or 4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_position_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=False,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = LlamaForCausalLM(config)

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """Run the Hugging Face model (``kwargs`` such as ``labels`` pass through).

        Example:
            >>> m = CausalLMModule(hidden_size=32, num_layers=1, num_heads=2)
            >>> m(torch.zeros(1, 4, dtype=torch.long)).logits.shape
            torch.Size([1, 4, 257])
        """
        return self.model(input_ids=input_ids, **kwargs)

    @staticmethod
    def _check_batch(batch: Any) -> None:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError(
                "CausalLMModule expects dict batches with an 'input_ids' LongTensor[B, S] (optionally 'labels' and "
                f"'attention_mask'), got {type(batch).__name__}"
                + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else "")
            )

    def _loss(self, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels)
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Causal-LM loss on ``batch["labels"]`` if present (goldfish), else on ``input_ids``; logs ``train_loss``."""
        self._check_batch(batch)
        labels = batch.get("labels")
        loss = self._loss(batch, batch["input_ids"] if labels is None else labels)
        bs = batch["input_ids"].shape[0]
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Plain held-out loss (labels = ``input_ids``, never goldfish-masked); logs ``val_loss``."""
        self._check_batch(batch)
        loss = self._loss(batch, batch["input_ids"])
        bs = batch["input_ids"].shape[0]
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=bs)
        return loss

    def configure_optimizers(self) -> Any:
        """AdamW (no decay on norms and biases) with linear warm-up and cosine decay, stepped per batch."""
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=(0.9, 0.95),
        )
        total = self._total_steps()
        warmup, floor = hp.warmup_steps, hp.min_lr_ratio

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if total is None or total <= warmup:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _total_steps(self) -> int | None:
        trainer = self._trainer
        if trainer is None:
            return None
        total = trainer.estimated_stepping_batches
        if total is None or not math.isfinite(total):
            return None
        return int(total)
