"""Base class of callbacks that hold one removable registration for the length of a fit."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class FitHandle(pl.Callback):
    """A callback that registers one removable thing in ``setup("fit")`` (a forward hook, a loss
    term: anything with ``.remove()``) and removes it in ``teardown("fit")``.

    Subclasses store the registration in ``self._handle`` and call :meth:`_remove_handle` before
    registering again, so a second ``fit`` never stacks two hooks.
    """

    _handle: Any = None

    def _remove_handle(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove what ``setup`` registered (fit only)."""
        if stage == "fit":
            self._remove_handle()
