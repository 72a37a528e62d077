"""Green-list soft watermark (Kirchenbauer et al. 2023, "A watermark for large language models").

Generation adds ``delta`` to the logits of a pseudo-random "green" fraction ``gamma`` of the
vocabulary, re-drawn at every position from a hash of a secret integer ``key`` and the previous
``context_width`` token ids (:class:`GreenListProcessor`, a ``transformers.LogitsProcessor``).
Detection needs only the key: it counts the green tokens of a text and runs a one-proportion
z-test (:func:`detect_watermark`). Text written without the key has each token green with
probability ``gamma`` whatever it says, so its z-score is about standard normal; watermarked text
has an excess of green tokens. Used as a filter (``antimemo.callbacks.WatermarkFilter``), it keeps
a model's own generated text out of the next model's training data (model collapse, Shumailov et
al. 2024).

Green-list scheme (all arithmetic modulo ``2**64``, ``>>`` a logical shift; ``mix64`` is the
splitmix64 finalizer of Steele, Lea and Flood 2014, the same one as
:func:`antimemo.functional.goldfish_mask`)::

    GAMMA = 0x9E3779B97F4A7C15
    def mix64(z):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    s    = mix64(key + GAMMA)                       # the key, mixed
    K[d] = mix64(d * GAMMA) | 1                     # odd key of offset d = 1..w (w = context_width)
    c_i  = mix64(s + sum(K[d] * mix64(t[i - d] + s) for d in 1..w))   # context hash of position i
    u(c, v) = mix64(c + (v + 1) * GAMMA) >> 32      # 32-bit draw of token id v in context c
    green(i, v) = u(c_i, v) < G,   G = round(gamma * 2**32)

``u(c, 0), u(c, 1), ...`` are the successive outputs (top 32 bits) of a splitmix64 generator
seeded with the context hash ``c``: the generator is seeded from (key, previous ``w`` tokens) and
draws one number per token id. Each token id is green with probability ``G / 2**32 = gamma`` (to
within ``2**-33``) independently of the others, so the green list of one context holds
``Binomial(V, gamma)`` ids (about ``gamma * V``) rather than exactly ``floor(gamma * V)`` as with
the paper's permutation; the detector's null hypothesis (each scored token green with probability
``gamma``) is the same. The greenness of id ``v`` does not depend on the vocabulary size, so the
detector needs no ``vocab_size``. Everything is int64 tensor arithmetic (wrap-around ``+`` and
``*``, ``^``, masked shifts): CPU and CUDA give the same bits, the global RNG is never touched,
and a ``[B, V]`` green mask costs a few elementwise operations.

A position ``i`` has a context when the ``w`` tokens before it exist (and are attended). Positions
without one get no ``delta`` when generating and are not scored when detecting.

This module imports only torch and transformers (never Lightning).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessor

from antimemo._checks import check_int, is_int, is_number

__all__ = ["GreenListProcessor", "detect_watermark", "green_positions"]

_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    """The two's-complement int64 value with the same low 64 bits as ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


_GAMMA_U = 0x9E3779B97F4A7C15
_GAMMA = _as_int64(_GAMMA_U)
_MUL1 = _as_int64(0xBF58476D1CE4E5B9)
_MUL2 = _as_int64(0x94D049BB133111EB)


def _py_mix64(z: int) -> int:
    """splitmix64 finalizer on a Python int (unsigned 64-bit result)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _lsr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of an int64 tensor (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """splitmix64 finalizer on an int64 tensor (wrap-around arithmetic), out of place."""
    z = z ^ _lsr(z, 30)
    z = z * _MUL1
    z = z ^ _lsr(z, 27)
    z = z * _MUL2
    return z ^ _lsr(z, 31)


def _offset_keys(width: int, device: torch.device) -> Tensor:
    """int64 ``[w]``: element ``e`` is ``K[w - e]`` (window element ``e`` is ``w - e`` tokens back)."""
    values = [_as_int64(_py_mix64(d * _GAMMA_U) | 1) for d in range(width, 0, -1)]
    return torch.tensor(values, dtype=torch.int64, device=device)


def _key_mix(key: int) -> int:
    """``s = mix64(key + GAMMA)`` as an int64 value."""
    return _as_int64(_py_mix64((key & _MASK64) + _GAMMA_U))


def _context_hash(windows: Tensor, key: int) -> Tensor:
    """``c`` for every window: int64 ``[..., w]`` token ids (oldest first) -> int64 ``[...]``."""
    s = _key_mix(key)
    m = _mix64(windows.to(torch.int64) + s)
    acc = (m * _offset_keys(windows.shape[-1], windows.device)).sum(-1)  # wraps modulo 2**64
    return _mix64(acc + s)


def _green_threshold(gamma: float) -> int:
    return int(round(gamma * 2**32))


def _is_green(context_hash: Tensor, token_ids: Tensor, gamma: float) -> Tensor:
    """``u(c, v) < G`` elementwise (broadcasting ``context_hash`` against ``token_ids``)."""
    u = _lsr(_mix64(context_hash + (token_ids.to(torch.int64) + 1) * _GAMMA), 32)
    return u < _green_threshold(gamma)


# ------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------


def _check_gamma(gamma: Any) -> float:
    if not is_number(gamma) or not 0.0 < float(gamma) < 1.0:
        raise ValueError(
            f"gamma must be a number in (0, 1) (the green fraction of the vocabulary), got {gamma!r}; "
            "e.g. gamma=0.25 (Kirchenbauer et al.) or gamma=0.5"
        )
    return float(gamma)


def _check_delta(delta: Any) -> float:
    if not is_number(delta) or float(delta) < 0.0:
        raise ValueError(
            f"delta must be a finite number >= 0 (the bias added to green logits), got {delta!r}; "
            "e.g. delta=2.0 (0 adds nothing)"
        )
    return float(delta)


def _check_key(key: Any) -> int:
    if not is_int(key):
        raise TypeError(
            f"key must be an integer (the secret seed of the green lists), got {key!r} "
            f"({type(key).__name__}); e.g. key=15485863, and keep it secret"
        )
    return int(key)


def _check_width(context_width: Any) -> int:
    return check_int(
        "context_width", context_width, 1, "it is the number of previous tokens that seed the green list, e.g. 1"
    )


def _check_ids(name: str, ids: Any) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be an integer tensor [B, T], got {type(ids).__name__}; e.g. torch.tensor(rows)")
    if ids.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [B, T] (one row per sequence), got shape {tuple(ids.shape)}; "
            f"for a single sequence use {name}[None]"
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}; convert with .long()")
    return ids.to(torch.int64)


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------


class GreenListProcessor(LogitsProcessor):
    """Add ``delta`` to the logits of the green tokens of each row's next position.

    The green list of a row is drawn from ``key`` and the row's last ``context_width`` token ids
    (the scheme is in this module's docstring); rows with fewer than ``context_width`` tokens are
    returned unchanged. Use it in ``model.generate(..., logits_processor=LogitsProcessorList([p]))``
    or in your own sampling loop; it is deterministic and uses no random number generator.

    Args:
        gamma: green fraction of the vocabulary, in ``(0, 1)``.
        delta: bias added to green logits, ``>= 0``.
        key: secret integer seeding the green lists (any integer; reduced modulo ``2**64``).
        context_width: previous tokens hashed into the green list, ``>= 1``.
        vocab_size: number of real token ids; logit columns at or beyond it (a model's padded
            embedding rows) never get ``delta``. ``None``: every column is a token.

    Example:
        >>> import torch
        >>> proc = GreenListProcessor(gamma=0.25, delta=2.0, key=42)
        >>> ids = torch.tensor([[5, 7, 9]])
        >>> scores = torch.zeros(1, 257)
        >>> out = proc(ids, scores)
        >>> bool(torch.equal(out, 2.0 * proc.green_mask(ids, 257)))
        True
        >>> round(proc.green_mask(torch.arange(1000)[:, None], 257).float().mean().item(), 2)
        0.25
    """

    def __init__(
        self, gamma: float, delta: float, key: int, context_width: int = 1, vocab_size: int | None = None
    ) -> None:
        self.gamma = _check_gamma(gamma)
        self.delta = _check_delta(delta)
        self.key = _check_key(key)
        self.context_width = _check_width(context_width)
        if vocab_size is not None:
            vocab_size = check_int("vocab_size", vocab_size, 2, "the number of real token ids, or None for all columns")
        self.vocab_size = vocab_size

    def __repr__(self) -> str:
        return (
            f"GreenListProcessor(gamma={self.gamma}, delta={self.delta}, key=<secret>, "
            f"context_width={self.context_width}, vocab_size={self.vocab_size})"
        )

    def green_mask(self, input_ids: Tensor, vocab_size: int | None = None) -> Tensor:
        """Bool ``[B, V]``: the green list of the next position of each row.

        Rows with fewer than ``context_width`` tokens have an all-False mask. ``V`` is
        ``vocab_size``, else the processor's ``vocab_size``.
        """
        ids = _check_ids("input_ids", input_ids)
        v = vocab_size if vocab_size is not None else self.vocab_size
        if v is None:
            raise ValueError("green_mask needs a vocab_size (the processor has none); e.g. green_mask(ids, 257)")
        vocab = torch.arange(v, device=ids.device, dtype=torch.int64)
        w = self.context_width
        if ids.shape[1] < w:
            return torch.zeros((ids.shape[0], v), dtype=torch.bool, device=ids.device)
        context = _context_hash(ids[:, -w:], self.key)  # [B]
        return _is_green(context[:, None], vocab[None, :], self.gamma)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:  # type: ignore[override]
        """Return ``scores`` ``[B, V]`` with ``delta`` added at each row's green ids (a new tensor)."""
        if not isinstance(scores, Tensor) or scores.dim() != 2:
            raise ValueError(
                "scores must be the next-token logits [B, V], got "
                f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}"
            )
        width = scores.shape[1]
        v = width if self.vocab_size is None else self.vocab_size
        if v > width:
            raise ValueError(
                f"vocab_size={v} exceeds the {width} logit columns; pass the model's vocabulary size or None"
            )
        if input_ids.shape[0] != scores.shape[0]:
            raise ValueError(
                f"input_ids has {input_ids.shape[0]} rows but scores has {scores.shape[0]}; they must match"
            )
        green = self.green_mask(input_ids, v).to(scores.device)
        if v < width:
            green = torch.nn.functional.pad(green, (0, width - v))
        return scores + self.delta * green.to(scores.dtype)


# ------------------------------------------------------------------------------------------------
# detection
# ------------------------------------------------------------------------------------------------


def green_positions(
    token_ids: Tensor,
    gamma: float,
    key: int,
    context_width: int = 1,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Which tokens of each sequence are green, and which positions are scored.

    Args:
        token_ids: integer ``[B, T]``.
        gamma, key, context_width: as for :class:`GreenListProcessor`.
        attention_mask: ``[B, T]``, nonzero at real tokens; ``None``: all real.

    Returns:
        ``(green, scored)``, both bool ``[B, T]``. Position ``i`` is scored when it and the
        ``context_width`` positions before it are real tokens; ``green`` is False elsewhere.

    Example:
        >>> ids = torch.tensor([[3, 1, 4, 1, 5]])
        >>> green, scored = green_positions(ids, gamma=0.5, key=7, context_width=2)
        >>> scored.tolist()
        [[False, False, True, True, True]]
    """
    ids = _check_ids("token_ids", token_ids)
    gamma = _check_gamma(gamma)
    key = _check_key(key)
    w = _check_width(context_width)
    b, t = ids.shape
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else _check_mask(attention_mask, ids)
    if t <= w:
        none = torch.zeros((b, t), dtype=torch.bool, device=ids.device)
        return none, none.clone()
    windows = ids.unfold(1, w, 1)[:, : t - w]  # window j = tokens j .. j+w-1, the context of j+w
    context = _context_hash(windows, key)  # [B, T - w]
    green_tail = _is_green(context, ids[:, w:], gamma)
    real_windows = real.unfold(1, w + 1, 1).all(-1)  # [B, T - w]: context and token all real
    pad = torch.zeros((b, w), dtype=torch.bool, device=ids.device)
    scored = torch.cat([pad, real_windows], dim=1)
    green = torch.cat([pad, green_tail & real_windows], dim=1)
    return green, scored


def _check_mask(attention_mask: Any, ids: Tensor) -> Tensor:
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(
            f"attention_mask must be a tensor of the shape of token_ids {tuple(ids.shape)}, got {shape}; "
            "1 at real tokens, 0 at padding"
        )
    return attention_mask.to(ids.device) != 0


def _first_occurrences(ids: Tensor, scored: Tensor, width: int) -> Tensor:
    """Bool ``[B, T]``: scored positions whose ``(context, token)`` n-gram is new in its row."""
    b, t = ids.shape
    grams = ids.unfold(1, width + 1, 1)  # [B, T - w, w + 1]: gram j ends at position j + w
    rows = torch.arange(b, device=ids.device)[:, None].expand(b, t - width)
    keyed = torch.cat([rows[..., None], grams], dim=-1)[scored[:, width:]]  # [S, w + 2]
    positions = torch.arange(t - width, device=ids.device).expand(b, t - width)[scored[:, width:]]
    first = torch.zeros_like(scored)
    if keyed.shape[0] == 0:
        return first
    _, inverse = torch.unique(keyed, dim=0, return_inverse=True)
    earliest = torch.full((int(inverse.max()) + 1,), t, dtype=torch.int64, device=ids.device)
    earliest = earliest.scatter_reduce(0, inverse, positions, reduce="amin")
    keep = earliest[inverse] == positions
    row_idx = torch.arange(b, device=ids.device)[:, None].expand(b, t - width)[scored[:, width:]]
    first[row_idx[keep], positions[keep] + width] = True
    return first


def detect_watermark(
    token_ids: Tensor,
    gamma: float,
    key: int,
    context_width: int = 1,
    ignore_repeated: bool = False,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One-proportion z-test for the green-list watermark, one per sequence.

    With ``T`` scored positions (those with a full context, see :func:`green_positions`) of which
    ``g`` hold a green token::

        z = (g - gamma T) / sqrt(T gamma (1 - gamma)),    p = P(N(0, 1) >= z)

    Under the null hypothesis (text written without the key) each scored token is green with
    probability ``gamma``, so ``z`` is about standard normal; watermarked text has large ``z``
    and tiny ``p``. The normal approximation is poor for very short texts (a few tokens): prefer
    thresholds such as ``z > 4`` there. A sequence with no scored position gets ``z = 0, p = 1``
    (no evidence).

    Args:
        token_ids: integer ``[B, T]`` (the whole text: prompt tokens are scored too).
        gamma, key, context_width: those used to generate.
        ignore_repeated: score each ``(context, token)`` n-gram once per sequence (its first
            occurrence); repeated n-grams (loops, boilerplate) otherwise count many times.
        attention_mask: ``[B, T]``, nonzero at real tokens; ``None``: all real.

    Returns:
        ``(z_scores, p_values)``: float64 ``[B]`` each; ``p`` in ``[0, 1]``, decreasing in ``z``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> text = torch.randint(0, 257, (4, 200), generator=g)  # written without the key
        >>> z, p = detect_watermark(text, gamma=0.25, key=42)
        >>> bool((z.abs() < 4).all()), bool(((p >= 0) & (p <= 1)).all())
        (True, True)
    """
    if not isinstance(ignore_repeated, bool):
        raise TypeError(f"ignore_repeated must be a bool, got {ignore_repeated!r}")
    green, scored = green_positions(token_ids, gamma, key, context_width, attention_mask)
    gamma = float(gamma)
    if ignore_repeated and green.shape[1] > context_width:
        first = _first_occurrences(token_ids.to(torch.int64), scored, int(context_width))
        scored, green = first, green & first
    n = scored.sum(1).to(torch.float64)
    g = green.sum(1).to(torch.float64)
    sd = torch.sqrt(n * gamma * (1.0 - gamma))
    z = torch.where(n > 0, (g - gamma * n) / sd.clamp_min(1e-300), torch.zeros_like(n))
    p = torch.where(n > 0, 0.5 * torch.special.erfc(z / math.sqrt(2.0)), torch.ones_like(n))
    return z, p.clamp(0.0, 1.0)
