"""Shared machinery of the callbacks that rewrite a Hugging Face causal LM's training loss.

:class:`SequenceLossCallback` registers a forward hook (``register_forward_hook(...,
with_kwargs=True)``, a documented PyTorch mechanism) on the LM found at
``pl_module.<module_name>``. During a training batch (between ``on_train_batch_start`` and
``on_train_batch_end``), for every forward call made with gradients enabled and with ``labels``,
the hook recomputes per-sequence losses from the returned ``logits`` and the ``labels`` and
returns the output with ``loss`` replaced by the subclass's reduction. Validation, test, predict
and generation forwards (outside a training batch, or without labels, or under ``no_grad``) are
never touched.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from antimemo.callbacks._fit_handle import FitHandle
from antimemo.functional.goldfish import _is_int
from antimemo.functional.regularizers import per_sequence_lm_loss


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
    """Base class: replace the HF model's training ``loss`` by a reduction of per-sequence losses.

    Subclasses implement :meth:`_enabled` (False = leave the loss untouched, bit for bit) and
    :meth:`_reduce` (per-sequence losses -> batch loss, or None to leave it untouched).
    """

    _log_prefix = "sequence_loss"

    def __init__(self, module_name: str = "model", ignore_index: int = -100) -> None:
        super().__init__()
        self.module_name = check_key("module_name", module_name)
        if not _is_int(ignore_index):
            raise TypeError(
                f"ignore_index must be an integer label value, got {ignore_index!r}; use -100 (the Hugging "
                "Face / PyTorch default)"
            )
        self.ignore_index = int(ignore_index)
        self._handle: Any = None
        self._model: nn.Module | None = None
        self._signature: inspect.Signature | None = None
        self._active = False
        self._calls = 0
        self._stats: dict[str, Tensor] = {}
        self._batch_size = 1

    # -- subclass interface ---------------------------------------------------------------------

    def _enabled(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def _reduce(self, losses: Tensor, num_targets: Tensor, num_items: Any) -> Tensor | None:  # pragma: no cover
        raise NotImplementedError

    # -- hook management ------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Register the forward hook on ``pl_module.<module_name>`` (fit only)."""
        if stage != "fit":
            return
        name = type(self).__name__
        for other in trainer.callbacks:
            if other is not self and isinstance(other, SequenceLossCallback) and other.module_name == self.module_name:
                raise ValueError(
                    f"{name} and {type(other).__name__} both rewrite the training loss of "
                    f"pl_module.{self.module_name or '<itself>'}; the second would silently overwrite the first. "
                    "Use one of them per run"
                )
        model = resolve_module(pl_module, self.module_name, name)
        self._remove_handle()
        self._model = model
        try:
            self._signature = inspect.signature(model.forward)
        except (TypeError, ValueError):  # pragma: no cover - C-implemented forward
            self._signature = None
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)


    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Open the window in which the hook rewrites the loss."""
        self._active = True
        self._calls = 0
        self._stats = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Close the window, check the hook saw the loss, and log its statistics."""
        self._active = False
        if self._calls == 0:
            raise RuntimeError(
                f"{type(self).__name__} saw no forward call of pl_module.{self.module_name or '<itself>'} with "
                "labels during this training step, so it could not act on the loss. It rewrites the loss that a "
                "Hugging Face causal LM returns when called as model(input_ids=..., labels=...). If your "
                "training_step computes its own loss from the logits, drop the callback and use "
                "antimemo.functional.per_sequence_lm_loss with the matching loss function instead; if the model "
                "lives under another attribute, pass module_name=..."
            )
        for key, value in self._stats.items():
            pl_module.log(f"{self._log_prefix}/{key}", value, on_step=True, on_epoch=True, batch_size=self._batch_size)

    # -- the hook -------------------------------------------------------------------------------

    def _arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if not args or self._signature is None:
            return kwargs
        try:
            bound = self._signature.bind_partial(*args, **kwargs)
        except TypeError:
            return kwargs
        out = dict(bound.arguments)
        extra = out.pop("kwargs", None)
        if isinstance(extra, dict):
            out.update(extra)
        return out

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._active or not torch.is_grad_enabled():
            return None
        arguments = self._arguments(args, kwargs)
        labels = arguments.get("labels")
        if labels is None:
            return None
        name = type(self).__name__
        if arguments.get("shift_labels") is not None:
            raise NotImplementedError(
                f"{name} supports models called with labels= (unshifted, Hugging Face convention), not "
                "shift_labels=; pass labels instead"
            )
        self._calls += 1
        if isinstance(output, Mapping):
            loss, logits = output.get("loss"), output.get("logits")
        elif isinstance(output, tuple) and len(output) >= 2:
            loss, logits = output[0], output[1]
        else:
            raise TypeError(
                f"{name} expects the model to return a Hugging Face ModelOutput (or a tuple (loss, logits, ...)), "
                f"got {type(output).__name__}"
            )
        if not isinstance(logits, Tensor) or not isinstance(loss, Tensor):
            raise TypeError(
                f"{name}: the model's output has no loss/logits tensors (loss={type(loss).__name__}, "
                f"logits={type(logits).__name__}); call the model with labels=... and return logits"
            )
        self._batch_size = int(logits.shape[0])
        self._stats["plain_loss"] = loss.detach()
        if not self._enabled():
            return None
        losses, num_targets = per_sequence_lm_loss(logits, labels, self.ignore_index)
        new_loss = self._reduce(losses, num_targets, arguments.get("num_items_in_batch"))
        if new_loss is None:
            return None
        if isinstance(output, Mapping):
            output["loss"] = new_loss
            return output
        return (new_loss, *output[1:])
