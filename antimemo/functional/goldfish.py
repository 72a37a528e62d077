"""Goldfish token dropout mask (Hans et al., 2024), as a pure tensor function.

The goldfish loss drops (excludes from the loss) a pseudo-random ``1/k`` subset of training
targets. Whether the target at position ``i`` is dropped is decided by a hash of the ``h``
tokens before it, so a passage that occurs many times in the corpus loses the *same* targets in
every copy and the model never sees them supervised: it cannot reproduce the passage verbatim.

Hash definition (all arithmetic modulo ``2**64``, ``>>`` a logical shift)::

    GAMMA = 0x9E3779B97F4A7C15

    def mix64(z):                       # splitmix64 finalizer (Steele, Lea, Flood 2014)
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    s = mix64(seed + GAMMA)             # == the first output of splitmix64 seeded with `seed`
    K[d] = mix64(d * GAMMA) | 1         # odd key of offset d = 1..h (splitmix64(0) output d)
    m[j] = mix64(input_ids[j] + s)      # each token mixed with the seed, once per position
    acc_i = sum(K[d] * m[i - d] for d in 1..h if i - d >= 0 and attention_mask[i - d])
    hash_i = mix64(acc_i) & (2**63 - 1) # non-negative 63-bit value
    drop_i = (window non-empty) and attention_mask[i] and input_ids[i] not exempt
             and hash_i % k == 0

The offset keys make the hash ordered (a token moved to another offset is multiplied by another
key) and, being odd, invertible: changing one window token always changes ``acc_i``. It is
computed with int64 tensor arithmetic only (wrap-around ``+``/``*``, ``^``, ``&`` and an
arithmetic ``>>`` masked into a logical one; the sum is order-free modulo ``2**64``), with a
fixed number of tensor operations whatever ``h`` (one ``[B, T, h]`` window product built with
``unfold``), so CPU and CUDA give the same bits, in every process and run.

This module never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from antimemo._checks import check_seed, is_int

__all__ = ["goldfish_mask"]

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def _as_int64(value: int) -> int:
    """Return the two's-complement int64 value with the same low 64 bits as ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


# splitmix64 constants, written as int64 (two's complement) so torch accepts them as scalars.
_GAMMA = _as_int64(0x9E3779B97F4A7C15)
_MUL1 = _as_int64(0xBF58476D1CE4E5B9)
_MUL2 = _as_int64(0x94D049BB133111EB)


def _lsr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of an int64 tensor (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """splitmix64 finalizer on int64 tensors (wrap-around arithmetic); returns a new tensor."""
    return _mix64_(z.clone())


def _mix64_(z: Tensor) -> Tensor:
    """In-place :func:`_mix64` (fewer allocations); returns ``z``."""
    for shift, mul in ((30, _MUL1), (27, _MUL2), (31, None)):
        z ^= _lsr(z, shift)
        if mul is not None:
            z *= mul
    return z


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_k(k: object) -> int:
    if not is_int(k) or int(k) < 2:  # type: ignore[call-overload]
        raise ValueError(
            f"k must be an integer >= 2, got {k!r}; k=4 drops about 1 in 4 targets "
            "(k=50 is the pretraining preset)"
        )
    return int(k)  # type: ignore[call-overload]


def _check_h(h: object) -> int:
    if not is_int(h) or int(h) < 1:  # type: ignore[call-overload]
        raise ValueError(
            f"h must be an integer >= 1, got {h!r}; h is the number of preceding tokens hashed: "
            "use h=13 (the paper's runs) or h=50 (the pretraining preset)"
        )
    return int(h)  # type: ignore[call-overload]


def _check_exempt(exempt_token_ids: object) -> tuple[int, ...]:
    if isinstance(exempt_token_ids, Tensor):
        if not _is_integer_dtype(exempt_token_ids.dtype):
            raise TypeError(
                f"exempt_token_ids must hold integer token ids, got a tensor of dtype "
                f"{exempt_token_ids.dtype}; pass e.g. exempt_token_ids=(tokenizer.eos_token_id,)"
            )
        return tuple(int(v) for v in exempt_token_ids.reshape(-1).tolist())
    if is_int(exempt_token_ids) or isinstance(exempt_token_ids, (str, bytes)) or not isinstance(
        exempt_token_ids, Iterable
    ):
        raise TypeError(
            f"exempt_token_ids must be an iterable of integer token ids, got {exempt_token_ids!r}; "
            "pass e.g. exempt_token_ids=(0, 2) or () for none"
        )
    ids = tuple(exempt_token_ids)
    bad = [v for v in ids if not is_int(v)]
    if bad:
        raise TypeError(
            f"exempt_token_ids must contain only integer token ids, got non-integer entries "
            f"{bad!r}; pass e.g. exempt_token_ids=(0, 2)"
        )
    return tuple(int(v) for v in ids)


def _check_input_ids(input_ids: object) -> Tensor:
    if not isinstance(input_ids, Tensor):
        raise TypeError(
            f"input_ids must be a torch.Tensor of token ids with shape [T] or [B, T], "
            f"got {type(input_ids).__name__}; wrap it with torch.as_tensor(...)"
        )
    dtype = input_ids.dtype
    if not _is_integer_dtype(dtype):
        raise TypeError(
            f"input_ids must have an integer dtype (token ids), got {dtype}; "
            "convert with input_ids.long()"
        )
    if input_ids.dim() not in (1, 2):
        raise ValueError(
            f"input_ids must be 1-D [T] or 2-D [B, T], got shape {tuple(input_ids.shape)}; "
            "reshape to [batch, sequence]"
        )
    return input_ids


def _check_non_negative(input_ids: Tensor, attended: Tensor | None) -> None:
    """Token ids are vocabulary indices (``>= 0``); padding positions (mask 0) may hold anything."""
    if input_ids.numel() == 0 or int(input_ids.min()) >= 0:  # one min() per call
        return
    negative = input_ids < 0
    if attended is not None:
        negative &= attended
    if not bool(negative.any()):
        return
    where = tuple(int(v) for v in negative.nonzero()[0])
    value = int(input_ids[where])
    hint = (
        "-100 is the ignore_index of labels: it looks like labels were passed as input_ids; pass the token ids "
        "the model reads (pad with the tokenizer's pad_token_id and attention_mask=0)"
        if value == -100
        else "token ids index the vocabulary; pass the tokenizer's input_ids (padding may hold any value where "
        "attention_mask is 0)"
    )
    raise ValueError(f"input_ids must hold token ids >= 0, got {value} at position {list(where)}; {hint}")


def _check_attention_mask(attention_mask: object, input_ids: Tensor) -> Tensor:
    if not isinstance(attention_mask, Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor (1 = real token, 0 = padding) or None, "
            f"got {type(attention_mask).__name__}"
        )
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the same shape as input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(attention_mask.shape)}; pass the 2-D [B, T] padding mask (1 = token, 0 = pad)"
        )
    if attention_mask.device != input_ids.device:
        raise ValueError(
            f"attention_mask is on {attention_mask.device} but input_ids is on {input_ids.device}; "
            "move both to the same device"
        )
    return attention_mask != 0


def _py_mix64(z: int) -> int:
    """splitmix64 finalizer on a Python int (unsigned 64-bit)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_KEYS_CACHE: dict[tuple[int, str], Tensor] = {}


def _offset_keys(h: int, device: torch.device) -> Tensor:
    """int64 ``[h]``: element ``e`` is ``K[h - e] = mix64((h - e) * GAMMA) | 1``, the odd key of
    the offset ``d = h - e`` (window element ``e`` holds the token ``d`` positions back)."""
    cache_key = (h, str(device))
    keys = _KEYS_CACHE.get(cache_key)
    if keys is None:
        values = [_as_int64(_py_mix64(d * (_GAMMA & _MASK64)) | 1) for d in range(h, 0, -1)]
        keys = torch.tensor(values, dtype=torch.int64, device=device)
        if len(_KEYS_CACHE) >= 64:
            _KEYS_CACHE.clear()
        _KEYS_CACHE[cache_key] = keys
    return keys


def _goldfish_hash(
    input_ids: Tensor, h: int, seed: int, attended: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Hash of the (attended) tokens in positions ``i-h .. i-1`` for every position ``i``.

    Args:
        input_ids: int64 tensor ``[B, T]``.
        h: window width (>= 1).
        seed: integer seed (reduced modulo ``2**64``).
        attended: bool ``[B, T]`` (True = real token) or None (all real).

    Returns:
        ``(hash63, has_context)``: int64 ``[B, T]`` non-negative 63-bit hashes and a bool
        ``[B, T]`` that is True where at least one attended token is in the window.
    """
    b, t = input_ids.shape
    device = input_ids.device
    s = _py_mix64(_as_int64(seed) + _GAMMA)
    # m[j] = mix64(input_ids[j] + s): one mix per position, shared by the h windows holding it.
    m = _mix64_(input_ids + _as_int64(s))
    if attended is not None:
        m.masked_fill_(~attended, 0)  # padding contributes nothing, like positions before 0
    # Left-pad with h zeros: window i = padded[i : i + h] holds the tokens at i-h .. i-1
    # (oldest first), zeros where i - d < 0. The last window (the one after position T-1) is cut.
    padded = torch.nn.functional.pad(m, (h, 0))
    windows = padded.unfold(1, h, 1)[:, :t]  # [B, T, h] view, no copy
    acc = (windows * _offset_keys(h, device)).sum(-1)  # the only [B, T, h] temporary
    _mix64_(acc)
    acc &= _MASK63
    positions = torch.arange(t, device=device)
    if attended is None:
        has_context = (positions >= 1).expand(b, t)
    else:
        # before[:, i] = number of attended tokens in positions 0 .. i-1.
        before = torch.nn.functional.pad(attended.to(torch.int64).cumsum(1), (1, 0))
        start = (positions - h).clamp_min(0)
        has_context = (before[:, :t] - before[:, start]) > 0
    return acc, has_context


def goldfish_mask(
    input_ids: Tensor,
    k: int = 4,
    h: int = 13,
    seed: int = 0,
    exempt_token_ids: Iterable[int] | Tensor = (),
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Which training targets the goldfish loss drops (True = drop).

    Uses the Hugging Face label convention: ``labels`` are aligned with ``input_ids`` and the
    model shifts them, so ``mask[..., i]`` refers to the target token ``input_ids[..., i]``
    predicted from ``input_ids[..., :i]``. The target at position ``i`` is dropped iff an
    ordered 64-bit hash (splitmix64-mixed tokens weighted by odd per-offset keys, summed and
    finalized, seeded by ``seed``; see the module docstring and ``docs/goldfish.md``) of the
    tokens at positions ``i-h .. i-1`` is ``0 mod k``, so about ``1/k`` of the targets are
    dropped, and the same ``h``-token context always drops the same next token, wherever and
    however often it occurs.

    Rules:

    * Short context: positions with fewer than ``h`` preceding tokens hash the ones that exist
      (``0 .. i-1``). Position 0 has none and is never dropped (a causal LM never uses
      ``labels[..., 0]`` as a target anyway).
    * Padding: positions with ``attention_mask == 0`` are left out of every window and are
      never dropped, so the mask on the real tokens is the same with left padding, right
      padding or none. A position whose window holds only padding is treated like position 0.
      Interior zeros shrink the window (it is not extended further back).
    * Exempt ids: a position whose *target* token ``input_ids[..., i]`` is in
      ``exempt_token_ids`` is never dropped (the ids still enter other positions' windows).
    * Rows are hashed independently: the mask of a row does not depend on the batch it is in.
    * For a fixed ``(h, seed)``, the mask for ``k`` is a subset of the mask for any divisor of
      ``k`` (e.g. ``k=4`` drops a subset of what ``k=2`` drops).

    Args:
        input_ids: integer token ids ``>= 0``, shape ``[T]`` or ``[B, T]``, on any device
            (positions with ``attention_mask == 0`` may hold any value).
        k: drop about one target in ``k``; an integer ``>= 2``.
        h: number of preceding tokens hashed; an integer ``>= 1``.
        seed: integer seed of the hash (any integer; reduced modulo ``2**64``).
        exempt_token_ids: token ids whose targets are never dropped (e.g. EOS, special tokens).
        attention_mask: optional tensor of the same shape as ``input_ids``, nonzero = real
            token, 0 = padding.

    Returns:
        A bool tensor of the same shape and device as ``input_ids``, True where the target is
        dropped.

    Raises:
        ValueError: ``k < 2``, ``h < 1``, a non-integer ``k``/``h``, a wrong rank of
            ``input_ids``, a negative token id at an attended position (``-100`` means labels
            were passed as ``input_ids``), or an ``attention_mask`` of another shape or device.
        TypeError: ``input_ids`` not an integer tensor, a non-integer ``seed`` or exempt id.

    Example:
        >>> import torch
        >>> from antimemo.functional.goldfish import goldfish_mask
        >>> ids = torch.arange(1000).unsqueeze(0)
        >>> mask = goldfish_mask(ids, k=4, h=13)
        >>> mask.shape, mask.dtype, bool(mask[0, 0])
        (torch.Size([1, 1000]), torch.bool, False)
        >>> 0.2 < mask.float().mean().item() < 0.3
        True
    """
    k = _check_k(k)
    h = _check_h(h)
    seed = check_seed(seed)
    exempt = _check_exempt(exempt_token_ids)
    input_ids = _check_input_ids(input_ids)
    attended = None if attention_mask is None else _check_attention_mask(attention_mask, input_ids)
    _check_non_negative(input_ids, attended)

    squeeze = input_ids.dim() == 1
    ids = input_ids.to(torch.int64)
    if squeeze:
        ids = ids.unsqueeze(0)
        attended = None if attended is None else attended.unsqueeze(0)

    hash63, has_context = _goldfish_hash(ids, h, seed, attended)
    drop = has_context & (hash63 % k == 0)
    if attended is not None:
        drop &= attended
    if exempt:
        exempt_t = torch.tensor(
            [_as_int64(v) for v in exempt], dtype=torch.int64, device=ids.device
        )
        drop &= ~torch.isin(ids, exempt_t)
    return drop.squeeze(0) if squeeze else drop
