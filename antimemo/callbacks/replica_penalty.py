"""``ReplicaPenalty``: penalise a diffusion model for reconstructing its own training image from
heavy noise (issue 6, diffusion part).

At high noise levels the best a generalising denoiser can do is a blurred posterior mean of
many training images; a model that has memorised an image reconstructs it exactly. So on the
samples of a training batch whose noise level ``sigma_t = sqrt(1 - alphabar_t)`` is at least
``min_noise``, the callback adds

``strength * mean_i [sigma_i >= min_noise] * relu(corr(x0_hat_i, x0_i) - threshold)``

to the loss, where ``x0_hat_i = (x_t - sigma_i * eps_hat) / sqrt(alphabar_i)`` is the predicted
clean image, ``x0_i`` the training target and ``corr`` the Pearson correlation of their
pixels (:func:`antimemo.functional.replica.replica_penalty`). The mean runs over the whole
batch (inactive samples count as 0), so the term's scale does not depend on how many samples
fall above ``min_noise``.

Mechanism: the term is registered with
:meth:`antimemo.diffusion.DiffusionModule.add_loss_term` at fit setup (and removed at
teardown). The module adds it to its loss in ``training_step`` and logs it as
``train/replica_penalty``; validation never calls loss terms. ``strength=0`` registers nothing,
so training is exactly plain training.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from antimemo.callbacks._fit_handle import FitHandle
from antimemo.functional.replica import replica_penalty
from antimemo.callbacks._interactions import check_composition, declare

__all__ = ["ReplicaPenalty"]


class ReplicaPenalty(FitHandle):
    """Add the replica penalty to a :class:`~antimemo.diffusion.DiffusionModule`'s training loss.

    Args:
        strength: weight of the penalty (the knob; 0 is plain training, bit for bit).
        threshold: correlation between the predicted clean image and its target above which the
            penalty acts, in ``[-1, 1)``; 0.8 leaves blurred class averages alone.
        min_noise: only samples with noise level ``sigma_t >= min_noise`` (in ``[0, 1]``) are
            penalised; with the linear 1000-step DDPM schedule 0.98 is ``t >= 563`` (0.9: ``t >= 403``).
            At such noise a generalising model's prediction is a blurred class average.
        name: name of the loss term (logged as ``train/{name}``).

    Raises:
        ValueError: invalid knobs (at construction).
        TypeError: at fit setup, when the module has no ``add_loss_term``.

    Example:
        >>> cb = ReplicaPenalty(strength=0.1, threshold=0.8, min_noise=0.98)
        >>> trainer = pl.Trainer(callbacks=[cb])  # doctest: +SKIP
    """

    declaration = declare("loss", domain="diffusion")

    def __init__(self, strength: float = 0.1, threshold: float = 0.8, min_noise: float = 0.98, name: str = "replica_penalty") -> None:
        super().__init__()
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength >= 0 or strength == float("inf"):
            raise ValueError(f"strength must be a finite number >= 0, got {strength!r}; 0 turns the penalty off, e.g. 0.1")
        # the function validates threshold and min_noise
        import torch

        replica_penalty(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), threshold, min_noise)
        self.strength, self.threshold, self.min_noise, self.name = float(strength), float(threshold), float(min_noise), name
        self._handle: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Register the loss term (fit only; nothing for ``strength=0``)."""
        if stage != "fit":
            return
        check_composition(trainer)
        if not callable(getattr(pl_module, "add_loss_term", None)):
            raise TypeError(
                f"ReplicaPenalty needs a module with add_loss_term(name, fn) (antimemo.diffusion.DiffusionModule); "
                f"{type(pl_module).__name__} has none. With your own module, add "
                "strength * antimemo.functional.replica.replica_penalty(pred_x0, x0, sigma).mean() to the loss"
            )
        self._remove_handle()
        if self.strength > 0:
            self._handle = pl_module.add_loss_term(self.name, self.term)

    def term(self, step: Any) -> Tensor:
        """``strength * mean(replica_penalty(step.pred_x0, step.x0, step.sigma, threshold, min_noise))``."""
        p = replica_penalty(step.pred_x0, step.x0, step.sigma, self.threshold, self.min_noise)
        return self.strength * p.mean()
