"""Which per-sample-gradient route DP-SGD should take for a model (no Lightning).

Opacus offers three routes that :class:`~antimemo.callbacks.dp.DifferentialPrivacy` can use:

- ``"hooks"``: per-layer grad samplers build the ``[B, *p.shape]`` per-sample gradient of every
  parameter (for ``nn.Linear`` on sequences, ``einsum("n...i,n...j->nij")``: ``T * d_in * d_out``
  multiply-adds per sample), then clip and sum them. Memory ``B x parameters``.
- ``"functorch"``: the same gradients through ``torch.func.vmap`` for every layer: on CPU it was
  the slowest route at every measured size (docs/benchmarks.md "DP-SGD routes").
- ``"ghost"``: ghost clipping: per-sample gradient *norms* only (for ``nn.Linear`` on sequences,
  ``||G_n^T A_n||_F^2 = <G_n G_n^T, A_n A_n^T>``: ``T^2 * (d_in + d_out)`` per sample), then a
  second backward pass with the per-sample loss weighted by its clipping factor. No per-sample
  gradients are stored. Layers without a norm sampler (e.g. ``LlamaRMSNorm``, HF ``Conv1D``)
  build their per-sample gradients and take the norms ("fast gradient clipping").

``ExpandedWeights`` (Opacus' ``"ew"``) is not offered: it needs Opacus' module wrapper, and on
the Llama models of the recipes it cannot run at all (``LlamaRMSNorm`` multiplies its weight with
``mul``: "Expanded Weights encountered but cannot handle function mul").

:func:`choose_route` (``grad_sample_mode="auto"``) takes ``"ghost"`` when it is valid and cheaper
than ``"hooks"`` by the cost model above, measured on this project's models: ghost's norm work
grows with ``T^2`` where hooks' per-sample gradients grow with ``T * d_in * d_out``, and ghost pays
a second backward pass. Otherwise ``"hooks"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = [
    "GHOST_SEQ_FACTOR",
    "ROUTES",
    "RouteChoice",
    "choose_route",
    "ghost_blocker",
    "ghost_crossover",
    "sequence_length",
]

#: the routes ``grad_sample_mode`` accepts besides ``"auto"``
ROUTES = ("hooks", "functorch", "ghost")

#: ghost is chosen when ``seq_len <= GHOST_SEQ_FACTOR * ghost_crossover(model)``. The crossover
#: ``T* = sum(d_in * d_out) / sum(d_in + d_out)`` over the trainable ``nn.Linear`` layers is where
#: ghost's norm work equals hooks' per-sample-gradient work; the factor < 1 pays for ghost's
#: second backward pass (set from the measurements in docs/benchmarks.md "DP-SGD routes").
GHOST_SEQ_FACTOR = 0.5

#: ghost is chosen only when at least this share of the trainable parameters sits in layers with
#: a ghost norm sampler (others build per-sample gradients anyway, and ghost adds a backward pass)
GHOST_MIN_NORM_SHARE = 0.9


@dataclass(frozen=True)
class RouteChoice:
    """The route ``grad_sample_mode="auto"`` picked and why (one sentence, for the log and report)."""

    route: str
    reason: str


def ghost_crossover(module: nn.Module) -> float | None:
    """``sum(d_in * d_out) / sum(d_in + d_out)`` over the trainable ``nn.Linear`` layers of ``module``.

    The sequence length at which ghost clipping's per-sample norm work (``T^2 (d_in + d_out)``)
    equals the hooks route's per-sample gradient work (``T d_in d_out``); ``None`` without any
    trainable ``nn.Linear``.

    Example:
        >>> round(ghost_crossover(nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 512))), 2)
        91.43
    """
    num = den = 0
    for sub in module.modules():
        if type(sub) is nn.Linear and sub.weight.requires_grad:
            num += sub.in_features * sub.out_features
            den += sub.in_features + sub.out_features
    return num / den if den else None


def _ghost_norm_share(module: nn.Module) -> float:
    from opacus.grad_sample import GradSampleHooksFastGradientClipping

    total = normed = 0
    seen: set[int] = set()
    for sub in module.modules():
        for p in sub.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if type(sub) in GradSampleHooksFastGradientClipping.NORM_SAMPLERS:
                normed += p.numel()
    return normed / total if total else 0.0


def sequence_length(item: Any) -> int | None:
    """The sequence length of one dataset item: the last dimension of its ``input_ids`` (or of its
    first tensor with at least one dimension); ``None`` if it has none.

    Example:
        >>> import torch
        >>> sequence_length({"input_ids": torch.zeros(64, dtype=torch.long)})
        64
        >>> sequence_length(3) is None
        True
    """
    if isinstance(item, Tensor):
        return int(item.shape[-1]) if item.dim() > 0 else None
    if isinstance(item, dict):
        if isinstance(item.get("input_ids"), Tensor):
            return sequence_length(item["input_ids"])
        values: Sequence[Any] = list(item.values())
    elif isinstance(item, (list, tuple)):
        values = item
    else:
        return None
    for value in values:
        found = sequence_length(value)
        if found is not None:
            return found
    return None


def ghost_blocker(module: nn.Module, loss_is_lm_loss: bool) -> str | None:
    """Why ghost clipping cannot train ``module`` (``None`` if it can).

    Ghost clipping back-propagates the per-sequence losses of exactly one Hugging Face causal LM
    (``labels=``) and cannot handle a parameter shared between layers.

    Args:
        module: the model.
        loss_is_lm_loss: whether the training loss is known to be that LM's ``labels=`` loss,
            unchanged (the callback knows it for ``antimemo.lm.CausalLMModule``).

    Example:
        >>> ghost_blocker(nn.Linear(2, 2), loss_is_lm_loss=False)
        '0 Hugging Face causal LMs in the module; ghost clipping needs exactly one'
    """
    from antimemo.dp.hf import find_causal_lms
    from antimemo.dp.validate import check_no_tied_ghost

    n_lms = len(find_causal_lms(module))
    if n_lms != 1:
        return f"{n_lms} Hugging Face causal LMs in the module; ghost clipping needs exactly one"
    if not loss_is_lm_loss:
        return "the training loss is not known to be the LM's own per-sequence loss, which ghost clipping back-propagates"
    try:
        check_no_tied_ghost(module)
    except ValueError:
        return "parameters shared between layers (tied embeddings)"
    return None


def choose_route(module: nn.Module, seq_len: int | None, ghost_blocker: str | None) -> RouteChoice:
    """Pick the fastest valid per-sample-gradient route for ``module`` on sequences of ``seq_len``.

    Args:
        module: the model (its trainable layers decide).
        seq_len: tokens per training sequence (``None``: unknown, e.g. not a token model).
        ghost_blocker: why ghost clipping cannot be used for this training, or ``None`` if it can
            (the callback passes e.g. "no Hugging Face causal LM", "tied parameters").

    Returns:
        ``RouteChoice("ghost" | "hooks", reason)``. ``"functorch"`` is never picked: it was slower
        than ``"hooks"`` in every measurement.

    Example:
        >>> lm = nn.Sequential(nn.Embedding(257, 128), nn.Linear(128, 512), nn.Linear(512, 128))
        >>> choose_route(lm, 16, None).route, choose_route(lm, 256, None).route
        ('ghost', 'hooks')
        >>> choose_route(lm, 16, "the loss is not a Hugging Face causal LM's").route
        'hooks'
    """
    if ghost_blocker is not None:
        return RouteChoice("hooks", f"ghost clipping is not possible ({ghost_blocker})")
    if seq_len is None:
        return RouteChoice("hooks", "the sequence length of the training items is unknown")
    crossover = ghost_crossover(module)
    if crossover is None:
        return RouteChoice("hooks", "the model has no trainable nn.Linear layer (ghost clipping saves nothing)")
    share = _ghost_norm_share(module)
    if share < GHOST_MIN_NORM_SHARE:
        return RouteChoice(
            "hooks",
            f"only {share:.0%} of the trainable parameters sit in layers with a ghost norm sampler "
            f"(< {GHOST_MIN_NORM_SHARE:.0%}); the others need per-sample gradients anyway",
        )
    limit = GHOST_SEQ_FACTOR * crossover
    if seq_len <= limit:
        return RouteChoice(
            "ghost",
            f"sequence length {seq_len} <= {limit:.0f} ({GHOST_SEQ_FACTOR:g} x the model's ghost/hooks crossover "
            f"{crossover:.0f}): per-sample norms cost less than per-sample gradients",
        )
    return RouteChoice(
        "hooks",
        f"sequence length {seq_len} > {limit:.0f} ({GHOST_SEQ_FACTOR:g} x the model's ghost/hooks crossover "
        f"{crossover:.0f}): ghost clipping's T^2 norm work and second backward cost more than per-sample gradients",
    )
