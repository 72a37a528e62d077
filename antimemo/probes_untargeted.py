"""Untargeted extraction as the monitor runs it (no Lightning): sample from prompts that know no
training prefix and look every generated span up in an index of the training tokens.

:class:`UntargetedConfig` holds the settings (``MemorizationMonitor(untargeted=...)`` validates a
dict into one); :class:`UntargetedEvaluator` builds the :class:`~antimemo.suffix_index.TokenIndex`
of the training set once and, at every evaluation, samples ``num_generations`` continuations per
prompt kind (empty/BOS, random held-out prefixes, repeated-token "divergence" prompts, Nasr et al.
2023), scores them with :class:`~antimemo.metrics.UntargetedExtraction`, and scores held-out text
of the same length the same way as a baseline (text the model never saw can still share spans
with training data: memorization is the excess over it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from antimemo._checks import check_int, is_number
from antimemo.functional.generation import sample_generate
from antimemo.functional.untargeted import untargeted_prompts
from antimemo.metrics.untargeted import UntargetedExtraction
from antimemo.probes import _attention_mask, token_ids
from antimemo.suffix_index import TokenIndex

__all__ = ["KINDS", "UntargetedConfig", "UntargetedEvaluator"]

KINDS = ("empty", "holdout", "repeat")


@dataclass(frozen=True)
class UntargetedConfig:
    """Settings of the monitor's untargeted extraction.

    Attributes:
        num_generations: samples per prompt kind and evaluation (over all ranks).
        num_tokens: sampled tokens per generation.
        min_span: shortest verbatim training span counted (``None``: ``min(32, 3/4`` of the
            longest training document)).
        kinds: prompt kinds, a subset of ``("empty", "holdout", "repeat")``.
        bos_id: the start token of ``"empty"`` prompts (``None``: the model config's
            ``bos_token_id``; a model without one must set it, e.g. 10, the newline byte, for the
            byte-level recipe).
        holdout_length: prompt length of ``"holdout"`` prompts.
        repeats: how often ``"repeat"`` prompts repeat their token.
        temperature, top_k, top_p: the sampling scheme (``sample_generate``).
        seed: seed of the prompts and the samples (per evaluation: ``seed + evaluation``).
    """

    num_generations: int = 16
    num_tokens: int = 64
    min_span: int | None = None
    kinds: tuple[str, ...] = KINDS
    bos_id: int | None = None
    holdout_length: int = 16
    repeats: int = 16
    temperature: float = 1.0
    top_k: int | None = 40
    top_p: float | None = None
    seed: int = 0

    @classmethod
    def from_argument(cls, value: Any) -> UntargetedConfig | None:
        """``None``/``False`` -> off, ``True`` -> defaults, a mapping -> its keys over the defaults.

        Raises:
            ValueError / TypeError: naming the key, the value and the fix.

        Example:
            >>> UntargetedConfig.from_argument({"num_generations": 8}).num_generations
            8
            >>> UntargetedConfig.from_argument(False) is None
            True
        """
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            raise TypeError(
                f"untargeted must be None, a bool or a dict of settings, got {type(value).__name__}; e.g. "
                "untargeted={'num_generations': 16, 'bos_id': 10}"
            )
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"untargeted has unknown keys {unknown}; valid keys: {sorted(names)}")
        cfg = cls(**{k: (tuple(v) if k == "kinds" else v) for k, v in value.items()})
        check_int("untargeted['num_generations']", cfg.num_generations, 1, "e.g. 16")
        check_int("untargeted['num_tokens']", cfg.num_tokens, 1, "e.g. 64")
        if cfg.min_span is not None:
            check_int("untargeted['min_span']", cfg.min_span, 1, "e.g. 32, or None for the default")
        if not cfg.kinds or any(k not in KINDS for k in cfg.kinds) or len(set(cfg.kinds)) != len(cfg.kinds):
            raise ValueError(f"untargeted['kinds'] must be distinct names from {KINDS}, got {cfg.kinds!r}")
        if cfg.bos_id is not None:
            check_int("untargeted['bos_id']", cfg.bos_id, 0, "the start token of 'empty' prompts")
        check_int("untargeted['holdout_length']", cfg.holdout_length, 1, "e.g. 16")
        check_int("untargeted['repeats']", cfg.repeats, 1, "e.g. 16")
        if not is_number(cfg.temperature) or cfg.temperature <= 0:
            raise ValueError(f"untargeted['temperature'] must be a number > 0, got {cfg.temperature!r}; e.g. 1.0")
        if cfg.top_k is not None:
            check_int("untargeted['top_k']", cfg.top_k, 1, "or None for no top-k truncation")
        if cfg.top_p is not None and (not is_number(cfg.top_p) or not 0 < cfg.top_p <= 1):
            raise ValueError(f"untargeted['top_p'] must be in (0, 1] or None, got {cfg.top_p!r}")
        check_int("untargeted['seed']", cfg.seed, 0, "e.g. 0")
        return cfg


def _rows(dataset: Any, key: str) -> list[Tensor]:
    """Every item's text tokens (the monitor's own item reader: positions with attention mask 0 dropped)."""
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        ids = token_ids(item, key, f"held-out dataset[{i}]")
        mask = _attention_mask(item, ids, f"held-out dataset[{i}]")
        out.append(ids if mask is None else ids[mask])
    return out


class UntargetedEvaluator:
    """Runs the untargeted extraction of one monitor (see the module docstring).

    Args:
        config: the settings.
        train_dataset: the training set (items: token tensors or dicts with ``key``).
        holdout_dataset: held-out rows (never trained on), for ``"holdout"`` prompts and the
            baseline; ``None`` drops both (refused when ``"holdout"`` is a configured kind).
        key: the token-id key of dict items.
        bos_id: fallback start token for ``"empty"`` prompts (the model config's).
    """

    def __init__(self, config: UntargetedConfig, train_dataset: Any, holdout_dataset: Any = None,
                 key: str = "input_ids", bos_id: int | None = None) -> None:  # fmt: skip
        self.config = config
        self.index = TokenIndex.build(train_dataset, key=key, progress=None)
        longest = int(self.index.max_match_length)
        self.min_span = config.min_span if config.min_span is not None else max(1, min(32, 3 * longest // 4))
        if "holdout" in config.kinds and holdout_dataset is None:
            raise ValueError(
                "untargeted['kinds'] includes 'holdout' but the monitor has no held-out data; pass "
                "MemorizationMonitor(holdout='val' or a dataset), or drop 'holdout' from untargeted['kinds']"
            )
        self.bos_id = config.bos_id if config.bos_id is not None else bos_id
        if "empty" in config.kinds and self.bos_id is None:
            raise ValueError(
                "untargeted['kinds'] includes 'empty' but the model has no bos_token_id; pass "
                "untargeted={'bos_id': <a token that starts documents>} (e.g. 10, the newline byte, for the "
                "byte-level recipe), or drop 'empty' from untargeted['kinds']"
            )
        self.holdout = None if holdout_dataset is None else _rows(holdout_dataset, key)
        self._holdout_windows: Tensor | None = None
        if "holdout" in config.kinds:
            # every holdout_length window of every held-out row (rows may differ in length)
            w = config.holdout_length
            windows = [r.unfold(0, w, 1) for r in self.holdout or [] if r.numel() >= w]
            if not windows:
                raise ValueError(
                    f"untargeted['holdout_length']={w} is longer than every held-out sequence; lower it or drop "
                    "'holdout' from untargeted['kinds']"
                )
            self._holdout_windows = torch.cat(windows)
        self.vocab_size = self.index.max_token_id + 1  # "repeat" prompts draw from the ids seen in training
        self.evaluations = 0

    def _baseline_windows(self) -> Tensor | None:
        """Held-out text cut into ``num_tokens``-long windows (consecutive rows joined)."""
        if not self.holdout:
            return None
        stream = torch.cat(self.holdout)
        t = self.config.num_tokens
        n = min(self.config.num_generations, stream.numel() // t)
        return None if n == 0 else stream[: n * t].view(n, t)

    def evaluate(self, model: torch.nn.Module, device: torch.device, rank: int = 0, world: int = 1,
                 process_group: Any = None) -> dict[str, float]:  # fmt: skip
        """One evaluation: every rank samples its share; the metric syncs across ranks.

        Returns:
            ``untargeted/*`` (all kinds together), ``untargeted/<kind>/extraction_rate`` and, with
            held-out data, ``untargeted/holdout_baseline/*``.
        """
        cfg = self.config
        seed = cfg.seed + self.evaluations
        self.evaluations += 1
        total = UntargetedExtraction(self.index, min_span=self.min_span, process_group=process_group).to(device)
        results: dict[str, float] = {}
        for k, kind in enumerate(cfg.kinds):
            g = torch.Generator().manual_seed(seed * 1000 + k)
            if kind == "empty":
                prompts = untargeted_prompts("empty", cfg.num_generations, bos_id=self.bos_id)
            elif kind == "holdout":
                prompts = untargeted_prompts("holdout", cfg.num_generations, holdout=self._holdout_windows,
                                             length=cfg.holdout_length, generator=g)  # fmt: skip
            else:
                prompts = untargeted_prompts("repeat", cfg.num_generations, vocab_size=self.vocab_size,
                                             repeats=cfg.repeats, generator=g)  # fmt: skip
            mine = prompts[rank::world]
            per_kind = UntargetedExtraction(self.index, min_span=self.min_span, process_group=process_group).to(device)
            if mine.shape[0]:
                sample_g = torch.Generator(device=device).manual_seed(seed * 1000 + 100 + k * 7919 + rank)
                generated = sample_generate(model, mine.to(device), cfg.num_tokens, temperature=cfg.temperature,
                                            top_k=cfg.top_k, top_p=cfg.top_p, generator=sample_g)  # fmt: skip
                total.update(generated)
                per_kind.update(generated)
            results[f"untargeted/{kind}/extraction_rate"] = float(per_kind.compute()["untargeted/extraction_rate"])
        results.update({key: float(value) for key, value in total.compute().items()})
        windows = self._baseline_windows()
        if windows is not None:
            base = UntargetedExtraction(self.index, min_span=self.min_span, process_group=process_group).to(device)
            if windows[rank::world].shape[0]:
                base.update(windows[rank::world].to(device))
            for key, value in base.compute().items():
                results[key.replace("untargeted/", "untargeted/holdout_baseline/", 1)] = float(value)
        return results
