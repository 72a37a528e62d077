"""Shared machinery of the callbacks that rewrite a Hugging Face causal LM's training loss.

:class:`SequenceLossCallback` registers one stage on the per-sequence loss chain
(:class:`antimemo.callbacks._seams.LossSeam`) of the LM found at ``pl_module.<module_name>``.
During a training batch (between ``on_train_batch_start`` and ``on_train_batch_end``), for every
forward call made in training mode with gradients enabled and with ``labels``, the chain
recomputes per-sequence losses from the returned ``logits`` and the ``labels``, runs the
enabled stages in order and returns the output with ``loss`` replaced. Validation, test, predict
and generation forwards (outside a training batch, or without labels, or under ``no_grad``) are
never touched.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from antimemo.callbacks._fit_handle import FitHandle
from antimemo.callbacks._interactions import check_composition
from antimemo.callbacks._seams import LossSeam, SequenceLosses, loss_seam
from antimemo._checks import is_int


_HF_MODEL_HINT = (
    "Pass module_name=... naming your Hugging Face model (e.g. module_name='model' when the "
    "LightningModule holds it as self.model)"
)


def resolve_module(pl_module: nn.Module, module_name: str, owner: str, hint: str = _HF_MODEL_HINT) -> nn.Module:
    """``pl_module.get_submodule(module_name)`` (``""`` = ``pl_module``; dotted paths allowed)
    with a ``ValueError`` that names the argument, the LightningModule's children and ``hint``."""
    if module_name == "":
        return pl_module
    try:
        return pl_module.get_submodule(module_name)
    except AttributeError as err:
        children = [name for name, _ in pl_module.named_children()]
        raise ValueError(
            f"{owner}: the LightningModule {type(pl_module).__name__} has no submodule {module_name!r} "
            f"(module_name); its children are {children} ({err}). {hint}"
        ) from None


def check_key(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r} ({type(value).__name__})")
    return value


class SequenceLossCallback(FitHandle):
    """Base class: a stage of the per-sequence loss chain of the HF model at ``pl_module.<module_name>``.

    Subclasses set :attr:`_order` (their place in the chain, see :mod:`antimemo.callbacks._seams`)
    and implement :meth:`_enabled` (False = the stage does not run; with no stage enabled the
    model's loss is untouched, bit for bit) and :meth:`_stage` (change the per-sequence
    ``values`` or ``weights`` of a :class:`~antimemo.callbacks._seams.SequenceLosses`).
    """

    _log_prefix = "sequence_loss"
    _order = 500

    def __init__(self, module_name: str = "model", ignore_index: int = -100) -> None:
        super().__init__()
        self.module_name = check_key("module_name", module_name)
        if not is_int(ignore_index):
            raise TypeError(
                f"ignore_index must be an integer label value, got {ignore_index!r}; use -100 (the Hugging "
                "Face / PyTorch default)"
            )
        self.ignore_index = int(ignore_index)
        self._handle: Any = None
        self._seam: LossSeam | None = None
        self._stats: dict[str, Tensor] = {}

    # -- subclass interface ---------------------------------------------------------------------

    def _enabled(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def _stage(self, seq: SequenceLosses) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    # -- registration ---------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Register this callback's stage on the loss chain of ``pl_module.<module_name>`` (fit only)."""
        if stage != "fit":
            return
        check_composition(trainer)
        model = resolve_module(pl_module, self.module_name, type(self).__name__)
        self._remove_handle()
        self._seam = loss_seam(model)
        self._handle = self._seam.add_stage(self, self._order, self._stage, self._enabled)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Open the window in which the chain rewrites the loss."""
        self._stats = {}
        if self._seam is not None:
            self._seam.open((trainer.global_step, batch_idx))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Close the window, check the chain saw the loss, and log this stage's statistics."""
        seam = self._seam
        if seam is None:
            return
        seam.close()
        if seam.calls == 0:
            raise RuntimeError(
                f"{type(self).__name__} saw no forward call of pl_module.{self.module_name or '<itself>'} with "
                "labels during this training step, so it could not act on the loss. It rewrites the loss that a "
                "Hugging Face causal LM returns when called as model(input_ids=..., labels=...). If your "
                "training_step computes its own loss from the logits, drop the callback and use "
                "antimemo.functional.per_sequence_lm_loss with the matching loss function instead; if the model "
                "lives under another attribute, pass module_name=..."
            )
        stats = dict(self._stats)
        if seam.plain_loss is not None:
            stats = {"plain_loss": seam.plain_loss, **stats}
        for key, value in stats.items():
            pl_module.log(f"{self._log_prefix}/{key}", value, on_step=True, on_epoch=True, batch_size=seam.batch_size)
