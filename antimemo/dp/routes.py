"""Which per-sample-gradient route DP-SGD should take for a model (no Lightning).

:class:`~antimemo.callbacks.dp.DifferentialPrivacy` can use three Opacus routes and one of ours:

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
- ``"bookkeeping"`` (ours, :mod:`antimemo.dp.bookkeeping`): ghost norms and the clipped sum from
  **one** backward pass: each linear layer's input and output gradient are kept, the norms are
  ghost norms and the clipped sum ``(c * G)^T A`` replaces autograd's weight gradient. No
  per-sample gradients, no second backward; on CPU it was the fastest route in every measured
  cell but 30M x 256 tokens, where it matched hooks per row with less memory.

``ExpandedWeights`` (Opacus' ``"ew"``) is not offered: it needs Opacus' module wrapper, and on
the Llama models of the recipes it cannot run at all (``LlamaRMSNorm`` multiplies its weight with
``mul``: "Expanded Weights encountered but cannot handle function mul").

:func:`choose_route` (``grad_sample_mode="auto"``) takes ``bookkeeping`` where it is valid; otherwise
the choice between the Opacus routes is set by the measurements in
docs/benchmarks.md "DP-SGD routes": on CPU, ``ghost`` was slower than ``hooks`` at 0.6M (64 and
256 tokens) and at 7M x 256 tokens, and erratic at 7M x 64 (faster in 3 of 8 same-repeat pairs,
up to 9x a plain step in others); ghost's one robust gain is memory (at 7M x batch 64
the fit's peak rose by 91 MB over plain against 2,503 MB for hooks). So ``auto`` takes ``hooks``
unless hooks' per-sample gradients would not fit in memory, and then ``ghost`` when it is valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BOOKKEEPING_MIN_SHARE",
    "HOOKS_MEMORY_FACTOR",
    "MEMORY_SHARE",
    "ROUTES",
    "RouteChoice",
    "available_memory",
    "choose_route",
    "ghost_blocker",
    "per_sample_gradient_bytes",
]

#: the routes ``grad_sample_mode`` accepts besides ``"auto"``
ROUTES = ("hooks", "functorch", "ghost", "bookkeeping")

#: hooks' extra memory over plain training, as a multiple of its per-sample gradients
#: ``batch x trainable parameters x element size``: 1.6 measured at 7M x batch 16 (1,067 MB over
#: plain for 675 MB of per-sample gradients), rounded up to 2
HOOKS_MEMORY_FACTOR = 2.0

#: ``auto`` takes ghost when hooks' extra memory would pass this share of the available memory
MEMORY_SHARE = 0.5

#: book-keeping is chosen only when at least this share of the trainable parameters sits in
#: ``nn.Linear`` / ``nn.Embedding`` layers (others get per-sample gradients from Opacus' samplers)
BOOKKEEPING_MIN_SHARE = 0.9

#: ghost is chosen only when at least this share of the trainable parameters sits in layers with
#: a ghost norm sampler (others build per-sample gradients anyway, and ghost adds a backward pass)
GHOST_MIN_NORM_SHARE = 0.9


@dataclass(frozen=True)
class RouteChoice:
    """The route ``grad_sample_mode="auto"`` picked and why (one sentence, for the log and report)."""

    route: str
    reason: str


def available_memory(device: torch.device) -> int | None:
    """Bytes available for new tensors on ``device``: CUDA's free memory, or the host's
    ``MemAvailable`` (``/proc/meminfo``) for CPU; ``None`` where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def per_sample_gradient_bytes(module: nn.Module, expected_batch: float) -> int:
    """``expected_batch x`` the bytes of ``module``'s trainable parameters: hooks' per-sample gradients."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return int(expected_batch * total)


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


def choose_route(
    module: nn.Module, ghost_blocker: str | None, expected_batch: float, available: int | None
) -> RouteChoice:
    """Pick the per-sample-gradient route for ``module``: ``bookkeeping`` where it is valid, else
    ``hooks`` unless it would not fit in memory, then ``ghost``.

    Args:
        module: the model (its trainable parameters decide).
        ghost_blocker: why ghost clipping cannot be used for this training, or ``None`` if it can
            (see :func:`ghost_blocker`).
        expected_batch: the expected Poisson batch size on this device.
        available: bytes available on the training device (:func:`available_memory`), or ``None``.

    Returns:
        ``RouteChoice("bookkeeping" | "hooks" | "ghost", reason)``. ``"bookkeeping"`` whenever
        :func:`~antimemo.dp.bookkeeping.bookkeeping_blocker` finds nothing against it and at least
        :data:`BOOKKEEPING_MIN_SHARE` of the trainable parameters sit in ``nn.Linear`` /
        ``nn.Embedding`` layers: it was the fastest route in the measurements (docs/benchmarks.md),
        and its memory lies between ghost's and hooks'. ``"functorch"`` is never picked: it was
        the slowest route wherever it was measured.

    Example:
        >>> lm = nn.Sequential(nn.Embedding(257, 128), nn.Linear(128, 512), nn.Linear(512, 128))
        >>> choose_route(lm, None, 16, 8 * 2**30).route
        'bookkeeping'
        >>> _ = lm.append(nn.PReLU())  # a layer with no book-keeping rule and no Opacus grad sampler
        >>> choose_route(lm, None, 16, 8 * 2**30).route, choose_route(lm, None, 16, 2**20).route
        ('hooks', 'ghost')
        >>> choose_route(lm, "the loss is not the LM's", 16, 2**20).route
        'hooks'
    """
    from antimemo.dp.bookkeeping import bookkeeping_blocker, bookkeeping_share

    bk_blocker = bookkeeping_blocker(module)
    if bk_blocker is None:
        share = bookkeeping_share(module)
        if share >= BOOKKEEPING_MIN_SHARE:
            return RouteChoice(
                "bookkeeping",
                f"book-keeping clips {share:.0%} of the trainable parameters from one backward pass without "
                "per-sample gradients (nn.Linear / nn.Embedding), the fastest route in the measurements",
            )
        bk_blocker = f"only {share:.0%} of the trainable parameters sit in nn.Linear / nn.Embedding layers"
    choice = _memory_route(module, ghost_blocker, expected_batch, available)
    return RouteChoice(choice.route, f"book-keeping is not possible ({bk_blocker}); {choice.reason}")


def _memory_route(module: nn.Module, ghost_blocker: str | None, expected_batch: float, available: int | None) -> RouteChoice:
    """Without book-keeping: ``hooks`` unless its per-sample gradients would not fit, then ``ghost``."""
    need = HOOKS_MEMORY_FACTOR * per_sample_gradient_bytes(module, expected_batch)
    if available is None:
        return RouteChoice("hooks", "the memory available on the device is unknown; hooks is the faster route")
    if need <= MEMORY_SHARE * available:
        return RouteChoice(
            "hooks",
            f"hooks' per-sample gradients (~{need / 2**20:.0f} MB at expected batch {expected_batch:.1f}) fit in "
            f"{MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GB available, and hooks was the faster route "
            "in the measurements",
        )
    if ghost_blocker is not None:
        return RouteChoice(
            "hooks",
            f"hooks' per-sample gradients (~{need / 2**20:.0f} MB) pass {MEMORY_SHARE:.0%} of the "
            f"{available / 2**30:.1f} GB available, but ghost clipping is not possible ({ghost_blocker}); lower "
            "the batch size if memory runs out",
        )
    share = _ghost_norm_share(module)
    if share < GHOST_MIN_NORM_SHARE:
        return RouteChoice(
            "hooks",
            f"hooks' per-sample gradients (~{need / 2**20:.0f} MB) pass {MEMORY_SHARE:.0%} of the available memory, "
            f"but only {share:.0%} of the trainable parameters sit in layers with a ghost norm sampler (< "
            f"{GHOST_MIN_NORM_SHARE:.0%}): ghost would build most per-sample gradients anyway",
        )
    return RouteChoice(
        "ghost",
        f"hooks' per-sample gradients (~{need / 2**20:.0f} MB at expected batch {expected_batch:.1f}) would pass "
        f"{MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GB available; ghost clipping stores per-sample norms only",
    )
