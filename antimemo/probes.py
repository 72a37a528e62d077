"""Memorization probes without Lightning: draw them from a dataset, decode, and score them.

This is the engine of :class:`~antimemo.callbacks.MemorizationMonitor`; the callback only adds
the Lightning glue (hooks, logging, checkpoint state). Everything here imports torch, NumPy and
the ``antimemo.functional`` / ``antimemo.metrics`` layers only, so it can be used from any
training loop.

- :func:`token_ids` reads the 1-D token ids of one dataset item.
- :func:`probe_window` cuts the probe (the first ``length`` text tokens) out of one item, and
  says why an item has no probe: too short, or padding (``attention_mask == 0``) inside the window.
- :func:`draw_probes` walks a seeded permutation of a map-style dataset and keeps the first
  ``count`` items that have a probe; :func:`fetch_probes` re-reads the probes of known indices.
- :class:`ProbeScorer` decodes the probes greedily and scores extraction
  (:class:`~antimemo.metrics.ExtractableMemorization`) and membership inference
  (:class:`~antimemo.metrics.MembershipInference`); :meth:`ProbeScorer.teacher_forced` scores
  greedy exact match and probabilistic extraction from one forward pass, without decoding
  (:class:`~antimemo.metrics.DiscoverableExtraction`).
- :func:`get_rng_state` / :func:`set_rng_state` / :func:`module_modes` save and restore what an
  evaluation must not disturb.

Example:
    >>> import torch
    >>> docs = [{"input_ids": torch.arange(n)} for n in (3, 12, 20, 7)]
    >>> draw = draw_probes(docs, count=None, length=10, seed=0)
    >>> sorted(draw.indices), draw.too_short
    ([1, 2], 2)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from antimemo.functional.generation import greedy_generate, greedy_generate_with_logits
from antimemo.functional.membership import token_logprob_stats
from antimemo.metrics.discoverable import DiscoverableExtraction
from antimemo.metrics.extraction import ExtractableMemorization
from antimemo.metrics.membership import MembershipInference

__all__ = [
    "ATTENTION_MASK_KEY",
    "MIA_SCORES",
    "ProbeDraw",
    "ProbeScorer",
    "draw_probes",
    "fetch_probes",
    "get_rng_state",
    "ids_bytes",
    "is_map_dataset",
    "module_modes",
    "probe_window",
    "set_rng_state",
    "token_ids",
]

#: The membership-inference scores :class:`ProbeScorer` can report.
MIA_SCORES = ("loss", "zlib", "min_k", "min_k_plus_plus")
#: Key of the padding mask in dict dataset items (the Hugging Face name): positions where it is 0
#: are padding, not text, and never become part of a probe.
ATTENTION_MASK_KEY = "attention_mask"
_EXTRACTION_KEYS = ("exact_match", "token_match", "near_verbatim")
_NAME = "MemorizationMonitor"  # errors name the callback whose arguments fix them


# ------------------------------------------------------------------------------- dataset items


def is_map_dataset(obj: Any) -> bool:
    """``True`` for a map-style dataset (``__len__`` and ``__getitem__``; not a str, dict or stream).

    Example:
        >>> is_map_dataset([1, 2]), is_map_dataset({"a": 1}), is_map_dataset("text")
        (True, False, False)
    """
    return (
        not isinstance(obj, (str, bytes, Mapping, IterableDataset))
        and hasattr(obj, "__getitem__")
        and hasattr(obj, "__len__")
    )


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _as_tensor(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value
    ):
        return torch.tensor(value, dtype=torch.long)
    return value


def token_ids(item: Any, key: str = "input_ids", where: str = "the item") -> Tensor:
    """The 1-D token ids of one dataset item, as a CPU LongTensor.

    Args:
        item: a dict holding ``key``, a 1-D integer tensor, a NumPy array or a list of ints.
        key: the dict key of the token ids (the monitor's ``input_ids_key``).
        where: how error messages name the item, e.g. ``"training dataset[3]"``.

    Raises:
        KeyError: a dict without ``key``.
        TypeError / ValueError: anything but 1-D integer token ids.

    Example:
        >>> token_ids({"input_ids": [5, 6, 7]})
        tensor([5, 6, 7])
    """
    if isinstance(item, Mapping):
        if key not in item:
            raise KeyError(
                f"{_NAME}: {where} is a dict without the key input_ids_key={key!r} (its keys: "
                f"{sorted(map(str, item))}); set input_ids_key to the key holding the token ids"
            )
        item = item[key]
    item = _as_tensor(item)
    if not isinstance(item, Tensor):
        raise TypeError(
            f"{_NAME}: {where} must be a dict with input_ids_key={key!r}, a 1-D LongTensor, a "
            f"NumPy array or a list of ints, got {type(item).__name__}"
        )
    if item.dim() != 1:
        raise ValueError(
            f"{_NAME}: {where} must hold a 1-D tensor of token ids (one unpadded example), got "
            f"shape {tuple(item.shape)}"
        )
    if not _is_integer_dtype(item.dtype):
        raise TypeError(f"{_NAME}: {where} must hold integer token ids, got dtype {item.dtype}")
    return item.detach().to("cpu", torch.long)


def _attention_mask(item: Any, ids: Tensor, where: str) -> Tensor | None:
    """The item's ``attention_mask`` as a 1-D bool tensor (True = text), or ``None`` without one."""
    if not isinstance(item, Mapping) or item.get(ATTENTION_MASK_KEY) is None:
        return None
    mask = _as_tensor(item[ATTENTION_MASK_KEY])
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"{_NAME}: {where}[{ATTENTION_MASK_KEY!r}] must be a 1-D mask with one entry per token "
            f"id, shape {tuple(ids.shape)}, got {shape}; return the item's own mask (1 = text, 0 = "
            "padding), or drop the key for unpadded items"
        )
    if mask.dtype != torch.bool:
        if not _is_integer_dtype(mask.dtype) or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"{_NAME}: {where}[{ATTENTION_MASK_KEY!r}] must hold 0 (padding) and 1 (text), got "
                f"dtype {mask.dtype} with values {sorted(set(mask.flatten().tolist()))[:6]}"
            )
        mask = mask != 0
    return mask.detach().cpu()


#: Why :func:`probe_window` found no probe in an item.
_SHORT, _PADDED = "short", "padded"


def probe_window(
    item: Any, length: int, key: str = "input_ids", where: str = "the item"
) -> tuple[Tensor | None, str | None]:
    """The probe of one item: its first ``length`` text tokens, or ``(None, reason)``.

    Without an ``attention_mask`` (unpadded items, the usual case) the probe is
    ``ids[:length]``, and an item with fewer than ``length`` tokens has none (reason
    ``"short"``). A dict item with an ``attention_mask`` (1 = text, 0 = padding, either side)
    has a probe only if its ``length`` tokens from the first unmasked position are all
    unmasked: padding is never compared as if it were text. With fewer than ``length`` unmasked
    tokens the reason is ``"short"``; with enough of them but a masked position inside that
    window it is ``"padded"``.

    Returns:
        ``(row, None)`` with ``row`` a LongTensor of ``length`` ids, or ``(None, reason)``.

    Example:
        >>> item = {"input_ids": [7, 8, 9, 0, 0], "attention_mask": [1, 1, 1, 0, 0]}
        >>> probe_window(item, 3)
        (tensor([7, 8, 9]), None)
        >>> probe_window(item, 4)
        (None, 'short')
    """
    ids = token_ids(item, key, where)
    mask = _attention_mask(item, ids, where)
    if mask is None:
        return (ids[:length], None) if ids.numel() >= length else (None, _SHORT)
    if int(mask.sum()) < length:
        return None, _SHORT
    start = int(mask.to(torch.uint8).argmax())  # the first text position
    if start + length > ids.numel() or not bool(mask[start : start + length].all()):
        return None, _PADDED
    return ids[start : start + length], None


def _distinct_suffix_tokens(row: Tensor, suffix_length: int) -> int:
    """Number of distinct token ids among the last ``suffix_length`` tokens of ``row``."""
    return int(torch.unique(row[-suffix_length:]).numel())


class ProbeDraw(NamedTuple):
    """What :func:`draw_probes` found: the kept items and, for the items it looked at, why the
    others were skipped."""

    indices: list[int]
    """Dataset indices of the kept items, in draw order."""
    rows: list[Tensor]
    """Their probes, ``length`` token ids each."""
    scanned: int
    """Items looked at (the whole dataset when fewer than ``count`` were kept)."""
    too_short: int
    """Items with fewer than ``length`` (unmasked) tokens."""
    padded: int
    """Items with enough unmasked tokens but ``attention_mask == 0`` inside the window."""
    degenerate: int
    """Items whose suffix had fewer than ``min_distinct`` distinct token ids."""

    def reasons(self, length: int, min_distinct: int = 1) -> str:
        """The skipped items, counted by reason, for an error message (``""`` when none)."""
        parts = []
        if self.too_short:
            parts.append(f"{self.too_short} have fewer than {length} (unmasked) tokens")
        if self.padded:
            parts.append(f"{self.padded} have {ATTENTION_MASK_KEY} 0 (padding) inside their first {length} text tokens")
        if self.degenerate:
            parts.append(f"{self.degenerate} have fewer than {min_distinct} distinct ids in their suffix")
        return "; ".join(parts)


def draw_probes(
    dataset: Any,
    count: int | None,
    length: int,
    seed: int,
    key: str = "input_ids",
    what: str = "training dataset",
    suffix_length: int = 1,
    min_distinct: int = 1,
) -> ProbeDraw:
    """Walk ``randperm(len(dataset))`` (a private generator seeded with ``seed``; the global RNG
    is not used) and keep the first ``count`` items that have a probe (:func:`probe_window`)
    whose last ``suffix_length`` tokens hold at least ``min_distinct`` distinct ids.

    Args:
        dataset: a map-style dataset.
        count: items to keep; ``None`` scans the whole dataset (to count the eligible items).
        length: tokens per probe (``prefix_length + suffix_length``).
        seed: seed of the permutation.
        key: dict key of the token ids.
        what: how error messages name the dataset.
        suffix_length, min_distinct: the degenerate-suffix filter (``min_distinct=1``: none).

    Returns:
        A :class:`ProbeDraw`. When fewer than ``count`` items are kept, the whole dataset was
        scanned, so ``len(draw.indices)`` is the number of eligible items.

    Example:
        >>> docs = [{"input_ids": torch.arange(n)} for n in (3, 12, 20, 7)]
        >>> draw_probes(docs, count=1, length=10, seed=0).indices
        [1]
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    indices: list[int] = []
    rows: list[Tensor] = []
    scanned = too_short = padded = degenerate = 0
    for index in order:
        scanned += 1
        row, reason = probe_window(dataset[index], length, key, f"{what}[{index}]")
        if row is None:
            too_short += reason == _SHORT
            padded += reason == _PADDED
            continue
        if min_distinct > 1 and _distinct_suffix_tokens(row, suffix_length) < min_distinct:
            degenerate += 1
            continue
        indices.append(index)
        rows.append(row)
        if count is not None and len(indices) == count:
            break
    return ProbeDraw(indices, rows, scanned, too_short, padded, degenerate)


def fetch_probes(dataset: Any, indices: Sequence[int], length: int, key: str = "input_ids", what: str = "probe") -> Tensor:
    """The probes of known indices (e.g. restored from a checkpoint), checking they still exist.

    Raises:
        ValueError: an index is out of range, or its item no longer has a probe of ``length``.

    Example:
        >>> fetch_probes([torch.arange(5), torch.arange(9)], [1], length=4)
        tensor([[0, 1, 2, 3]])
    """
    rows = []
    for index in indices:
        if not 0 <= index < len(dataset):
            raise ValueError(
                f"{_NAME}: the restored {what} index {index} is out of range for a dataset of "
                f"{len(dataset)} examples; the dataset changed since the checkpoint was saved. "
                "Resume with the same data, or start a new run to draw new probes"
            )
        item = dataset[index]
        row, reason = probe_window(item, length, key, f"{what}[{index}]")
        if row is None:
            ids = token_ids(item, key, f"{what}[{index}]")
            if reason == _PADDED:
                raise ValueError(
                    f"{_NAME}: the restored {what} index {index} now has {ATTENTION_MASK_KEY} 0 "
                    f"(padding) inside its first {length} text tokens; the dataset changed since "
                    "the checkpoint was saved"
                )
            mask = _attention_mask(item, ids, f"{what}[{index}]")
            have = ids.numel() if mask is None else f"{int(mask.sum())} unmasked"
            raise ValueError(
                f"{_NAME}: the restored {what} index {index} now has {have} tokens, fewer "
                f"than the {length} needed; the dataset changed since the checkpoint was saved"
            )
        rows.append(row)
    return torch.stack(rows)


def ids_bytes(ids: Tensor) -> bytes:
    """The token ids as int32 little-endian bytes: the zlib text when no ``decode`` is given.

    Example:
        >>> ids_bytes(torch.tensor([1, 256]))
        b'\\x01\\x00\\x00\\x00\\x00\\x01\\x00\\x00'
    """
    return ids.to(torch.int32).numpy().astype("<i4").tobytes()


# -------------------------------------------------------------------------- state to restore


def module_modes(*roots: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """``(module, training)`` for every submodule of ``roots`` (each once), to restore exactly
    with ``module.training = training`` (``Module.train()`` would recurse).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
        >>> net[1].eval()
        Dropout(p=0.5, inplace=False)
        >>> [training for _, training in module_modes(net)]
        [True, True, False]
    """
    seen: dict[int, tuple[torch.nn.Module, bool]] = {}
    for root in roots:
        for module in root.modules():
            seen.setdefault(id(module), (module, module.training))
    return list(seen.values())


def get_rng_state(cuda: bool) -> dict[str, Any]:
    """The RNG states of torch (CPU; CUDA when ``cuda``), Python ``random`` and NumPy.

    Example:
        >>> state = get_rng_state(cuda=False)
        >>> a = torch.rand(1); set_rng_state(state); bool(torch.rand(1) == a)
        True
    """
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if cuda:
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def cuda_in_use() -> bool:
    """``True`` when CUDA is available and already initialized (its RNG state then matters)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


# ------------------------------------------------------------------------------------ scoring


def _logits(output: Any) -> Any:
    return output if isinstance(output, Tensor) else getattr(output, "logits", output)


@dataclass
class ProbeScorer:
    """Greedy extraction and membership-inference scores of probes, for one process's shard.

    The caller puts the model in ``eval()`` and runs under ``torch.inference_mode()`` (or
    ``no_grad``). Under DDP each rank passes its shard; the metrics' ``compute()`` is a
    collective call that gathers all shards, so every rank must call the scoring methods.

    Args:
        prefix_length: tokens of context given to the model.
        suffix_length: tokens generated and compared with the true continuation.
        batch_size: probes decoded (and MIA sequences scored) per forward pass.
        use_cache: decode with the KV cache.
        near_verbatim_threshold: edit-similarity threshold of ``near_verbatim``.
        mia_scores: the MIA scores to report (a subset of :data:`MIA_SCORES`).
        decode: ``Callable[[list[int]], str | bytes]`` giving the text for the zlib score, or
            ``None`` for :func:`ids_bytes`.
        discoverable: keyword arguments of :class:`~antimemo.metrics.DiscoverableExtraction`
            (``ns``, ``ps``, ``temperature``, ``top_k``, ``top_p``) to also report
            ``reproduced_length`` and the ``discoverable/*`` keys from the teacher-forced logits,
            or ``None`` (default) for neither.

    Example:
        >>> class Next(torch.nn.Module):  # predicts token + 1 (mod 8): it "knows" 0 1 2 3 ...
        ...     def forward(self, input_ids):
        ...         return torch.nn.functional.one_hot((input_ids + 1) % 8, 8).float()
        >>> probes = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0]])
        >>> scorer = ProbeScorer(prefix_length=3, suffix_length=3, use_cache=False)
        >>> scorer.extraction(Next(), probes, torch.device("cpu"))
        {'exact_match': 0.5, 'token_match': 0.8333333134651184, 'near_verbatim': 0.5}
    """

    prefix_length: int
    suffix_length: int
    batch_size: int = 32
    use_cache: bool = True
    near_verbatim_threshold: float = 0.9
    mia_scores: tuple[str, ...] = MIA_SCORES
    decode: Callable[[list[int]], str | bytes] | None = None
    discoverable: Mapping[str, Any] | None = None

    def new_teacher_forced_metric(self, device: torch.device) -> DiscoverableExtraction:
        """An empty :class:`~antimemo.metrics.DiscoverableExtraction` on ``device`` (greedy
        verdict only, no ``p_z``, when ``discoverable`` is ``None``)."""
        if self.discoverable is None:
            return DiscoverableExtraction(probabilistic=False).to(device)
        return DiscoverableExtraction(**self.discoverable).to(device)

    def _teacher_forced_results(self, metric: DiscoverableExtraction, exact: bool) -> dict[str, float]:
        """The teacher-forced figures to report: ``exact_match`` when ``exact``, and
        ``reproduced_length`` and ``discoverable/*`` when ``discoverable`` is set."""
        computed = metric.compute()  # a collective under DDP: every rank calls it
        keys = [k for k in computed if k != "exact_match" or exact]
        if self.discoverable is None:
            keys = [k for k in keys if k == "exact_match"]
        return {key: float(computed[key]) for key in keys}

    def teacher_forced(
        self,
        model: torch.nn.Module,
        shard: Tensor,
        device: torch.device,
        member_metric: MembershipInference | None = None,
    ) -> dict[str, float]:
        """Greedy exact match (and, with ``discoverable``, ``reproduced_length`` and the
        probabilistic keys) from one teacher-forced forward per batch, without decoding.

        Greedy decoding reproduces a suffix iff the argmax at every suffix position, under the
        true preceding tokens, is the true token
        (:func:`~antimemo.functional.teacher_forced_greedy_match`), so ``exact_match`` is the
        one :meth:`extraction` would report, up to float near-ties between the top two logits.

        Args:
            model: the causal LM, in ``eval()`` mode; ``model(input_ids=...)`` returns logits.
            shard: ``[N, prefix_length + suffix_length]`` probes (this rank's share), on the CPU.
            device: where the model runs.
            member_metric: when given, the probes are also the MIA members: their log-probs
                (from the same logits) are added to this metric.

        Returns:
            ``{"exact_match", ...}`` as floats, over all ranks.

        Example:
            >>> class Next(torch.nn.Module):  # predicts token + 1 (mod 8)
            ...     def forward(self, input_ids):
            ...         return torch.nn.functional.one_hot((input_ids + 1) % 8, 8).float()
            >>> probes = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0]])
            >>> ProbeScorer(prefix_length=3, suffix_length=3).teacher_forced(Next(), probes, torch.device("cpu"))
            {'exact_match': 0.5}
        """
        metric = self.new_teacher_forced_metric(device)
        for start in range(0, len(shard), self.batch_size):
            rows_cpu = shard[start : start + self.batch_size]
            rows = rows_cpu.to(device)
            logits = _logits(model(input_ids=rows))
            self._check_logits(logits, rows)
            metric.update(logits[:, self.prefix_length - 1 : -1], rows[:, self.prefix_length :])
            if member_metric is not None:
                self.update_membership(member_metric, logits, rows_cpu, rows, is_member=True)
        return self._teacher_forced_results(metric, exact=True)

    @staticmethod
    def _check_logits(logits: Any, rows: Tensor) -> None:
        if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != rows.shape:
            got = f"shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
            raise TypeError(
                f"{_NAME}: the teacher-forced pass needs model(input_ids=...) to return logits "
                f"[B, T, V] = [{rows.shape[0]}, {rows.shape[1]}, V] (a tensor or an object with "
                f".logits), got {got}"
            )

    def new_membership_metric(self, device: torch.device) -> MembershipInference:
        """An empty :class:`~antimemo.metrics.MembershipInference` on ``device``."""
        return MembershipInference(scores=self.mia_scores).to(device)

    def members_are(self, members: Tensor | None, probes: Tensor | None) -> bool:
        """True when the MIA members are exactly the probes (and the KV cache is used), so one
        teacher-forced pass serves both."""
        return (
            self.use_cache
            and members is not None
            and probes is not None
            and members.shape == probes.shape
            and torch.equal(members, probes)
        )

    def extraction(
        self,
        model: torch.nn.Module,
        shard: Tensor,
        device: torch.device,
        member_metric: MembershipInference | None = None,
    ) -> dict[str, float]:
        """Greedy-decode ``suffix_length`` tokens from each probe's prefix and score them.

        Args:
            model: the causal LM, in ``eval()`` mode.
            shard: ``[N, prefix_length + suffix_length]`` probes (this rank's share), on the CPU.
            device: where the model runs.
            member_metric: when given, the probes are also the MIA members: the prefix is run
                once with the KV cache, the true suffix on top of it gives the member log-probs
                (added to this metric), the cache is cropped back and greedy decoding goes on.

        Returns:
            ``{"exact_match", "token_match", "near_verbatim"}`` as floats, over all ranks; with
            ``discoverable`` also ``reproduced_length`` and the ``discoverable/*`` keys from the
            teacher-forced logits (the shared pass gives them with the KV cache; without it, a
            separate forward).
        """
        tf_metric = None if self.discoverable is None else self.new_teacher_forced_metric(device)
        if self.use_cache and (member_metric is not None or tf_metric is not None):
            generated = torch.empty((len(shard), self.suffix_length), dtype=torch.long, device=device)
            for start, tokens, logits in greedy_generate_with_logits(
                model, shard.to(device), self.prefix_length, self.batch_size
            ):
                generated[start : start + len(tokens)] = tokens
                rows = shard[start : start + len(tokens)]
                rows_device = rows.to(device)
                if member_metric is not None:
                    self.update_membership(member_metric, logits, rows, rows_device, is_member=True)
                if tf_metric is not None:
                    tf_metric.update(logits[:, self.prefix_length - 1 : -1], rows_device[:, self.prefix_length :])
        else:
            generated = greedy_generate(
                model,
                shard[:, : self.prefix_length].to(device),
                self.suffix_length,
                self.batch_size,
                use_cache=self.use_cache,
            )
            for start in range(0, len(shard) if tf_metric is not None else 0, self.batch_size):
                rows = shard[start : start + self.batch_size].to(device)
                logits = _logits(model(input_ids=rows))
                self._check_logits(logits, rows)
                tf_metric.update(logits[:, self.prefix_length - 1 : -1], rows[:, self.prefix_length :])
        metric = ExtractableMemorization(
            prefix_length=self.prefix_length,
            suffix_length=self.suffix_length,
            near_verbatim_threshold=self.near_verbatim_threshold,
        ).to(device)
        metric.update(generated.to(device), shard[:, self.prefix_length :].to(device))
        computed = metric.compute()  # a collective under DDP: every rank calls it
        results = {key: float(computed[key]) for key in _EXTRACTION_KEYS}
        if tf_metric is not None:  # exact_match stays the decoded one
            results.update(self._teacher_forced_results(tf_metric, exact=False))
        return results

    def update_membership(
        self,
        metric: MembershipInference,
        logits: Any,
        rows_cpu: Tensor,
        rows: Tensor,
        is_member: bool | Tensor,
    ) -> None:
        """Score one batch of sequences (``rows`` on the device, ``rows_cpu`` their CPU copy)."""
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"{_NAME}: MIA needs model(input_ids=...) to return logits [B, T, V] (a "
                f"tensor or an object with .logits), got {type(logits).__name__}"
            )
        log_probs, mu, sigma, mask = token_logprob_stats(logits, rows)
        texts = None
        if "zlib" in self.mia_scores:  # from the CPU copy: no device-to-host copy per batch
            texts = [
                self.decode(row.tolist()) if self.decode is not None else ids_bytes(row)
                for row in rows_cpu
            ]
        if isinstance(is_member, bool):
            is_member = torch.full((len(rows),), is_member, dtype=torch.bool, device=rows.device)
        metric.update(log_probs, is_member, mask=mask, mu=mu, sigma=sigma, texts=texts)

    def membership(
        self,
        model: torch.nn.Module,
        members: Tensor,
        non_members: Tensor,
        device: torch.device,
        metric: MembershipInference,
        rank: int = 0,
        world: int = 1,
        members_scored: bool = False,
    ) -> dict[str, float]:
        """Score this rank's share ``cat([members, non_members])[rank::world]`` and compute MIA.

        With ``members_scored`` the members' share was already added to ``metric`` by
        :meth:`extraction` (the probes are the members), so only the non-members are run.

        Returns:
            ``{"mia/{score}/auc", "mia/{score}/tpr_at_1pct_fpr", ...}`` as floats, over all ranks.
        """
        index = torch.arange(len(members) + len(non_members))[rank::world]
        if members_scored:
            index = index[index >= len(members)]
        sequences = torch.cat([members, non_members])[index]
        is_member = index < len(members)
        for start in range(0, len(sequences), self.batch_size):
            rows_cpu = sequences[start : start + self.batch_size]
            rows = rows_cpu.to(device)
            logits = _logits(model(input_ids=rows))
            members_here = is_member[start : start + self.batch_size].to(device)
            self.update_membership(metric, logits, rows_cpu, rows, members_here)
        computed = metric.compute()  # a collective under DDP: every rank calls it
        return {f"mia/{key}": float(value) for key, value in computed.items()}
