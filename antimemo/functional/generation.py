"""Batched greedy decoding with a KV cache, for memorization probes.

Extraction metrics (Carlini et al. 2022; the Pythia memorization score) ask whether greedy
(argmax) decoding from a training prefix reproduces the true suffix. :func:`greedy_generate`
produces exactly ``suffix_length`` tokens per prefix: it never stops at an end-of-sequence token,
never samples and never pads, so every probe is scored on the same number of positions.

This module imports only torch: it works with any causal LM whose forward takes ``input_ids`` and
returns logits, HF-style (``output.logits``; with ``use_cache=True`` also the KV cache as
``output.cache`` or ``output.past_key_values``), or a plain logits tensor when ``use_cache=False``.

The KV cache goes back to the model under the keyword its ``forward`` declares: ``cache`` when it
has that parameter (``transformers`` 5.x renamed ``past_key_values`` to ``cache`` and warns, with a
``FutureWarning``, that the old keyword is removed in 5.40), else ``past_key_values`` (older
``transformers``, hand-written models). The cache object is whatever the model returned from the
prefill call (a ``transformers`` ``Cache`` such as ``DynamicCache`` for every ``transformers`` 5.x
causal LM): it is passed back as is and never converted to or from the legacy tuple form.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch

from antimemo._checks import check_int, is_int, is_number

__all__ = ["greedy_generate", "greedy_generate_with_logits", "sample_generate"]


def _model_device(model: torch.nn.Module, fallback: torch.device) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback


_CACHE_KEYWORDS = ("cache", "past_key_values")
_WRAPPED_MODULES = ("_orig_mod", "module", "_module")  # torch.compile, DDP, opacus GradSampleModule


def _cache_keyword(model: Any, depth: int = 0) -> str:
    """The keyword under which ``model``'s forward takes the KV cache: ``"cache"`` where declared
    (``transformers`` >= 5.x, whose ``past_key_values`` is a deprecated alias), else
    ``"past_key_values"``. A wrapper whose forward declares neither (``forward(*args, **kwargs)``:
    ``torch.compile``, DDP, opacus) is looked through to the module it wraps."""
    forward = getattr(model, "forward", None)
    try:
        parameters = inspect.signature(forward if callable(forward) else model).parameters
    except (TypeError, ValueError):  # builtins and C extensions without a signature
        parameters = {}
    for keyword in _CACHE_KEYWORDS:
        if keyword in parameters:
            return keyword
    if depth < 4:
        for name in _WRAPPED_MODULES:
            inner = getattr(model, name, None)
            if isinstance(inner, torch.nn.Module) and inner is not model:
                return _cache_keyword(inner, depth + 1)
    return "past_key_values"


def _logits_of(output: Any, use_cache: bool, caller: str = "greedy_generate") -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        if use_cache:
            raise TypeError(
                f"{caller}(use_cache=True) needs a model whose forward returns an object "
                "with `.logits` and `.cache` or `.past_key_values` (e.g. a transformers causal "
                "LM), but it "
                "returned a plain tensor; pass use_cache=False to re-run the full sequence at "
                "every step instead"
            )
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        shape = ""
        if isinstance(logits, torch.Tensor):
            shape = f" with logits of shape {tuple(logits.shape)}"
        raise TypeError(
            f"{caller} expects model(input_ids=...) to return logits of shape "
            "[batch, length, vocab] (a tensor or an object with `.logits`), got "
            f"{type(output).__name__}{shape}"
        )
    return logits


def greedy_generate(
    model: torch.nn.Module,
    prefixes: torch.Tensor,
    suffix_length: int,
    batch_size: int = 32,
    *,
    use_cache: bool = True,
) -> torch.Tensor:
    """Greedily decode exactly ``suffix_length`` tokens after each prefix.

    The prefixes are processed in chunks of ``batch_size`` rows. For each chunk the model reads the
    whole prefix once (``model(input_ids=prefix, use_cache=True)``), then feeds back one argmax
    token at a time together with the KV cache (``cache=`` or ``past_key_values=``, see the module
    docstring). No token ends generation
    early (there is no EOS handling), there is no sampling and no padding (all prefixes have the
    same length), so the result is what a naive loop that re-runs the full sequence and appends
    ``argmax(logits[:, -1])`` produces (tested token for token), at a fraction of the cost.

    Why not ``transformers``' ``generate(do_sample=False, min_new_tokens=S, max_new_tokens=S)``:
    to honour ``min_new_tokens`` it masks the EOS logit for all ``S`` steps, so whenever EOS is
    the most likely token it emits the runner-up instead and its output is no longer the greedy
    continuation.

    The function runs under :func:`torch.no_grad` on the model's device and does **not** change the
    model's train/eval mode: call ``model.eval()`` first if it has dropout (the
    :class:`~antimemo.callbacks.MemorizationMonitor` does this for you and restores the mode).

    Args:
        model: A causal LM. With ``use_cache=True`` (default) ``model(input_ids=...,
            cache=..., use_cache=True)`` (or ``past_key_values=...`` when its forward has no
            ``cache`` parameter) must return an object with ``.logits`` ``[B, T, V]`` and the
            cache as ``.cache`` or ``.past_key_values``, as every ``transformers``
            ``*ForCausalLM`` does.
            With ``use_cache=False`` only ``model(input_ids=...)`` is called, and it may return the
            logits tensor itself.
        prefixes: Integer tensor ``[N, P]`` of token ids, ``P >= 1`` (a 1-D tensor is rejected:
            add a batch dimension with ``prefixes[None]``).
        suffix_length: Number of tokens to generate per prefix, ``>= 1``.
        batch_size: Number of prefixes decoded together, ``>= 1``. Only memory and speed depend
            on it (up to floating-point near-ties between the top two logits).
        use_cache: Reuse the KV cache between steps (fast). ``False`` re-runs the whole sequence
            at every step, for models without a KV cache.

    Returns:
        LongTensor ``[N, suffix_length]`` of generated token ids, on the model's device.

    Example:
        >>> import torch, transformers
        >>> from antimemo.functional import greedy_generate
        >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        ...     max_position_embeddings=128)
        >>> model = transformers.LlamaForCausalLM(config).eval()
        >>> prefixes = torch.randint(0, 32, (5, 8))
        >>> greedy_generate(model, prefixes, suffix_length=4, batch_size=2).shape
        torch.Size([5, 4])
    """
    _check_model_and_rows(model, prefixes, "prefixes", "prefix", "greedy decoding")
    check_int("suffix_length", suffix_length, 1, "it is the number of tokens generated per prefix")
    check_int("batch_size", batch_size, 1, "it is the number of prefixes decoded at once, e.g. 32")
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {use_cache!r}")

    device = prefixes.device
    if isinstance(model, torch.nn.Module):
        device = _model_device(model, fallback=prefixes.device)
    # no EOS handling on purpose: transformers' generate(min_new_tokens=S) would instead mask the
    # EOS logit for S steps, which changes the argmax whenever EOS is the most likely token
    num = prefixes.shape[0]
    out = torch.empty((num, suffix_length), dtype=torch.long, device=device)
    with torch.no_grad():
        for start in range(0, num, batch_size):
            chunk = prefixes[start : start + batch_size].to(device=device, dtype=torch.long)
            out[start : start + chunk.shape[0]] = (
                _decode_cached(model, chunk, suffix_length)
                if use_cache
                else _decode_uncached(model, chunk, suffix_length)
            )
    return out


def _check_model_and_rows(model: Any, rows: Any, name: str, row: str, what: str) -> None:
    """The argument checks shared by :func:`greedy_generate` (``name="prefixes"``) and
    :func:`sample_generate` (``name="prompts"``)."""
    if not callable(model):
        raise TypeError(
            f"model must be a callable causal LM (a torch.nn.Module), got {type(model).__name__}"
        )
    if not isinstance(rows, torch.Tensor):
        raise TypeError(
            f"{name} must be a LongTensor of shape [N, P], got {type(rows).__name__}; "
            f"stack equal-length {name} with torch.stack(list_of_1d_tensors)"
        )
    if rows.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [N, P] (one row per {row}), got shape {tuple(rows.shape)}; "
            f"for a single {row} use {name}[None]"
        )
    dtype = rows.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(
            f"{name} must hold integer token ids, got dtype {dtype}; convert with {name}.long()"
        )
    if rows.shape[1] < 1:
        raise ValueError(
            f"{name} must have at least one token per row, got shape {tuple(rows.shape)}; "
            f"{what} needs a non-empty context"
        )


def _decode_cached(
    model: Any,
    chunk: torch.Tensor,
    suffix_length: int,
    pick: Any = None,
    caller: str = "greedy_generate",
) -> torch.Tensor:
    pick = _argmax if pick is None else pick
    output = model(input_ids=chunk, use_cache=True)
    logits = _logits_of(output, use_cache=True, caller=caller)
    past = _past_of(output, caller)
    first = pick(logits[:, -1, :])
    keyword = _cache_keyword(model)
    return _decode_steps(model, past, first, suffix_length, keyword, pick, caller)


def _past_of(output: Any, caller: str = "greedy_generate") -> Any:
    """The KV cache of a model output: ``output.cache`` (``transformers`` 5.x, where reading
    ``output.past_key_values`` logs a deprecation) or, for outputs without that attribute,
    ``output.past_key_values``."""
    if hasattr(output, "cache"):
        past = output.cache
    else:
        past = getattr(output, "past_key_values", None)
    if past is None:
        raise TypeError(
            f"{caller}(use_cache=True) got no `past_key_values` (or `cache`) from the model's "
            f"output ({type(output).__name__}); pass use_cache=False for models without a KV cache"
        )
    return past


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def _decode_steps(
    model: Any,
    past: Any,
    next_token: torch.Tensor,
    suffix_length: int,
    keyword: str,
    pick: Any = _argmax,
    caller: str = "greedy_generate",
) -> torch.Tensor:
    """Tokens ``[B, suffix_length]``: ``next_token`` first, then one cached step each, whose next
    token is ``pick(last_logits)`` (argmax by default). ``keyword`` is the forward's cache
    argument (:func:`_cache_keyword`)."""
    tokens = torch.empty(
        (next_token.shape[0], suffix_length), dtype=torch.long, device=next_token.device
    )
    tokens[:, 0] = next_token
    for step in range(1, suffix_length):
        output = model(input_ids=next_token[:, None], use_cache=True, **{keyword: past})
        past = _past_of(output, caller)
        next_token = pick(_logits_of(output, use_cache=True, caller=caller)[:, -1, :])
        tokens[:, step] = next_token
    return tokens


def greedy_generate_with_logits(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    prefix_length: int,
    batch_size: int = 32,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Greedy continuations of ``sequences[:, :prefix_length]`` *and* the teacher-forced logits
    of the whole ``sequences``, sharing one KV cache (what the memorization monitor needs for
    probes that are also membership-inference members).

    Per chunk of ``batch_size`` rows it runs the prefix once (``use_cache=True``; its last logits
    give the first greedy token), then the true suffix on top of that cache in a single call
    (teacher forcing: the logits of the whole sequence, as one forward over it would give, up
    to floating-point rounding), then crops the cache back to the prefix
    (``cache.crop(-suffix_length)``) and decodes the remaining greedy tokens one by
    one. Compared with :func:`greedy_generate` plus a separate forward over the sequences, the
    prefix is run once instead of twice. Models whose cache has no ``crop`` (not a
    ``transformers`` ``Cache``) get a separate full forward instead; results are the same.

    Args:
        model: A causal LM taking ``input_ids``, ``cache`` (or ``past_key_values``) and
            ``use_cache``, as for :func:`greedy_generate` with ``use_cache=True``.
        sequences: Integer tensor ``[N, L]``; ``L - prefix_length`` tokens are generated.
        prefix_length: Context tokens, ``1 <= prefix_length < L``.
        batch_size: Rows per chunk.

    Yields:
        ``(start, generated, logits)`` per chunk: ``generated`` LongTensor
        ``[B, L - prefix_length]`` (greedy tokens for rows ``start .. start + B - 1``) and
        ``logits`` ``[B, L, V]`` (teacher-forced, position ``t`` predicts token ``t + 1``).

    Example:
        >>> import torch, transformers
        >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        ...     max_position_embeddings=128)
        >>> model = transformers.LlamaForCausalLM(config).eval()
        >>> seqs = torch.randint(0, 32, (5, 12))
        >>> for start, generated, logits in greedy_generate_with_logits(
        ...         model, seqs, prefix_length=8, batch_size=4):
        ...     print(start, tuple(generated.shape), tuple(logits.shape))
        0 (4, 4) (4, 12, 32)
        4 (1, 4) (1, 12, 32)
    """
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
        raise ValueError(
            "sequences must be a 2-D integer tensor [N, L], got "
            f"{tuple(sequences.shape) if isinstance(sequences, torch.Tensor) else type(sequences)}"
        )
    length = sequences.shape[1]
    check_int("batch_size", batch_size, 1, "it is the number of rows per forward pass, e.g. 32")
    if isinstance(prefix_length, bool) or not isinstance(prefix_length, int) or not (
        1 <= prefix_length < length
    ):
        raise ValueError(
            f"prefix_length must be an integer in [1, {length - 1}] for sequences of length "
            f"{length}, got {prefix_length!r}"
        )
    device = sequences.device
    if isinstance(model, torch.nn.Module):
        device = _model_device(model, fallback=sequences.device)
    for start in range(0, sequences.shape[0], batch_size):
        chunk = sequences[start : start + batch_size].to(device=device, dtype=torch.long)
        with torch.no_grad():  # not held across the yield: the caller's grad mode is its own
            generated, logits = _prefill_score_decode(model, chunk, prefix_length)
        yield start, generated, logits


def _prefill_score_decode(
    model: Any, chunk: torch.Tensor, prefix_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    suffix_length = chunk.shape[1] - prefix_length
    output = model(input_ids=chunk[:, :prefix_length], use_cache=True)
    prefix_logits = _logits_of(output, use_cache=True)
    past = _past_of(output)
    first = prefix_logits[:, -1, :].argmax(dim=-1)
    keyword = _cache_keyword(model)
    if callable(getattr(past, "crop", None)):
        output = model(input_ids=chunk[:, prefix_length:], use_cache=True, **{keyword: past})
        logits = torch.cat([prefix_logits, _logits_of(output, use_cache=True)], dim=1)
        past = _past_of(output)
        past.crop(-suffix_length)  # back to the prefix (negative = number of tokens removed)
    else:
        logits = _logits_of(model(input_ids=chunk), use_cache=False)
    return _decode_steps(model, past, first, suffix_length, keyword), logits


def _decode_uncached(
    model: Any,
    chunk: torch.Tensor,
    suffix_length: int,
    pick: Any = None,
    caller: str = "greedy_generate",
) -> torch.Tensor:
    pick = _argmax if pick is None else pick
    sequence = chunk
    for _ in range(suffix_length):
        logits = _logits_of(model(input_ids=sequence), use_cache=False, caller=caller)
        next_token = pick(logits[:, -1, :])
        sequence = torch.cat([sequence, next_token[:, None]], dim=1)
    return sequence[:, chunk.shape[1] :]



def sample_generate(
    model: torch.nn.Module,
    prompts: torch.Tensor,
    num_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Sample exactly ``num_tokens`` tokens after each prompt (untargeted extraction).

    Each step turns the last logits (in float32) into a distribution the way ``transformers``'
    ``generate(do_sample=True)`` does, in the same order as its warpers:

    1. temperature: ``logits / temperature`` (``TemperatureLogitsWarper``);
    2. top-k: logits below the ``top_k``-th largest become ``-inf`` (ties with it are kept;
       ``TopKLogitsWarper``);
    3. top-p (nucleus): sorted by probability, the least likely tokens whose cumulative
       probability is ``<= 1 - top_p`` become ``-inf``, always keeping the most likely one
       (``TopPLogitsWarper``);

    then ``softmax`` renormalises what is left and the token is drawn with
    ``torch.multinomial(probs, 1, generator=generator)``. As in :func:`greedy_generate` there is no
    EOS stop and no padding: every row gets exactly ``num_tokens`` tokens, and the prompts are
    processed in chunks of ``batch_size`` rows with a KV cache (the model's own ``Cache``, passed
    back as ``cache=`` where its forward declares it, else ``past_key_values=``).

    Reproducibility: with a seeded ``generator`` (``torch.Generator(device=...).manual_seed(s)``
    on the model's device) the same model, prompts, arguments and ``batch_size`` give the same
    tokens, and the global RNG (``torch.manual_seed``) is neither used nor advanced. With
    ``generator=None`` the draws come from the global RNG of the model's device. A different
    ``batch_size`` consumes the generator in a different order, so it gives different (equally
    distributed) samples.

    The model is put in eval mode for the call (no dropout) and every submodule's train/eval
    mode is restored afterwards; everything runs under :func:`torch.no_grad`.

    Args:
        model: A causal LM, as for :func:`greedy_generate`.
        prompts: Integer tensor ``[N, P]`` of token ids, ``P >= 1``, all prompts of the same
            length. For unconditional samples from the beginning of a document pass a BOS-only
            prompt, ``[[bos]] * N``: ``torch.full((N, 1), tokenizer.bos_token_id)``.
        num_tokens: Tokens sampled per prompt, ``>= 1``.
        temperature: A finite number ``> 0``; ``1.0`` samples from the model's own
            distribution, lower is sharper. ``0`` is refused: argmax decoding is
            :func:`greedy_generate`.
        top_k: Keep only the ``top_k`` most likely tokens (an integer ``>= 1``), or ``None`` (all).
            ``top_k=1`` is greedy decoding.
        top_p: Keep the smallest set of most likely tokens whose probability reaches ``top_p``,
            a number in ``(0, 1]``, or ``None`` (``1.0``: no truncation).
        batch_size: Prompts decoded together, ``>= 1``.
        generator: A ``torch.Generator`` on the model's device, or ``None`` (global RNG).
        use_cache: Reuse the KV cache between steps; ``False`` re-runs the whole sequence at
            every step (for models without a cache).

    Returns:
        LongTensor ``[N, num_tokens]`` of sampled token ids, on the model's device.

    Example:
        >>> import torch, transformers
        >>> from antimemo.functional import sample_generate
        >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        ...     max_position_embeddings=128)
        >>> model = transformers.LlamaForCausalLM(config)
        >>> bos = torch.full((6, 1), config.bos_token_id)
        >>> a = sample_generate(model, bos, 5, top_k=10, generator=torch.Generator().manual_seed(0))
        >>> b = sample_generate(model, bos, 5, top_k=10, generator=torch.Generator().manual_seed(0))
        >>> a.shape, torch.equal(a, b)
        (torch.Size([6, 5]), True)
    """
    _check_model_and_rows(model, prompts, "prompts", "prompt", "sampling")
    check_int("num_tokens", num_tokens, 1, "it is the number of tokens sampled per prompt")
    if is_number(temperature) and temperature == 0:
        raise ValueError(
            "temperature must be > 0, got 0; temperature 0 is argmax decoding: use "
            "greedy_generate(model, prompts, num_tokens) instead (or top_k=1)"
        )
    if not is_number(temperature) or temperature < 0:
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature!r}; 1.0 samples from "
            "the model's distribution, lower values sharpen it (e.g. temperature=0.7)"
        )
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(
            f"top_k must be None or an integer >= 1, got {top_k!r}; e.g. top_k=40 keeps the 40 "
            "most likely tokens, None keeps all"
        )
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(
            f"top_p must be None or a number in (0, 1], got {top_p!r}; e.g. top_p=0.95, or None "
            "(= 1.0) for no nucleus truncation; for argmax decoding use greedy_generate"
        )
    check_int("batch_size", batch_size, 1, "it is the number of prompts decoded at once, e.g. 32")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
            "e.g. generator=torch.Generator().manual_seed(0)"
        )
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {use_cache!r}")

    device = prompts.device
    if isinstance(model, torch.nn.Module):
        device = _model_device(model, fallback=prompts.device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the model is on {device}; torch.multinomial "
            f"needs a generator on the model's device: torch.Generator(device={str(device)!r})"
        )
    temperature, top_k = float(temperature), None if top_k is None else int(top_k)
    top_p = None if top_p is None else float(top_p)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = _sampling_probs(logits, temperature, top_k, top_p)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    num = prompts.shape[0]
    out = torch.empty((num, num_tokens), dtype=torch.long, device=device)
    try:
        if isinstance(model, torch.nn.Module):
            model.eval()
        with torch.no_grad():
            for start in range(0, num, batch_size):
                chunk = prompts[start : start + batch_size].to(device=device, dtype=torch.long)
                decode = _decode_cached if use_cache else _decode_uncached
                out[start : start + chunk.shape[0]] = decode(
                    model, chunk, num_tokens, pick, "sample_generate"
                )
    finally:
        for module, training in modes:
            module.training = training
    return out


def _sampling_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """The distribution :func:`sample_generate` draws from: ``logits`` ``[B, V]`` -> temperature
    -> top-k -> top-p (the order and the rules of ``transformers``' ``TemperatureLogitsWarper``,
    ``TopKLogitsWarper``, ``TopPLogitsWarper`` with ``min_tokens_to_keep=1``) -> softmax, in
    float32."""
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1:] = False  # the most likely token always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(dim=-1)
