"""Loss functions of the LM regularizers against memorization, as pure tensor functions.

Four regularizers, each with one strength knob (0 or 1 turns it off, see each function):

* **Sequence loss floor** (per-sequence "flooding", Ishida et al., ICML 2020):
  :func:`flood`, :func:`sequence_flooding_loss`.
* **Loss truncation** (Kang & Hashimoto, ACL 2020; TinyMem's ``dropper.py``):
  :func:`truncation_threshold`, :func:`loss_truncation_loss`.
* **Spectral norm penalty** (Yoshida & Miyato 2017; TinyMem's ``spectral_reg.py``):
  :func:`init_power_iteration_vectors`, :func:`power_iteration`, :func:`spectral_norm_penalty`.
* **Example-tied dropout** (Maini et al., ICML 2023; TinyMem's ``dropout.py``):
  :func:`example_tied_dropout_mask`, :func:`example_tied_dropout`.

The two loss-rewriting regularizers start from per-sequence losses, computed from a causal LM's
logits and (unshifted, Hugging Face convention) labels by :func:`per_sequence_lm_loss`. They all
reduce to the batch loss the same way, a *target-weighted* mean::

    loss = sum_i n_i * g_i(L_i) / D

where ``L_i`` is the mean cross-entropy of sequence ``i`` over its ``n_i`` supervised targets,
``g_i`` is what the regularizer does to it, and ``D = sum_i n_i`` (or ``num_items`` when given,
as Hugging Face's ``num_items_in_batch``). With ``g_i(L) = L`` this is exactly the plain token
mean that ``LlamaForCausalLM(labels=...)`` returns, so a sequence the regularizer leaves alone
keeps exactly the gradient it has in plain training.

This module never imports Lightning. The Lightning callbacks in :mod:`antimemo.callbacks` call
these functions; ``docs/regularizers.md`` has the definitions, defaults and references.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from antimemo._checks import check_seed, is_int, is_number
from antimemo.functional.goldfish import _GAMMA, _as_int64, _is_integer_dtype, _lsr, _mix64

__all__ = [
    "example_tied_dropout",
    "example_tied_dropout_mask",
    "flood",
    "init_power_iteration_vectors",
    "loss_truncation_loss",
    "per_sequence_lm_loss",
    "power_iteration",
    "sequence_flooding_loss",
    "shifted_sequence_losses",
    "spectral_norm_penalty",
    "truncation_threshold",
]


# ---------------------------------------------------------------------------------------------
# Argument checks (shared with the callbacks, so that both give the same messages)
# ---------------------------------------------------------------------------------------------


def _check_floor(floor: object) -> float:
    if not is_number(floor) or not math.isfinite(float(floor)) or float(floor) < 0:  # type: ignore[arg-type]
        raise ValueError(
            f"floor must be a finite number >= 0 (nats per target), got {floor!r}; floor=0 disables the "
            "loss floor, e.g. floor=0.5 keeps every training sequence's mean loss near or above 0.5"
        )
    return float(floor)  # type: ignore[arg-type]


def _check_c(c: object) -> float:
    if not is_number(c) or not 0 <= float(c) < 1:  # type: ignore[arg-type]
        raise ValueError(
            f"c must be a number in [0, 1), got {c!r}; c is the fraction of highest per-sequence losses "
            "dropped: c=0 disables loss truncation, c=0.4 is TinyMem's default"
        )
    return float(c)  # type: ignore[arg-type]


def _check_lam(lam: object) -> float:
    if not is_number(lam) or not math.isfinite(float(lam)) or float(lam) < 0:  # type: ignore[arg-type]
        raise ValueError(
            f"lam must be a finite number >= 0, got {lam!r}; lam=0 disables the spectral norm penalty, "
            "lam=0.01 is TinyMem's default"
        )
    return float(lam)  # type: ignore[arg-type]


def _check_n_power_iterations(n: object) -> int:
    if not is_int(n) or int(n) < 1:
        raise ValueError(
            f"n_power_iterations must be an integer >= 1, got {n!r}; 1 (one step per training step, "
            "as TinyMem) is enough because the vectors are carried over between steps"
        )
    return int(n)


def _check_p_fixed(p_fixed: object) -> float:
    if not is_number(p_fixed) or not 0 < float(p_fixed) <= 1:  # type: ignore[arg-type]
        raise ValueError(
            f"p_fixed must be a number in (0, 1], got {p_fixed!r}; it is the fraction of shared "
            "(generalization) neurons: p_fixed=1 disables example-tied dropout, p_fixed=0.2 is TinyMem's default"
        )
    return float(p_fixed)  # type: ignore[arg-type]


def _check_p_mem(p_mem: object) -> float:
    if not is_number(p_mem) or not 0 <= float(p_mem) <= 1:  # type: ignore[arg-type]
        raise ValueError(
            f"p_mem must be a number in [0, 1], got {p_mem!r}; it is the probability that a memorization "
            "neuron is tied to a given example: p_mem=0.1 is TinyMem's default"
        )
    return float(p_mem)  # type: ignore[arg-type]


def _check_losses(losses: object, num_targets: object) -> tuple[Tensor, Tensor]:
    if not isinstance(losses, Tensor) or losses.dim() != 1 or not losses.dtype.is_floating_point:
        raise TypeError(
            "losses must be a 1-D floating-point tensor of per-sequence losses, got "
            + (f"a {losses.dtype} tensor of shape {tuple(losses.shape)}" if isinstance(losses, Tensor)
               else type(losses).__name__)
            + "; compute it with per_sequence_lm_loss(logits, labels)"
        )
    if not isinstance(num_targets, Tensor) or num_targets.shape != losses.shape:
        raise ValueError(
            f"num_targets must be a tensor with the shape of losses {tuple(losses.shape)}, got "
            + (f"shape {tuple(num_targets.shape)}" if isinstance(num_targets, Tensor) else type(num_targets).__name__)
            + "; per_sequence_lm_loss returns both"
        )
    return losses, num_targets


def _denominator(num_targets: Tensor, num_items: Tensor | int | None, like: Tensor) -> Tensor:
    if num_items is None:
        return num_targets.sum().to(like.dtype)
    if isinstance(num_items, Tensor):
        return num_items.to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(num_items), device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------------------------------------
# Per-sequence losses of a causal LM
# ---------------------------------------------------------------------------------------------


def per_sequence_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Mean next-token cross-entropy of each sequence, as Hugging Face causal LMs compute it.

    ``labels`` are aligned with the inputs (not shifted): ``labels[b, t]`` is the target
    predicted from ``logits[b, t - 1]``, and positions at ``ignore_index`` are not targets. The
    logits are upcast to float32 first, as ``transformers``' ``ForCausalLMLoss`` does, so
    ``(losses * num_targets).sum() / num_targets.sum()`` is the loss ``model(..., labels=labels)``
    returns (up to float summation order).

    Args:
        logits: ``[B, T, V]`` floating-point logits.
        labels: ``[B, T]`` integer labels.
        ignore_index: label value that is not a target.

    Returns:
        ``(losses, num_targets)``: float32 ``[B]`` mean loss per sequence (0 for a sequence with
        no target) and int64 ``[B]`` number of targets per sequence.

    Example:
        >>> logits = torch.zeros(1, 3, 4)          # uniform over 4 tokens: loss ln 4 per target
        >>> losses, n = per_sequence_lm_loss(logits, torch.tensor([[1, 2, -100]]))
        >>> round(float(losses[0]), 4), int(n[0])  # one target (position 1); position 2 is ignored
        (1.3863, 1)
    """
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.dtype.is_floating_point:
        raise TypeError(
            "logits must be a floating-point tensor [B, T, V], got "
            + (f"a {logits.dtype} tensor of shape {tuple(logits.shape)}" if isinstance(logits, Tensor)
               else type(logits).__name__)
        )
    if not isinstance(labels, Tensor) or not _is_integer_dtype(labels.dtype):
        raise TypeError(
            "labels must be an integer tensor [B, T] aligned with the inputs (Hugging Face convention), got "
            + (f"dtype {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__)
        )
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but logits has {tuple(logits.shape)}; labels must be "
            "[B, T] with the logits' first two dimensions (unshifted labels, the Hugging Face convention)"
        )
    targets = labels[:, 1:].to(device=logits.device, dtype=torch.long)
    return shifted_sequence_losses(logits[:, :-1], targets, ignore_index)


def shifted_sequence_losses(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-sequence mean cross-entropy of ``logits[b, t]`` against already shifted ``targets[b, t]``.

    The float32 core of :func:`per_sequence_lm_loss` (which shifts Hugging Face labels first) and
    of :func:`antimemo.dp.per_sequence_causal_lm_loss` (which also takes Hugging Face's
    ``shift_labels``). No argument checks: callers validate.

    Returns:
        ``(losses, num_targets)``: float32 ``[B]`` (0 for a sequence without targets) and int64 ``[B]``.

    Example:
        >>> losses, n = shifted_sequence_losses(torch.zeros(1, 2, 4), torch.tensor([[1, -100]]))
        >>> round(float(losses[0]), 4), int(n[0])
        (1.3863, 1)
    """
    b, t, v = logits.shape
    ce = F.cross_entropy(
        logits.float().reshape(-1, v), targets.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(b, t)
    num_targets = (targets != ignore_index).sum(dim=1)
    return ce.sum(dim=1) / num_targets.clamp_min(1).to(ce.dtype), num_targets


# ---------------------------------------------------------------------------------------------
# Sequence loss floor (flooding per sequence)
# ---------------------------------------------------------------------------------------------


def flood(losses: Tensor, floor: float) -> Tensor:
    """Flooding (Ishida et al., 2020), elementwise: ``|L - b| + b``.

    Equal to ``L`` when ``L >= b``; below the floor it is ``2b - L``, so gradient descent on it
    *raises* ``L`` back towards ``b``.

    Args:
        losses: any floating-point tensor of losses.
        floor: the floor ``b >= 0``.

    Returns:
        A tensor shaped like ``losses``.

    Example:
        >>> flood(torch.tensor([0.2, 0.5, 1.0]), 0.5).tolist()  # |0.2-0.5|+0.5 = 0.8
        [0.800000011920929, 0.5, 1.0]
    """
    b = _check_floor(floor)
    return (losses - b).abs() + b


def sequence_flooding_loss(
    losses: Tensor, num_targets: Tensor, floor: float, num_items: Tensor | int | None = None
) -> Tensor:
    """Batch loss with a floor on every sequence's loss (per-sequence flooding).

    ``loss = sum_i n_i * (|L_i - b| + b) / D`` with ``L_i = losses[i]``, ``n_i = num_targets[i]``
    and ``D = sum_i n_i`` (or ``num_items``). A sequence whose loss is below the floor ``b``
    is pushed back up to it, so no training sequence is driven to the near-zero loss that
    verbatim recall needs; sequences above the floor are trained exactly as in plain training.
    ``floor=0`` gives the plain target-mean loss.

    Args:
        losses: ``[B]`` per-sequence mean losses (:func:`per_sequence_lm_loss`).
        num_targets: ``[B]`` number of targets of each sequence.
        floor: the floor ``b >= 0`` in nats per target.
        num_items: denominator ``D`` to use instead of ``num_targets.sum()`` (Hugging Face's
            ``num_items_in_batch``, for gradient accumulation).

    Returns:
        A 0-d tensor.

    Example:
        >>> losses, n = torch.tensor([0.2, 2.0]), torch.tensor([3, 1])
        >>> float(sequence_flooding_loss(losses, n, floor=0.5))  # (3*0.8 + 1*2.0) / 4
        1.100000023841858
    """
    losses, num_targets = _check_losses(losses, num_targets)
    flooded = flood(losses, floor)
    return (flooded * num_targets.to(flooded.dtype)).sum() / _denominator(num_targets, num_items, flooded)


# ---------------------------------------------------------------------------------------------
# Loss truncation
# ---------------------------------------------------------------------------------------------


def truncation_threshold(reference: Tensor, c: float) -> Tensor:
    """Loss above which sequences are dropped: the ``(1 - c)``-quantile of ``reference``.

    The quantile uses linear interpolation (``torch.quantile``'s default, NumPy's
    ``percentile`` default as in TinyMem). ``c = 0`` returns ``+inf`` (nothing dropped).

    Args:
        reference: non-empty 1-D tensor of per-sequence losses (a rolling buffer, or the batch).
        c: fraction of the highest losses to drop, in ``[0, 1)``.

    Returns:
        A 0-d float32 tensor on ``reference``'s device.

    Example:
        >>> float(truncation_threshold(torch.tensor([1., 2., 3., 4., 5.]), c=0.4))  # 3 + 0.4*(4-3)
        3.4000000953674316
    """
    c = _check_c(c)
    if not isinstance(reference, Tensor) or reference.dim() != 1 or reference.numel() == 0:
        raise ValueError(
            "reference must be a non-empty 1-D tensor of per-sequence losses, got "
            + (f"shape {tuple(reference.shape)}" if isinstance(reference, Tensor) else type(reference).__name__)
        )
    if c == 0:
        return torch.tensor(math.inf, device=reference.device)
    return torch.quantile(reference.detach().float(), 1.0 - c)


def loss_truncation_loss(
    losses: Tensor,
    num_targets: Tensor,
    c: float,
    reference: Tensor | None = None,
    num_items: Tensor | int | None = None,
) -> Tensor:
    """Batch loss without the sequences whose loss is in the top ``c`` fraction (loss truncation).

    ``keep_i = L_i <= q`` with ``q = truncation_threshold(reference, c)`` (the batch's own
    losses when ``reference`` is None), and ``loss = sum_i keep_i * n_i * L_i / D`` with
    ``D = sum_i n_i`` over *all* sequences (or ``num_items``): a dropped sequence contributes
    nothing, and the others keep exactly their plain-training gradient. This is the reduction of
    TinyMem (``(loss * mask).mean()``; equal to it when all sequences have the same number of
    targets). ``c = 0`` gives the plain target-mean loss.

    Args:
        losses: ``[B]`` per-sequence mean losses (:func:`per_sequence_lm_loss`).
        num_targets: ``[B]`` number of targets of each sequence.
        c: fraction of the highest losses to drop, in ``[0, 1)``.
        reference: losses whose quantile sets the threshold, e.g. a rolling buffer of recent
            per-sequence losses (as :class:`antimemo.callbacks.LossTruncation` keeps);
            ``None`` uses ``losses`` itself.
        num_items: denominator ``D`` to use instead of ``num_targets.sum()``.

    Returns:
        A 0-d tensor.

    Example:
        >>> losses, n = torch.tensor([1., 2., 3., 4., 5.]), torch.tensor([2, 2, 2, 2, 2])
        >>> float(loss_truncation_loss(losses, n, c=0.4))  # keep <= 3.4: (2*1+2*2+2*3) / 10
        1.2000000476837158
    """
    losses, num_targets = _check_losses(losses, num_targets)
    threshold = truncation_threshold(losses if reference is None else reference, c)
    keep = losses.detach() <= threshold.to(losses.device)
    weights = num_targets.to(losses.dtype) * keep.to(losses.dtype)
    return (losses * weights).sum() / _denominator(num_targets, num_items, losses)


# ---------------------------------------------------------------------------------------------
# Spectral norm penalty
# ---------------------------------------------------------------------------------------------


def _check_matrix(weight: object, index: int) -> Tensor:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise TypeError(
            f"weights[{index}] must be a 2-D floating-point tensor (a Linear weight [out, in]), got "
            + (f"a {weight.dtype} tensor of shape {tuple(weight.shape)}" if isinstance(weight, Tensor)
               else type(weight).__name__)
        )
    return weight


def init_power_iteration_vectors(weights: Sequence[Tensor], seed: int = 0) -> list[Tensor]:
    """Seeded random unit vectors to start the power iteration of each matrix.

    ``u_k = g / ||g||`` with ``g ~ N(0, I_out)`` drawn, for ``k = 0, 1, ...`` in order, from one
    CPU ``torch.Generator`` seeded with ``seed`` (the global RNG is untouched), so every process
    that passes the same weight shapes and seed gets the same float32 vectors (DDP ranks agree).

    Args:
        weights: 2-D weight matrices ``[out, in]``.
        seed: seed of the generator.

    Returns:
        One float32 CPU vector ``[out]`` per matrix.

    Example:
        >>> us = init_power_iteration_vectors([torch.ones(3, 2)], seed=0)
        >>> us[0].shape, round(float(us[0].norm()), 6)
        (torch.Size([3]), 1.0)
    """
    seed = check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, w in enumerate(weights):
        w = _check_matrix(w, i)
        out.append(F.normalize(torch.randn(w.shape[0], generator=gen, dtype=torch.float32), dim=0))
    return out


@torch.no_grad()
def power_iteration(weight: Tensor, u: Tensor, n_power_iterations: int = 1, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """``n_power_iterations`` steps of the power iteration for the top singular pair of ``weight``.

    One step is ``v = normalize(W^T u)``, ``u = normalize(W v)`` (the order of
    ``torch.nn.utils.spectral_norm`` and TinyMem), in float32 and without gradient.

    Args:
        weight: ``[out, in]`` matrix.
        u: ``[out]`` current left vector.
        n_power_iterations: number of steps (``>= 1``).
        eps: added to norms to avoid division by zero.

    Returns:
        ``(u, v)``: the new left ``[out]`` and right ``[in]`` unit vectors (float32).

    Example:
        >>> u, v = power_iteration(torch.diag(torch.tensor([3., 1.])), torch.tensor([1., 1.]) / 2 ** 0.5)
        >>> [round(x, 4) for x in u.tolist()], [round(x, 4) for x in v.tolist()]  # [9,1]/sqrt(82), [3,1]/sqrt(10)
        ([0.9939, 0.1104], [0.9487, 0.3162])
    """
    n = _check_n_power_iterations(n_power_iterations)
    w = weight.detach().float()
    u = u.to(device=w.device, dtype=torch.float32)
    if u.shape != (w.shape[0],):
        raise ValueError(f"u must have shape ({w.shape[0]},) for a weight of shape {tuple(w.shape)}, got {tuple(u.shape)}")
    v = u
    for _ in range(n):
        v = F.normalize(torch.mv(w.t(), u), dim=0, eps=eps)
        u = F.normalize(torch.mv(w, v), dim=0, eps=eps)
    return u, v


def spectral_norm_penalty(
    weights: Sequence[Tensor],
    us: Sequence[Tensor],
    lam: float,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
) -> tuple[Tensor, list[Tensor]]:
    """Spectral norm penalty ``lam/2 * sum_k sigma_max(W_k)``, with power-iteration estimates.

    For each matrix, :func:`power_iteration` updates ``(u_k, v_k)`` (no gradient) and
    ``sigma_k = u_k^T W_k v_k`` (differentiable in ``W_k``; its gradient is ``u_k v_k^T``,
    exactly the gradient of ``sigma_max`` once the iteration has converged). Carry the returned
    vectors to the next step, so that one step per training step tracks the top singular pair.

    Args:
        weights: 2-D matrices ``[out, in]`` (e.g. the Linear weights of a model).
        us: current left vectors, one per matrix (:func:`init_power_iteration_vectors`).
        lam: strength ``lambda >= 0`` (TinyMem: 0.01).
        n_power_iterations: power-iteration steps per call.
        eps: added to norms to avoid division by zero.

    Returns:
        ``(penalty, new_us)``: a 0-d float32 tensor and the updated left vectors (detached).

    Example:
        >>> w = torch.diag(torch.tensor([3., 1.])).requires_grad_()
        >>> pen, us = spectral_norm_penalty([w], [torch.tensor([1., 1.]) / 2 ** 0.5], lam=0.01)
        >>> round(float(pen), 6)  # 0.01/2 * sqrt(8.2): one step from u0 = [1,1]/sqrt(2)
        0.014318
    """
    lam = _check_lam(lam)
    weights = list(weights)
    us = list(us)
    if len(us) != len(weights):
        raise ValueError(
            f"us has {len(us)} vectors but weights has {len(weights)} matrices; build them with "
            "init_power_iteration_vectors(weights, seed)"
        )
    sigmas, new_us = [], []
    for i, (w, u) in enumerate(zip(weights, us)):
        w = _check_matrix(w, i)
        u_new, v = power_iteration(w, u, n_power_iterations, eps)
        sigmas.append(torch.dot(u_new, torch.mv(w.float(), v)))
        new_us.append(u_new)
    total = torch.stack(sigmas).sum() if sigmas else torch.zeros(())
    return (lam / 2) * total, new_us


# ---------------------------------------------------------------------------------------------
# Example-tied dropout
# ---------------------------------------------------------------------------------------------


def _num_fixed(num_features: int, p_fixed: float) -> int:
    # floor(p_fixed * n), as TinyMem's int(p_fixed * n), robust to 0.29 * 100 = 28.999999999999996
    return int(math.floor(p_fixed * num_features + 1e-9))


def example_tied_dropout_mask(
    example_ids: Tensor, num_features: int, p_fixed: float = 0.2, p_mem: float = 0.1, seed: int = 0
) -> Tensor:
    """Training mask of example-tied dropout: shared neurons plus neurons tied to each example.

    With ``n = num_features`` and ``n_f = floor(p_fixed * n)``, neurons ``0 .. n_f - 1`` are the
    *generalization* neurons, active for every example. Each other neuron ``j`` (a
    *memorization* neuron) is active for example ``e`` iff ``hash(seed, e, j) >> 11 <
    floor(p_mem * 2**53)``, where, with splitmix64's ``mix64`` and ``GAMMA`` (as in
    :func:`antimemo.functional.goldfish_mask`; arithmetic modulo ``2**64``)::

        hash(seed, e, j) = mix64(mix64(mix64(seed + GAMMA) + GAMMA + e) + GAMMA + j)

    i.e. with probability ``p_mem``, independently per neuron, and always the same neurons for
    the same example id (in any batch, process, device or run).

    Args:
        example_ids: ``[B]`` non-negative integer example ids (the dataset index).
        num_features: number of neurons ``n`` (the last dimension of the masked activation).
        p_fixed: fraction of generalization neurons, in ``(0, 1]``.
        p_mem: probability that a memorization neuron is tied to an example, in ``[0, 1]``.
        seed: integer seed of the hash.

    Returns:
        Bool ``[B, num_features]`` (True = active), on ``example_ids``' device.

    Example:
        >>> m = example_tied_dropout_mask(torch.tensor([0, 1]), 10, p_fixed=0.2, p_mem=0.5)
        >>> m[:, :2].all().item(), m.shape  # the first floor(0.2 * 10) = 2 neurons are shared
        (True, torch.Size([2, 10]))
    """
    p_fixed, p_mem, seed = _check_p_fixed(p_fixed), _check_p_mem(p_mem), check_seed(seed)
    if not is_int(num_features) or num_features < 1:
        raise ValueError(f"num_features must be an integer >= 1, got {num_features!r}")
    ids = _check_example_ids(example_ids)
    n_fixed = _num_fixed(int(num_features), p_fixed)
    if n_fixed < 1:
        raise ValueError(
            f"p_fixed={p_fixed} keeps floor({p_fixed} * {num_features}) = 0 shared neurons of {num_features}; "
            f"the evaluation network would be empty. Raise p_fixed to at least {1 / num_features:.4g}"
        )
    active = torch.zeros(ids.shape[0], int(num_features), dtype=torch.bool, device=ids.device)
    active[:, :n_fixed] = True
    if n_fixed < num_features and p_mem > 0:
        init = _mix64(torch.tensor(_as_int64(seed + _GAMMA), dtype=torch.int64))
        state = _mix64(init.to(ids.device) + _GAMMA + ids)  # [B]
        j = torch.arange(n_fixed, int(num_features), dtype=torch.int64, device=ids.device)
        h = _mix64(state.unsqueeze(1) + _GAMMA + j.unsqueeze(0))  # [B, n - n_fixed]
        threshold = int(math.floor(p_mem * 2.0**53))
        active[:, n_fixed:] = _lsr(h, 11) < threshold  # top 53 bits, a uniform integer in [0, 2**53)
    return active


def _check_example_ids(example_ids: object) -> Tensor:
    if not isinstance(example_ids, Tensor) or example_ids.dim() != 1 or not _is_integer_dtype(example_ids.dtype):
        raise TypeError(
            "example_ids must be a 1-D integer tensor [B] of dataset indices, got "
            + (f"a {example_ids.dtype} tensor of shape {tuple(example_ids.shape)}" if isinstance(example_ids, Tensor)
               else type(example_ids).__name__)
            + "; wrap your dataset with antimemo.callbacks.WithExampleIds"
        )
    if example_ids.numel() and int(example_ids.min()) < 0:
        raise ValueError(f"example_ids must be >= 0 (dataset indices), got min {int(example_ids.min())}")
    return example_ids.to(torch.int64)


def example_tied_dropout(
    hidden: Tensor,
    example_ids: Tensor | None,
    p_fixed: float = 0.2,
    p_mem: float = 0.1,
    seed: int = 0,
    training: bool = True,
) -> Tensor:
    """Apply example-tied dropout to an activation whose last dimension holds the neurons.

    Training: ``hidden * mask`` with ``mask = example_tied_dropout_mask(example_ids, n, ...)``
    broadcast over the middle dimensions (all positions of a sequence share its mask; no
    rescaling, as in Maini et al. and TinyMem). Evaluation (``training=False``): the
    memorization neurons are set to 0 and the generalization neurons scaled by
    ``(p_fixed + p_mem) / p_fixed``; ``example_ids`` is not used. ``p_fixed = 1`` returns
    ``hidden`` unchanged in both modes (plain training).

    Args:
        hidden: ``[B, ..., n]`` activation.
        example_ids: ``[B]`` example ids (required when ``training``).
        p_fixed: fraction of generalization neurons, in ``(0, 1]``.
        p_mem: probability that a memorization neuron is tied to an example, in ``[0, 1]``.
        seed: seed of the mask hash.
        training: training mask (True) or evaluation transform (False).

    Returns:
        A new tensor shaped like ``hidden``.

    Example:
        >>> h = torch.ones(1, 3, 10)
        >>> example_tied_dropout(h, None, p_fixed=0.2, p_mem=0.1, training=False)[0, 0].tolist()[:3]  # 0.3/0.2
        [1.5, 1.5, 0.0]
    """
    p_fixed, p_mem = _check_p_fixed(p_fixed), _check_p_mem(p_mem)
    if not isinstance(hidden, Tensor) or hidden.dim() < 2:
        raise TypeError(
            "hidden must be a tensor [B, ..., n] with the neurons in the last dimension, got "
            + (f"shape {tuple(hidden.shape)}" if isinstance(hidden, Tensor) else type(hidden).__name__)
        )
    if p_fixed == 1.0:
        return hidden
    n = hidden.shape[-1]
    if training:
        if example_ids is None:
            raise ValueError(
                "example_tied_dropout(training=True) needs example_ids [B]; wrap your dataset with "
                "antimemo.callbacks.WithExampleIds, or pass training=False for the evaluation transform"
            )
        if example_ids.shape[:1] != hidden.shape[:1]:
            raise ValueError(
                f"example_ids has {tuple(example_ids.shape)} ids but hidden has batch size {hidden.shape[0]}; "
                "pass one id per example of the batch"
            )
        mask = example_tied_dropout_mask(example_ids.to(hidden.device), n, p_fixed, p_mem, seed)
        mask = mask.view(mask.shape[0], *([1] * (hidden.dim() - 2)), n)
        return hidden * mask.to(hidden.dtype)
    n_fixed = _num_fixed(n, p_fixed)
    if n_fixed < 1:
        raise ValueError(
            f"p_fixed={p_fixed} keeps floor({p_fixed} * {n}) = 0 shared neurons of {n}; raise p_fixed to at "
            f"least {1 / n:.4g}"
        )
    scale = torch.zeros(n, dtype=hidden.dtype, device=hidden.device)
    scale[:n_fixed] = (p_fixed + p_mem) / p_fixed
    return hidden * scale
