"""Validation of :class:`~antimemo.callbacks.DifferentialPrivacy`'s arguments (no Lightning)."""

from __future__ import annotations

from typing import Any

from antimemo._checks import is_number
from antimemo.dp.accounting import ACCOUNTANTS

__all__ = ["GRAD_SAMPLE_MODES", "check_dp_arguments"]

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost", "bookkeeping", "auto")


def check_dp_arguments(
    noise_multiplier: Any,
    target_epsilon: Any,
    delta: Any,
    max_grad_norm: Any,
    epochs: Any,
    accountant: Any,
    poisson_sampling: Any,
    grad_sample_mode: Any,
    secure_mode: Any,
    fix: Any,
    allow_nonprivate_start: Any = False,
    reproducible_noise: Any = False,
) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the argument, the value and the fix for any bad one.

    Example:
        >>> check_dp_arguments(1.0, None, None, 1.0, None, "prv", True, "hooks", False, False)
        >>> check_dp_arguments(None, None, None, 1.0, None, "prv", True, "hooks", False, False)
        Traceback (most recent call last):
        ...
        ValueError: pass exactly one of noise_multiplier or target_epsilon, got noise_multiplier=None, target_epsilon=None; e.g. DifferentialPrivacy(noise_multiplier=1.0) or DifferentialPrivacy(target_epsilon=8.0)
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            "pass exactly one of noise_multiplier or target_epsilon, got "
            f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}; e.g. "
            "DifferentialPrivacy(noise_multiplier=1.0) or DifferentialPrivacy(target_epsilon=8.0)"
        )
    if noise_multiplier is not None and not (is_number(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(
            f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}; e.g. noise_multiplier=1.0 "
            "(0 clips without noise: epsilon is inf)"
        )
    if target_epsilon is not None and not (is_number(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}; e.g. target_epsilon=8.0")
    if delta is not None and not (is_number(delta) and 0 < delta < 1):
        raise ValueError(
            f"delta must be in (0, 1) and below 1/N for N training examples, got {delta!r}; "
            "or None for 1/(10 N)"
        )
    if not (is_number(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}; e.g. max_grad_norm=1.0")
    if epochs is not None:
        if target_epsilon is None:
            raise ValueError(
                f"epochs={epochs!r} is only used with target_epsilon (it sets the number of epochs the noise "
                "is computed for); with noise_multiplier leave epochs=None and set Trainer(max_epochs)"
            )
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1 or None for Trainer(max_epochs), got {epochs!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}; 'prv' (the Opacus default) is the tightest"
        )
    if not isinstance(poisson_sampling, bool):
        raise TypeError(f"poisson_sampling must be a bool, got {poisson_sampling!r}")
    if not poisson_sampling:
        raise ValueError(
            "poisson_sampling=False is not supported: Opacus' accountants assume Poisson sampling, and for "
            "fixed-size shuffled batches their epsilon is not a guarantee (it can underestimate the real one); "
            "keep poisson_sampling=True (batch sizes then vary around batch_size)"
        )
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}; 'auto' picks the fastest "
            "valid one. 'ew' (ExpandedWeights) and 'ghost_fsdp' need Opacus' module wrapper or FSDP, which this "
            "callback does not use (and ExpandedWeights cannot run LlamaRMSNorm's weight multiply)"
        )
    for name, value in (
        ("secure_mode", secure_mode),
        ("fix", fix),
        ("allow_nonprivate_start", allow_nonprivate_start),
        ("reproducible_noise", reproducible_noise),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool (True or False), got {value!r} of type {type(value).__name__}")
    if secure_mode and reproducible_noise:
        raise ValueError(
            "secure_mode=True and reproducible_noise=True contradict each other: secure_mode draws the noise and the "
            "sampling from a cryptographically secure generator that cannot be seeded; pass one of them"
        )
