"""``DiversityMonitor``: track the diversity and the tails of an LM's generations (model collapse).

At the end of validation the callback samples a fixed, seeded set of continuations of held-out
prompts and measures distinct-n and n-gram entropy (:class:`~antimemo.metrics.TextDiversity`),
the coverage of the real held-out data's rare n-grams and the held-out loss
(:class:`~antimemo.metrics.TailCoverage`), and logs them as ``diversity/*``. See
``docs/collapse.md``, "Diversity and tails".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from antimemo._checks import check_int, is_int, is_number
from antimemo.callbacks._interactions import check_composition, declare
from antimemo.callbacks.monitor import _evaluation_due, _log_and_record
from antimemo.functional.generation import sample_generate
from antimemo.functional.text_diversity import NgramCounts, RareNgrams, ngram_keys, rare_ngrams
from antimemo.metrics.text_diversity import TailCoverage, TextDiversity
from antimemo.probes import _attention_mask, cuda_in_use, get_rng_state, is_map_dataset
from antimemo.probes import module_modes, set_rng_state, token_ids

__all__ = ["DiversityMonitor"]

_NAME = "DiversityMonitor"
_SETTINGS = (
    "num_samples", "num_tokens", "prompt_length", "seed", "temperature", "top_k", "top_p", "ns", "tail_n",
    "rare_quantile", "probability_threshold", "max_heldout", "vocab_size",
)  # fmt: skip
_COUNT_CHUNK = 4096  # training rows counted per chunk


def _text_ids(item: Any, key: str, where: str) -> Tensor:
    """The text token ids of one item (positions with ``attention_mask`` 1 when it has one)."""
    ids = token_ids(item, key, where)
    mask = _attention_mask(item, ids, where)
    return ids if mask is None else ids[mask]


def _dataset_of(loaders: Any, what: str) -> Any:
    if isinstance(loaders, (list, tuple)) and len(loaders) == 1:
        loaders = loaders[0]
    if not isinstance(loaders, DataLoader) or not is_map_dataset(loaders.dataset):
        raise TypeError(
            f"{_NAME}: the {what} must be a single DataLoader over a map-style dataset (with __len__ and "
            f"__getitem__), got {type(loaders).__name__}; pass heldout=<dataset or list of 1-D tensors> for the "
            "held-out side"
        )
    return loaders.dataset


def _merge_counts(a: NgramCounts | None, b: NgramCounts) -> NgramCounts:
    if a is None:
        return b
    keys, inverse = torch.unique(torch.cat([a.keys, b.keys]), return_inverse=True)
    counts = torch.zeros(keys.numel(), dtype=torch.long).scatter_add_(0, inverse, torch.cat([a.counts, b.counts]))
    return NgramCounts(keys, counts, a.n, a.vocab_size)


def _logits(output: Any) -> Any:
    return output if isinstance(output, Tensor) else getattr(output, "logits", output)


class DiversityMonitor(Callback):
    """Log the diversity of sampled text and its coverage of the real data's tails.

    **Held-out data and rare n-grams (once, at fit start).** The held-out side is the validation
    dataset (``heldout="val"``) or the dataset / list of 1-D token tensors you pass; items are
    dicts holding ``input_ids_key`` (text positions only when they carry an
    ``attention_mask``) or 1-D token-id tensors. Up to ``max_heldout`` items with at least two
    tokens are drawn in the order of ``torch.randperm`` seeded with ``seed`` (a private
    generator). Every training item (``trainer.train_dataloader.dataset``) is read once and its
    ``tail_n``-grams counted; the rare n-grams are the held-out ``tail_n``-grams in the bottom
    ``rare_quantile`` by training count, ties at the threshold included
    (:func:`~antimemo.functional.text_diversity.rare_ngrams`). Counting reads the whole
    training set once, so its cost grows with it (about a second per ten million tokens).

    **Prompts.** The first ``prompt_length`` tokens of the drawn held-out items that are long
    enough, cycled to ``num_samples`` prompts.

    **Evaluation.** At ``on_validation_epoch_end`` of every ``every_n_epochs``-th epoch (never in
    the sanity check; and at every ``trainer.validate``), the model samples ``num_tokens`` tokens
    after each prompt (:func:`~antimemo.functional.sample_generate` with ``temperature``,
    ``top_k``, ``top_p``; rank ``r`` uses a generator seeded ``seed * 1_000_003 + r``, so each
    evaluation draws with the same random numbers), and one teacher-forced pass runs over the
    held-out items. Logged (``{p}`` = ``log_prefix``), from the generated tokens only (not the
    prompts):

    - ``{p}/distinct_{n}`` and ``{p}/entropy_{n}`` (nats) for each ``n`` in ``ns``;
    - ``{p}/tail_coverage``: fraction of the rare n-grams generated at least once;
    - ``{p}/tail_probability_coverage``: fraction of the rare n-grams the model gives a
      geometric-mean token probability ``>= probability_threshold`` in their held-out context;
    - ``{p}/heldout_loss``: mean token negative log-likelihood (nats/token) of the held-out items.

    **DDP.** Every rank reads the same data and builds the same rare set and prompts; rank ``r``
    samples prompts ``r, r + W, ...`` and scores held-out items ``r, r + W, ...``; the metrics
    gather their states (n-gram keys, per-rare-n-gram hits and best log-probs, loss sums), so
    every rank logs exactly the single-process values for the same generations.
    ``num_samples`` must be at least the number of ranks.

    **Side effects.** None: the train/eval mode of every submodule and the RNG states (torch CPU,
    CUDA when initialized, Python ``random``, NumPy) are restored; the evaluation runs under
    ``torch.inference_mode()``.

    Args:
        num_samples: generations per evaluation.
        num_tokens: tokens sampled per generation.
        prompt_length: held-out tokens given as the prompt.
        every_n_epochs: evaluate when ``(current_epoch + 1) % every_n_epochs == 0``.
        batch_size: rows per forward pass (sampling and the held-out pass).
        seed: seed of the held-out draw and of the sampling generators.
        temperature, top_k, top_p: the sampling scheme (see :func:`~antimemo.functional.sample_generate`).
        ns: n-gram lengths of distinct-n and entropy.
        tail_n: n-gram length of the rare n-grams.
        rare_quantile: the bottom quantile of held-out n-grams by training count, in ``(0, 1]``.
        probability_threshold: per-token probability of ``tail_probability_coverage``, in ``(0, 1]``.
        heldout: ``"val"`` or a map-style dataset / list of 1-D token tensors.
        max_heldout: held-out items used (``None``: all).
        model_attr: attribute of the LightningModule holding the causal LM (``None``: the module).
        input_ids_key: key of the token ids in dict items.
        vocab_size: n-gram key scheme (``None``: 64-bit hash; see
            :func:`~antimemo.functional.text_diversity.ngram_keys`).
        log_prefix: prefix of the logged keys.
        use_cache: sample with the KV cache.

    Attributes:
        rare: the :class:`~antimemo.functional.text_diversity.RareNgrams` (after preparation).
        prompts: ``[num_samples, prompt_length]`` LongTensor (CPU).
        heldout_indices: dataset indices of the held-out items used.
        last_results: floats of the last evaluation, keyed without ``log_prefix``.
        history: ``(epoch, global_step, results)`` per evaluation.

    Example:
        >>> monitor = DiversityMonitor(num_samples=64, num_tokens=64, prompt_length=16)
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[monitor])  # doctest: +SKIP
        >>> trainer.fit(module, datamodule=data)  # doctest: +SKIP
        >>> monitor.last_results["distinct_2"]  # doctest: +SKIP
    """

    declaration = declare("evaluation", domain="lm", repeatable=True, note="evaluates only; state saved/restored around it")

    def __init__(
        self,
        num_samples: int = 64,
        num_tokens: int = 64,
        prompt_length: int = 16,
        every_n_epochs: int = 1,
        batch_size: int = 32,
        seed: int = 0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        ns: Sequence[int] = (1, 2, 3, 4),
        tail_n: int = 2,
        rare_quantile: float = 0.1,
        probability_threshold: float = 0.01,
        heldout: Any = "val",
        max_heldout: int | None = 256,
        model_attr: str | None = "model",
        input_ids_key: str = "input_ids",
        vocab_size: int | None = None,
        log_prefix: str = "diversity",
        use_cache: bool = True,
    ) -> None:
        super().__init__()
        self.num_samples = check_int("num_samples", num_samples, 1, "generations per evaluation, e.g. 64")
        self.num_tokens = check_int("num_tokens", num_tokens, 1, "tokens sampled per generation, e.g. 64")
        self.prompt_length = check_int("prompt_length", prompt_length, 1, "held-out tokens per prompt, e.g. 16")
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, 1, "1 evaluates after every epoch")
        self.batch_size = check_int("batch_size", batch_size, 1, "rows per forward pass, e.g. 32")
        self.seed = check_int("seed", seed, 0, "e.g. seed=0")
        if not is_number(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; 1.0 samples the model's distribution")
        self.temperature = float(temperature)
        if top_k is not None and (not is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}; None keeps every token")
        self.top_k = None if top_k is None else int(top_k)
        if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}; None is no nucleus truncation")
        self.top_p = None if top_p is None else float(top_p)
        self.ns = TextDiversity(ns).ns  # the metric checks ns
        self.tail_n = check_int("tail_n", tail_n, 1, "the n-gram length of the rare n-grams, e.g. tail_n=2")
        if not is_number(rare_quantile) or not 0 < rare_quantile <= 1:
            raise ValueError(f"rare_quantile must be a number in (0, 1], got {rare_quantile!r}; 0.1 is the bottom decile")
        self.rare_quantile = float(rare_quantile)
        if not is_number(probability_threshold) or not 0 < probability_threshold <= 1:
            raise ValueError(
                f"probability_threshold must be a per-token probability in (0, 1], got {probability_threshold!r}; "
                "e.g. 0.01"
            )
        self.probability_threshold = float(probability_threshold)
        if isinstance(heldout, str) and heldout != "val":
            raise ValueError(f"heldout must be 'val', a map-style dataset or a list of 1-D tensors, got {heldout!r}")
        if not isinstance(heldout, str) and not is_map_dataset(heldout):
            raise TypeError(
                f"heldout must be 'val', a map-style dataset or a list of 1-D tensors, got {type(heldout).__name__}"
            )
        self.heldout = heldout
        if max_heldout is not None:
            check_int("max_heldout", max_heldout, 1, "or None to use every held-out item")
        self.max_heldout = max_heldout
        if model_attr is not None and (not isinstance(model_attr, str) or not model_attr):
            raise ValueError(f"model_attr must be a non-empty attribute name or None, got {model_attr!r}")
        self.model_attr = model_attr
        if not isinstance(input_ids_key, str) or not input_ids_key:
            raise ValueError(f"input_ids_key must be a non-empty string, got {input_ids_key!r}")
        self.input_ids_key = input_ids_key
        if vocab_size is not None:
            check_int("vocab_size", vocab_size, 1, "or None to hash the n-grams")
        self.vocab_size = vocab_size
        if not isinstance(log_prefix, str) or not log_prefix or log_prefix.endswith("/"):
            raise ValueError(f"log_prefix must be a non-empty string not ending in '/', got {log_prefix!r}")
        self.log_prefix = log_prefix
        if not isinstance(use_cache, bool):
            raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
        self.use_cache = use_cache
        self.rare: RareNgrams | None = None
        self.prompts: Tensor | None = None
        self.heldout_indices: list[int] | None = None
        self._heldout_rows: list[Tensor] = []
        self.last_results: dict[str, float] = {}
        self.history: list[tuple[int, int, dict[str, float]]] = []

    # ------------------------------------------------------------------------------ hooks

    @property
    def state_key(self) -> str:
        return self._generate_state_key(log_prefix=self.log_prefix, tail_n=self.tail_n, seed=self.seed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse callback combinations that do not compose."""
        check_composition(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the set-up; count the training n-grams and find the rare ones (when the held-out data exists)."""
        if not trainer.enable_validation:
            raise RuntimeError(
                f"{_NAME} runs at the end of validation, but this fit has no validation loop; define validation_step "
                "and a val_dataloader (any small held-out set works)"
            )
        self._model(pl_module)
        if self.heldout != "val" or trainer.val_dataloaders is not None:
            self._prepare(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate and log, unless sanity checking or not an evaluation epoch."""
        if not _evaluation_due(trainer, self.every_n_epochs):
            return
        if self.rare is None:
            self._prepare(trainer)  # heldout="val" before the val loader existed, or trainer.validate
        _log_and_record(self, trainer, pl_module, self._evaluate(trainer, pl_module))

    def state_dict(self) -> dict[str, Any]:
        """The settings and the evaluation history (plain values)."""
        settings = {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in _SETTINGS}
        return {"settings": settings, "history": [[int(e), int(s), dict(r)] for e, s, r in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history; warn when it was measured with other settings."""
        saved = state_dict.get("settings", {})
        current = self.state_dict()["settings"]
        changed = sorted(k for k in saved if k in current and saved[k] != current[k])
        if changed:
            rank_zero_warn(
                f"{_NAME}: the restored history was measured with other settings ("
                + ", ".join(f"{k}={saved[k]!r} now {current[k]!r}" for k in changed)
                + "); its values are not comparable with the new ones",
                category=UserWarning,
            )
        self.history = [(int(e), int(s), {str(k): float(v) for k, v in r.items()}) for e, s, r in state_dict.get("history", [])]
        self.last_results = dict(self.history[-1][2]) if self.history else {}

    # ---------------------------------------------------------------------------- preparation

    def _model(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        if self.model_attr is None:
            return pl_module
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, torch.nn.Module):
            raise AttributeError(
                f"{_NAME}(model_attr={self.model_attr!r}): {type(pl_module).__name__}.{self.model_attr} is "
                f"{type(model).__name__}, not a causal LM (torch.nn.Module); set model_attr to the attribute holding "
                "it, or model_attr=None to sample from the LightningModule itself"
            )
        return model

    def _train_dataset(self, trainer: pl.Trainer) -> Any:
        loader = trainer.train_dataloader
        datamodule = getattr(trainer, "datamodule", None)
        if loader is None and datamodule is not None and callable(getattr(datamodule, "train_dataloader", None)):
            loader = datamodule.train_dataloader()  # trainer.validate: the datamodule's training set
        return _dataset_of(loader, "training dataloader")

    def _heldout_dataset(self, trainer: pl.Trainer) -> Any:
        if self.heldout == "val":
            return _dataset_of(trainer.val_dataloaders, "validation dataloader (heldout='val')")
        return self.heldout

    def _prepare(self, trainer: pl.Trainer) -> None:
        rng = get_rng_state(cuda_in_use())
        try:
            self._prepare_data(trainer)
        finally:
            set_rng_state(rng)  # a dataset's __getitem__ may use the global RNGs

    def _prepare_data(self, trainer: pl.Trainer) -> None:
        key = self.input_ids_key
        held = self._heldout_dataset(trainer)
        order = torch.randperm(len(held), generator=torch.Generator().manual_seed(self.seed)).tolist()
        indices, rows = [], []
        for index in order:
            row = _text_ids(held[index], key, f"held-out dataset[{index}]")
            if row.numel() >= 2:
                indices.append(index)
                rows.append(row)
                if self.max_heldout is not None and len(rows) == self.max_heldout:
                    break
        long_enough = [r[: self.prompt_length] for r in rows if r.numel() >= self.prompt_length]
        if not long_enough:
            raise ValueError(
                f"{_NAME}(prompt_length={self.prompt_length}): none of the {len(rows)} held-out items drawn has "
                f"{self.prompt_length} tokens; lower prompt_length or use longer held-out items"
            )
        if self.num_samples < trainer.world_size:
            raise ValueError(
                f"{_NAME}(num_samples={self.num_samples}) has fewer generations than the {trainer.world_size} "
                f"processes; use num_samples >= {trainer.world_size}"
            )
        train = self._train_dataset(trainer)
        counts: NgramCounts | None = None
        chunk: list[Tensor] = []
        for index in range(len(train)):
            chunk.append(_text_ids(train[index], key, f"training dataset[{index}]"))
            if len(chunk) == _COUNT_CHUNK or index == len(train) - 1:
                keys, c = torch.unique(ngram_keys(chunk, self.tail_n, vocab_size=self.vocab_size), return_counts=True)
                counts = _merge_counts(counts, NgramCounts(keys, c.long(), self.tail_n, self.vocab_size))
                chunk = []
        if counts is None:
            raise ValueError(f"{_NAME}: the training dataset is empty; there is nothing to count the n-grams of")
        rare = rare_ngrams(rows, counts, self.tail_n, self.rare_quantile, vocab_size=self.vocab_size)
        if rare.keys.numel() == 0:
            raise ValueError(
                f"{_NAME}(tail_n={self.tail_n}): the {len(rows)} held-out items hold no {self.tail_n}-gram; use a "
                "smaller tail_n or longer held-out items"
            )
        self.rare, self.heldout_indices, self._heldout_rows = rare, indices, rows
        self.prompts = torch.stack([long_enough[i % len(long_enough)] for i in range(self.num_samples)])

    # ------------------------------------------------------------------------------ evaluation

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        assert self.rare is not None and self.prompts is not None
        model = self._model(pl_module)
        device = pl_module.device
        rank, world = trainer.global_rank, trainer.world_size
        modes = module_modes(pl_module, model)
        rng = get_rng_state(device.type == "cuda" or cuda_in_use())
        try:
            model.eval()
            with torch.inference_mode():
                diversity = TextDiversity(self.ns, vocab_size=self.vocab_size).to(device)
                tails = TailCoverage(self.rare, threshold=self.probability_threshold).to(device)
                generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + rank)
                shard = self.prompts[rank::world].to(device)
                generated = sample_generate(
                    model, shard, self.num_tokens, self.temperature, self.top_k, self.top_p, self.batch_size,
                    generator, use_cache=self.use_cache,
                )  # fmt: skip
                diversity.update(generated)
                tails.update(generated)
                for rows in self._heldout_batches(rank, world):
                    rows = rows.to(device)
                    tails.update_heldout(_logits(model(input_ids=rows)), rows)
                results = {k: float(v) for k, v in diversity.compute().items()}
                results.update({k: float(v) for k, v in tails.compute().items()})
        finally:
            for module, training in modes:
                module.training = training  # per module: Module.train() would recurse
            set_rng_state(rng)
        return results

    def _heldout_batches(self, rank: int, world: int) -> list[Tensor]:
        """This rank's held-out items, stacked in batches of equal length (at most ``batch_size`` rows)."""
        by_length: dict[int, list[Tensor]] = {}
        for row in self._heldout_rows[rank::world]:
            by_length.setdefault(row.numel(), []).append(row)
        return [
            torch.stack(group[i : i + self.batch_size])
            for _, group in sorted(by_length.items())
            for i in range(0, len(group), self.batch_size)
        ]
