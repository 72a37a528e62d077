"""``LossFloor``: a floor on every training sequence's loss (per-sequence flooding, Ishida et al. 2020)."""

from __future__ import annotations

from antimemo.callbacks._lm_loss_hook import SequenceLossCallback
from antimemo.callbacks._seams import SequenceLosses
from antimemo.functional.regularizers import _check_floor, flood
from antimemo.callbacks._interactions import declare

__all__ = ["LossFloor"]


class LossFloor(SequenceLossCallback):
    """Keep every training sequence's loss at or above a floor ``b`` ("flooding" per sequence).

    During each training step, the loss that the Hugging Face causal LM at
    ``pl_module.<module_name>`` returns for ``labels=...`` is replaced (by a forward hook) with

        ``loss = sum_i n_i * (|L_i - b| + b) / D``

    where ``L_i`` is sequence ``i``'s mean cross-entropy over its ``n_i`` targets (labels not at
    ``ignore_index``, shifted as Hugging Face does) and ``D = sum_i n_i`` (or the model's
    ``num_items_in_batch`` when given): :func:`antimemo.functional.sequence_flooding_loss`. A
    sequence above the floor gets exactly its plain-training gradient; one below it gets the
    opposite gradient (ascent), so no training sequence is driven to the near-zero loss that
    verbatim recall needs.

    ``floor=0`` leaves the model's loss untouched (plain training, bit for bit). Validation,
    test and generation forwards are never changed. Logged each step (``on_step`` and
    ``on_epoch``): ``loss_floor/plain_loss`` (the model's own loss before rewriting) and
    ``loss_floor/below_floor_fraction`` (fraction of the batch's sequences with ``L_i < b``).
    The callback holds no state beyond its arguments.

    Args:
        floor: the floor ``b >= 0`` in nats per target (0 disables). A useful value is below the
            held-out loss the model reaches, e.g. 0.5 for a byte-level model whose validation
            loss is about 1.5.
        module_name: attribute path of the Hugging Face model in the LightningModule
            (``""`` for the LightningModule itself).
        ignore_index: label value that is not a target.

    Example:
        >>> import lightning.pytorch as pl
        >>> cb = LossFloor(floor=0.5)
        >>> trainer = pl.Trainer(callbacks=[cb], max_steps=10)  # doctest: +SKIP
        >>> cb.floor
        0.5
    """

    declaration = declare("loss", domain="lm", note="stage 200 of the loss chain")

    _log_prefix = "loss_floor"
    _order = 200

    def __init__(self, floor: float = 0.5, module_name: str = "model", ignore_index: int = -100) -> None:
        super().__init__(module_name=module_name, ignore_index=ignore_index)
        self.floor = _check_floor(floor)

    def __repr__(self) -> str:
        return f"LossFloor(floor={self.floor}, module_name={self.module_name!r}, ignore_index={self.ignore_index})"

    def _enabled(self) -> bool:
        return self.floor > 0

    def _stage(self, seq: SequenceLosses) -> None:
        below = (seq.values.detach() < self.floor) & (seq.num_targets > 0)
        self._stats["below_floor_fraction"] = below.float().mean()
        seq.values = flood(seq.values, self.floor)
