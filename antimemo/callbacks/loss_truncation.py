"""``LossTruncation``: drop the highest per-sequence losses (Kang & Hashimoto 2020; TinyMem)."""

from __future__ import annotations

import numbers
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor

from antimemo.callbacks._lm_loss_hook import SequenceLossCallback
from antimemo.callbacks._seams import SequenceLosses
from antimemo.functional.regularizers import _check_c, truncation_threshold
from antimemo.callbacks._interactions import declare

__all__ = ["LossTruncation"]


def _check_buffer_size(buffer_size: object) -> int:
    if not isinstance(buffer_size, numbers.Integral) or isinstance(buffer_size, bool) or int(buffer_size) < 1:
        raise ValueError(
            f"buffer_size must be an integer >= 1, got {buffer_size!r}; it is the number of recent per-sequence "
            "losses whose quantile sets the threshold (TinyMem: 10000; e.g. buffer_size=1000)"
        )
    return int(buffer_size)


def _all_gather_1d(local: Tensor) -> Tensor:
    """Concatenate a 1-D tensor of any length from every rank, in rank order."""
    world = dist.get_world_size()
    size = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = torch.zeros(max(counts), dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


class LossTruncation(SequenceLossCallback):
    """Drop the training sequences whose loss is in the top ``c`` fraction of recent losses.

    A rolling buffer holds the last ``buffer_size`` per-sequence training losses (detached).
    At each training step the callback (a forward hook on the Hugging Face causal LM at
    ``pl_module.<module_name>``):

    1. computes the batch's per-sequence losses ``L_i`` (mean cross-entropy over the ``n_i``
       targets of sequence ``i``);
    2. appends them to the buffer (under DDP: the losses of **all ranks**, gathered in rank
       order, so every rank holds the same buffer and uses the same threshold, and the
       checkpoint written by rank 0 is valid for all ranks);
    3. warm-up: until the buffer is full (``buffer_size`` losses seen in total), the model's loss
       is left untouched (plain training);
    4. afterwards it replaces the loss with
       ``sum_i [L_i <= q] * n_i * L_i / D``, ``q`` = the ``(1 - c)``-quantile of the buffer
       (linear interpolation), ``D = sum_i n_i`` over all sequences of the batch (or
       ``num_items_in_batch``): :func:`antimemo.functional.loss_truncation_loss` with
       ``reference=buffer``. Dropped sequences contribute no gradient; kept ones exactly their
       plain-training gradient (TinyMem's ``(loss * mask).mean()``).

    ``c=0`` leaves the loss untouched and keeps no buffer (plain training, bit for bit).
    Validation/test/generation losses are never changed. The buffer and the count of losses
    seen are saved in checkpoints (``state_dict``: tensors and ints only), so resuming continues
    with the same threshold. Logged each step: ``loss_truncation/plain_loss`` (the model's loss
    before rewriting) and, after warm-up, ``loss_truncation/dropped_fraction`` (of this rank's
    batch) and ``loss_truncation/threshold`` (``q``).

    Args:
        c: fraction of the highest losses to drop, in ``[0, 1)`` (TinyMem: 0.4; 0 disables).
        buffer_size: number of recent per-sequence losses in the rolling buffer (TinyMem: 10000,
            with a 10000-loss warm-up; here the warm-up is "until the buffer is full").
        module_name: attribute path of the Hugging Face model in the LightningModule.
        ignore_index: label value that is not a target.

    Example:
        >>> import lightning.pytorch as pl
        >>> cb = LossTruncation(c=0.4, buffer_size=1000)
        >>> trainer = pl.Trainer(callbacks=[cb], max_steps=10)  # doctest: +SKIP
        >>> cb.state_dict()["count"]
        0
    """

    declaration = declare("loss", domain="lm", note="stage 100 of the loss chain")

    _log_prefix = "loss_truncation"
    _order = 100

    def __init__(
        self, c: float = 0.4, buffer_size: int = 1000, module_name: str = "model", ignore_index: int = -100
    ) -> None:
        super().__init__(module_name=module_name, ignore_index=ignore_index)
        self.c = _check_c(c)
        self.buffer_size = _check_buffer_size(buffer_size)
        self.buffer = torch.zeros(self.buffer_size, dtype=torch.float32)
        self.count = 0
        self._world_size = 1

    def __repr__(self) -> str:
        return (
            f"LossTruncation(c={self.c}, buffer_size={self.buffer_size}, module_name={self.module_name!r}, "
            f"ignore_index={self.ignore_index})"
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Register the hook and remember the world size (for gathering losses across ranks)."""
        super().setup(trainer, pl_module, stage)
        self._world_size = int(trainer.world_size)

    @property
    def warmed_up(self) -> bool:
        """Whether the buffer is full, i.e. truncation is active."""
        return self.count >= self.buffer_size

    def _enabled(self) -> bool:
        return self.c > 0

    def _gather(self, local: Tensor) -> Tensor:
        if self._world_size > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    f"LossTruncation: the Trainer has world_size={self._world_size} but torch.distributed is not "
                    "initialized, so the per-sequence losses cannot be gathered; use a DDP strategy"
                )
            return _all_gather_1d(local)
        return local

    def _insert(self, values: Tensor) -> None:
        values = values.detach().to(torch.float32)
        if self.buffer.device != values.device:
            self.buffer = self.buffer.to(values.device)
        m = values.numel()
        start = self.count
        if m > self.buffer_size:
            values, start = values[-self.buffer_size :], self.count + m - self.buffer_size
        index = (start + torch.arange(values.numel(), device=values.device)) % self.buffer_size
        self.buffer[index] = values
        self.count += m

    def _stage(self, seq: SequenceLosses) -> None:
        self._insert(self._gather(seq.raw.detach().float()))
        if not self.warmed_up:
            return
        threshold = truncation_threshold(self.buffer, self.c)
        self._stats["threshold"] = threshold
        kept = (seq.raw.detach() <= threshold.to(seq.raw.device)) & (seq.num_targets > 0)
        self._stats["dropped_fraction"] = 1.0 - kept.float().sum() / (seq.num_targets > 0).sum().clamp_min(1)
        seq.weights = seq.weights * (seq.raw.detach() <= threshold.to(seq.raw.device)).to(seq.weights.dtype)

    def state_dict(self) -> dict[str, Any]:
        """``{"c", "buffer_size", "count", "buffer"}``: the rolling buffer (CPU float32) and losses seen."""
        return {"c": self.c, "buffer_size": self.buffer_size, "count": self.count, "buffer": self.buffer.detach().cpu().clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the rolling buffer.

        Raises:
            ValueError: the checkpoint's ``buffer_size`` differs or its state is incomplete.
        """
        missing = [k for k in ("buffer_size", "count", "buffer") if k not in state_dict]
        if missing:
            raise ValueError(f"LossTruncation checkpoint state lacks {missing}; it was not written by this callback")
        if int(state_dict["buffer_size"]) != self.buffer_size or state_dict["buffer"].shape != (self.buffer_size,):
            raise ValueError(
                f"The checkpoint's LossTruncation buffer holds {state_dict['buffer_size']} losses but this run uses "
                f"buffer_size={self.buffer_size}; resume with LossTruncation(buffer_size={state_dict['buffer_size']}) "
                "or start a new run without ckpt_path"
            )
        self.buffer = state_dict["buffer"].to(device=self.buffer.device, dtype=torch.float32).clone()
        self.count = int(state_dict["count"])
