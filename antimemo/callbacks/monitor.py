"""``MemorizationMonitor``: measure verbatim memorization (and membership inference) in training.

At the end of validation the callback prompts the model with the prefix of each of a fixed set
of training sequences ("probes"), decodes greedily, and scores the generated suffix against the
true one with :class:`~antimemo.metrics.ExtractableMemorization`. Optionally it also scores
membership-inference attacks with :class:`~antimemo.metrics.MembershipInference`. Results are
logged through ``pl_module.log`` so that they reach every logger and
``trainer.callback_metrics`` (usable by ``EarlyStopping`` and ``ModelCheckpoint``).

See ``docs/monitor.md`` for the protocol, every argument and the cost.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader

from antimemo._checks import check_int
from antimemo.callbacks._monitor_cost import EvaluationCost
from antimemo.metrics.discoverable import DiscoverableExtraction
from antimemo.metrics.membership import MembershipInference
from antimemo.probes import (
    ATTENTION_MASK_KEY,
    MIA_SCORES as _MIA_SCORES,
    ProbeScorer,
    _is_integer_dtype,
    draw_probes,
    fetch_probes,
)
from antimemo.probes import cuda_in_use as _cuda_in_use
from antimemo.probes import get_rng_state as _get_rng_state
from antimemo.probes import is_map_dataset as _is_map_dataset
from antimemo.probes import module_modes as _module_modes
from antimemo.probes import set_rng_state as _set_rng_state
from antimemo.callbacks._interactions import declare
from antimemo.probes_untargeted import UntargetedConfig, UntargetedEvaluator

__all__ = ["MemorizationMonitor"]

_NAME = "MemorizationMonitor"
#: Default ``decode_every_n_evaluations``: the full greedy decode at every 5th evaluation (and at
#: the last epoch), the teacher-forced fast path at the others (docs/benchmarks.md, "fast path").
DECODE_EVERY_N_EVALUATIONS = 5
#: Keys a ``discoverable`` mapping may hold: the sampling arguments of ``DiscoverableExtraction``.
_DISCOVERABLE_KEYS = ("ns", "ps", "temperature", "top_k", "top_p")


# ------------------------------------------------------------------------------------ helpers
# Drawing, decoding and scoring live in the Lightning-free ``antimemo.probes``; this module is the
# Lightning glue. ``_cuda_in_use``, ``_get_rng_state``, ``_set_rng_state`` and ``_module_modes``
# keep their names here for the other monitors that import them.


def _is_val(holdout: Any) -> bool:
    return isinstance(holdout, str) and holdout == "val"


def _loader_dataset(loaders: Any, what: str, fix: str) -> Any:
    if isinstance(loaders, (list, tuple)) and len(loaders) == 1:
        loaders = loaders[0]
    if not isinstance(loaders, DataLoader):
        raise TypeError(
            f"{_NAME}: the {what} must be a single torch DataLoader to draw examples from, got "
            f"{type(loaders).__name__}; {fix}"
        )
    dataset = loaders.dataset
    if not _is_map_dataset(dataset):
        raise TypeError(
            f"{_NAME}: the {what}'s dataset ({type(dataset).__name__}) is not a map-style dataset "
            f"(with __len__ and __getitem__), so examples cannot be drawn by index; {fix}"
        )
    return dataset


def _silence_epoch_sync_warning(name: str) -> None:
    """Lightning advises ``sync_dist=True`` for every epoch-level value logged under DDP. Ours
    are already synced by the metric (identical on every rank), so the advice does not apply:
    ignore it for exactly our keys (an identical filter is replaced, so the list never grows)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    warnings.filterwarnings(
        "ignore",
        message=rf"It is recommended to use `self\.log\({re.escape(repr(name))}, \.\.\., sync_dist",
    )


# ----------------------------------------------------------------------------------- callback


def _evaluation_due(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """True at the end of a real fitting validation (not the sanity check) of an evaluation epoch,
    and at the end of every ``trainer.validate(...)`` (an audit of a finished model)."""
    if trainer.sanity_checking:
        return False
    if trainer.state.fn == TrainerFn.VALIDATING:
        return True
    if trainer.state.fn != TrainerFn.FITTING:
        return False
    return (trainer.current_epoch + 1) % every_n_epochs == 0


def _log_and_record(monitor: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, results: dict[str, float]) -> None:
    """Log ``{monitor.log_prefix}/{key}`` for every figure (epoch-level, already synced: the
    metrics gather across ranks), then keep them in ``monitor.last_results`` and ``monitor.history``."""
    for key, value in results.items():
        name = f"{monitor.log_prefix}/{key}"
        _silence_epoch_sync_warning(name)
        pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)
    monitor.last_results = results
    monitor.history.append((int(trainer.current_epoch), int(trainer.global_step), dict(results)))


class MemorizationMonitor(Callback):
    """Log extractable memorization of a fixed set of training probes at the end of validation.

    **Probes.** At ``on_train_start`` the callback draws ``num_probes`` examples from the training
    dataset (``trainer.train_dataloader.dataset``, map-style; items are dicts holding
    ``input_ids_key`` or 1-D token-id tensors, of any length). It walks
    ``torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))`` and keeps the
    first ``num_probes`` examples with at least ``prefix_length + suffix_length`` tokens; a probe
    is the first ``prefix_length + suffix_length`` tokens of its example. A dict item that also
    holds an ``"attention_mask"`` is probed on its text only: its window starts at the first
    position with mask 1 and must hold no mask-0 (padding) position, else the item is skipped.
    Too few eligible examples raise a ``ValueError`` that counts them and says why the others
    were skipped. The global RNG is never consumed. Alternatively pass ``probes=`` yourself.
    The drawing, decoding and scoring are the Lightning-free :mod:`antimemo.probes`.

    **Degenerate suffixes.** With ``min_distinct_suffix_tokens=n > 1`` the draw also skips
    examples whose suffix has fewer than ``n`` distinct token ids: rule lines (``"-----"``),
    padding-like runs of spaces, table borders. Greedy decoding continues such a run from its
    prefix whether or not the example was memorized (the "reconstruction" category of Prashanth
    et al. 2024, *Recite, Reconstruct, Recollect*), so they inflate exact match for any model.
    The same rule applies to the MIA members and non-members. The default (1) keeps every
    example; explicit ``probes=`` are never filtered.

    **Evaluation.** At ``on_validation_epoch_end`` of every ``every_n_epochs``-th epoch (never in
    the sanity check, only while fitting), the model greedily decodes ``suffix_length`` tokens
    from each prefix (:func:`~antimemo.functional.greedy_generate`, batched, KV cache) and
    :class:`~antimemo.metrics.ExtractableMemorization` scores them. These keys are logged with
    ``pl_module.log(..., sync_dist=False)`` (the metric already synced across ranks):

    - ``{log_prefix}/exact_match``: fraction of probes whose whole suffix is reproduced,
    - ``{log_prefix}/token_match``: mean fraction of suffix positions reproduced,
    - ``{log_prefix}/near_verbatim``: fraction with edit similarity >= ``near_verbatim_threshold``,
    - with ``holdout``: ``{log_prefix}/mia/{score}/auc``, ``.../tpr_at_1pct_fpr`` and
      ``.../tpr_at_0.1pct_fpr`` for each score in ``mia_scores``.

    **Fast path.** The full greedy decode runs at every ``decode_every_n_evaluations``-th
    evaluation (the first, then every n-th, counted over ``history``) and at every evaluation of
    the fit's last epoch (``max_epochs``). The other evaluations run one teacher-forced forward
    per batch instead and log ``exact_match`` from it: greedy decoding reproduces a suffix iff
    the argmax at every suffix position, under the true preceding tokens, is the true token
    (:func:`~antimemo.functional.teacher_forced_greedy_match`; equal up to float near-ties of
    the top two logits). ``token_match`` and ``near_verbatim`` need the decoded tokens, so they
    are logged only at decoding evaluations (``trainer.callback_metrics`` keeps the last value).
    With ``discoverable`` set, every evaluation also logs, from the teacher-forced logits
    (:class:`~antimemo.metrics.DiscoverableExtraction`): ``{log_prefix}/reproduced_length`` (mean
    leading suffix tokens greedy decoding reproduces), ``{log_prefix}/discoverable/n{n}_p{p}``
    (fraction of probes with ``1 - (1 - p_z)^n >= p``, ``p_z`` the probability that the sampling
    scheme emits the true suffix; Hayes et al. 2024) and
    ``{log_prefix}/discoverable/median_log10_pz``.

    **Membership inference** (``holdout`` given). Members and non-members are sequences of
    ``prefix_length + suffix_length`` tokens drawn like the probes (same seed, same length rule),
    equally many of each: ``min(#eligible members, #eligible non-members, num_probes)``. One
    no-grad forward pass per batch gives per-token log-probs
    (:func:`~antimemo.functional.token_logprob_stats`). For the ``zlib`` score the text of a
    sequence is ``decode(ids)`` when ``decode`` is given, else the bytes of its token ids written
    as int32 little-endian (``np.asarray(ids, "<i4").tobytes()``): a tokenizer-free
    compressibility proxy, not comparable to zlib scores computed on real text.

    **DDP.** Every rank draws the same probes and evaluates the shard
    ``probes[rank::world_size]``; the metrics' ``compute()`` gathers all shards, so every rank
    logs the same values. There must be at least as many probes (and MIA sequences, members plus
    non-members) as ranks.

    **Side effects.** None: the train/eval mode of every submodule and the RNG states (torch CPU,
    CUDA when initialized, Python ``random``, NumPy) are restored after each evaluation, which
    runs under ``torch.inference_mode()``.

    **Cost.** An evaluation costs a fixed amount of decoding (about 4 training steps for the LM
    recipe's model at the defaults), so its share of training time depends on the epoch length.
    The callback times every evaluation (``evaluation_seconds``) and warns once per fit, naming the
    ``every_n_epochs`` that would do, when one takes more than 10% of the fit time since the
    previous one. When the MIA members are exactly the probes (the default draw with ``holdout``),
    one teacher-forced pass per batch serves both: the prefix is run once with the KV cache,
    the true suffix on top of it gives the member log-probs, the cache is cropped back to the
    prefix and greedy decoding continues
    (:func:`~antimemo.functional.generation.greedy_generate_with_logits`).

    Args:
        num_probes: Number of training probes to draw (ignored when ``probes`` is given); also
            the cap on the number of members and of non-members for MIA.
        prefix_length: Tokens of context given to the model.
        suffix_length: Tokens generated and compared with the true continuation.
        every_n_epochs: Evaluate when ``(current_epoch + 1) % every_n_epochs == 0`` (and
            validation runs in that epoch).
        batch_size: Probes decoded (and MIA sequences scored) per forward pass.
        holdout: ``None`` (no MIA); ``"val"`` (non-members drawn from the validation dataset,
            members from the training dataset); a map-style dataset of non-members (members from
            the training dataset); or ``{"members": ..., "non_members": ...}`` (datasets, lists of
            1-D tensors, or 2-D LongTensors).
        seed: Seed of the draws (a private ``torch.Generator``).
        probes: Explicit probes: a LongTensor ``[N, prefix_length + suffix_length]`` or a list of
            1-D tensors of exactly ``prefix_length + suffix_length`` tokens.
        near_verbatim_threshold: Edit-similarity threshold of ``near_verbatim``, in ``[0, 1]``.
        model_attr: Attribute of the LightningModule holding the causal LM (``"model"``), or
            ``None`` to call the LightningModule itself.
        input_ids_key: Key of the token ids in dict dataset items.
        mia_scores: MIA scores to report, a subset of
            ``("loss", "zlib", "min_k", "min_k_plus_plus")``.
        decode: Optional ``Callable[[list[int]], str | bytes]`` giving the text of a sequence for
            the zlib score (e.g. ``tokenizer.decode``). Must be picklable for ``ddp_spawn``.
        log_prefix: Prefix of the logged keys.
        use_cache: Decode with the KV cache (``model(..., past_key_values=..., use_cache=True)``);
            ``False`` for models without one (slower: the whole sequence is re-run per token).
        probe_dataset: Draw the probes from ``trainer.datamodule.<probe_dataset>`` instead of the
            training dataloader's dataset, e.g. ``"duplicated_dataset"`` of
            :class:`~antimemo.lm.TextDataModule` (the distinct duplicated training sequences; use
            a second monitor with another ``log_prefix``). MIA members still come from the
            training dataset.
        min_distinct_suffix_tokens: Draw only examples whose suffix (the last ``suffix_length``
            of the probe's tokens) holds at least this many distinct token ids, ``1 <= n <=
            suffix_length``; 1 (default) keeps every example. docs/results.md measures goldfish with 8
            (``--monitor.min_distinct_suffix_tokens 8``, a quarter of the recipe's 32-byte
            suffix), which leaves out the ASCII-table rows and rule lines of its corpus.
        decode_every_n_evaluations: Run the full greedy decode (``token_match``,
            ``near_verbatim``) at every n-th evaluation and in the last epoch; the others score
            ``exact_match`` from one teacher-forced pass (see *Fast path*). 1 decodes every time
            (the behaviour before this argument existed). The default, 5, keeps the defaults
            under 10% of the fit on the LM recipe's 16-step epochs (docs/benchmarks.md).
        discoverable: ``False`` (default): no new keys. ``True``: also log ``reproduced_length``
            and the ``discoverable/*`` keys of :class:`~antimemo.metrics.DiscoverableExtraction`
            at its defaults (``ns=(1, 10, 100, 1000)``, ``ps=(0.5, 0.9)``, temperature 1, no
            truncation); a dict of its arguments (``ns``, ``ps``, ``temperature``, ``top_k``,
            ``top_p``) sets the attacker's sampling scheme.

    Attributes:
        probes: LongTensor ``[N, prefix_length + suffix_length]`` (CPU) once drawn.
        probe_indices: Training-dataset indices of the probes (``None`` when ``probes`` was given).
        mia_member_indices: Indices of the MIA members in their dataset (``None`` without MIA).
        mia_non_member_indices: Indices of the MIA non-members in their dataset.
        last_results: Floats of the last evaluation, keyed without ``log_prefix``
            (``"exact_match"``, ``"mia/loss/auc"``, ...).
        history: List of ``(epoch, global_step, results)`` tuples, one per evaluation.
        evaluation_seconds: Wall time of each evaluation in seconds (not checkpointed).

    Raises:
        ValueError / TypeError: at construction, for an invalid argument; at ``on_train_start``,
            when there is no validation loop, ``model_attr`` is missing, the training data is
            not a map-style dataset, or too few examples are long enough.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.callbacks import EarlyStopping
        >>> monitor = MemorizationMonitor(num_probes=64, prefix_length=32, suffix_length=32)
        >>> # stop once more than 5% of the probes are reproduced verbatim
        >>> stop = EarlyStopping(monitor="memorization/exact_match", mode="min",
        ...                      divergence_threshold=0.05, patience=10**9)
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[monitor, stop])  # doctest: +SKIP
        >>> trainer.fit(module, datamodule=data)  # doctest: +SKIP
        >>> monitor.last_results["exact_match"]  # doctest: +SKIP
        0.015625
    """

    declaration = declare("evaluation", domain="lm", repeatable=True, note="evaluates only; state saved/restored around it")

    def __init__(
        self,
        num_probes: int = 64,
        prefix_length: int = 32,
        suffix_length: int = 32,
        every_n_epochs: int = 1,
        batch_size: int = 32,
        holdout: Any = None,
        seed: int = 0,
        probes: Tensor | Sequence[Tensor] | None = None,
        near_verbatim_threshold: float = 0.9,
        model_attr: str | None = "model",
        input_ids_key: str = "input_ids",
        mia_scores: Sequence[str] = _MIA_SCORES,
        decode: Callable[[list[int]], str | bytes] | None = None,
        log_prefix: str = "memorization",
        use_cache: bool = True,
        probe_dataset: str | None = None,
        min_distinct_suffix_tokens: int = 1,
        decode_every_n_evaluations: int = DECODE_EVERY_N_EVALUATIONS,
        discoverable: bool | Mapping[str, Any] = False,
        untargeted: bool | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.num_probes = check_int("num_probes", num_probes, 1, "e.g. num_probes=64")
        self.prefix_length = check_int(
            "prefix_length", prefix_length, 1, "it is the number of context tokens, e.g. 32"
        )
        self.suffix_length = check_int(
            "suffix_length", suffix_length, 1, "it is the number of generated tokens, e.g. 32"
        )
        self.every_n_epochs = check_int(
            "every_n_epochs", every_n_epochs, 1, "1 evaluates after every epoch"
        )
        self.batch_size = check_int(
            "batch_size", batch_size, 1, "it is the number of probes per forward pass, e.g. 32"
        )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        if (
            isinstance(near_verbatim_threshold, bool)
            or not isinstance(near_verbatim_threshold, (int, float))
            or not 0.0 <= float(near_verbatim_threshold) <= 1.0
        ):
            raise ValueError(
                "near_verbatim_threshold must be a number in [0, 1], got "
                f"{near_verbatim_threshold!r}; 0.9 counts a suffix as near-verbatim when its edit "
                "similarity is >= 90%"
            )
        self.near_verbatim_threshold = float(near_verbatim_threshold)
        if model_attr is not None and (not isinstance(model_attr, str) or not model_attr):
            raise ValueError(
                f"model_attr must be a non-empty attribute name or None, got {model_attr!r}; "
                "None generates with the LightningModule itself"
            )
        self.model_attr = model_attr
        if not isinstance(input_ids_key, str) or not input_ids_key:
            raise ValueError(f"input_ids_key must be a non-empty string, got {input_ids_key!r}")
        self.input_ids_key = input_ids_key
        if isinstance(mia_scores, str) or not isinstance(mia_scores, Sequence) or not mia_scores:
            raise ValueError(
                f"mia_scores must be a non-empty sequence of names from {_MIA_SCORES}, got "
                f"{mia_scores!r}"
            )
        unknown = [s for s in mia_scores if s not in _MIA_SCORES]
        if unknown or len(set(mia_scores)) != len(mia_scores):
            raise ValueError(
                f"mia_scores must be distinct names from {_MIA_SCORES}, got {tuple(mia_scores)!r}"
                + (f" (unknown: {unknown})" if unknown else " (duplicates)")
            )
        self.mia_scores = tuple(mia_scores)
        if decode is not None and not callable(decode):
            raise TypeError(
                "decode must be a callable (e.g. tokenizer.decode) or None, got "
                f"{type(decode).__name__}"
            )
        self.decode = decode
        if not isinstance(log_prefix, str) or not log_prefix or log_prefix.endswith("/"):
            raise ValueError(
                f"log_prefix must be a non-empty string not ending in '/', got {log_prefix!r}; "
                "keys are logged as f'{log_prefix}/exact_match'"
            )
        self.log_prefix = log_prefix
        if not isinstance(use_cache, bool):
            raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
        self.use_cache = use_cache
        if probe_dataset is not None and (not isinstance(probe_dataset, str) or not probe_dataset.isidentifier()):
            raise ValueError(
                f"probe_dataset must be None or the name of a datamodule attribute, got {probe_dataset!r}; "
                "e.g. probe_dataset='duplicated_dataset'"
            )
        self.probe_dataset = probe_dataset
        self.min_distinct_suffix_tokens = check_int(
            "min_distinct_suffix_tokens",
            min_distinct_suffix_tokens,
            1,
            "1 keeps every example; e.g. 8 skips suffixes that are runs of a few repeated tokens",
        )
        if self.min_distinct_suffix_tokens > self.suffix_length:
            raise ValueError(
                f"min_distinct_suffix_tokens={min_distinct_suffix_tokens} can never be met by a suffix "
                f"of suffix_length={suffix_length} tokens; use a value <= {suffix_length} "
                "(1 keeps every example)"
            )
        self.holdout = self._check_holdout(holdout)
        self.decode_every_n_evaluations = check_int(
            "decode_every_n_evaluations",
            decode_every_n_evaluations,
            1,
            "1 decodes greedily at every evaluation; e.g. 5 decodes at every 5th and scores exact "
            "match from one teacher-forced pass at the others",
        )
        self.discoverable = self._check_discoverable(discoverable)
        self.untargeted = UntargetedConfig.from_argument(untargeted)
        self._untargeted_eval: UntargetedEvaluator | None = None

        self._explicit_probes = probes is not None
        self.probes: Tensor | None = self._check_probes(probes) if probes is not None else None
        self.probe_indices: list[int] | None = None
        self.mia_member_indices: list[int] | None = None
        self.mia_non_member_indices: list[int] | None = None
        self._mia_members: Tensor | None = None
        self._mia_non_members: Tensor | None = None
        self.last_results: dict[str, float] = {}
        self.history: list[tuple[int, int, dict[str, float]]] = []
        self._cost = EvaluationCost(_NAME)

    @property
    def evaluation_seconds(self) -> list[float]:
        """Wall time of every evaluation of this callback object, in seconds (not checkpointed)."""
        return self._cost.seconds

    # -------------------------------------------------------------------- argument checks

    @property
    def probe_length(self) -> int:
        """Tokens per probe: ``prefix_length + suffix_length``."""
        return self.prefix_length + self.suffix_length

    @staticmethod
    def _check_holdout(holdout: Any) -> Any:
        if holdout is None or _is_val(holdout):
            return holdout
        if isinstance(holdout, str):
            raise ValueError(
                "holdout must be None, 'val', a dataset of non-members or a dict with 'members' "
                f"and 'non_members', got the string {holdout!r}"
            )
        if isinstance(holdout, Mapping):
            if set(holdout) != {"members", "non_members"}:
                raise ValueError(
                    "holdout as a dict must have exactly the keys 'members' and 'non_members', "
                    f"got {sorted(map(str, holdout))}"
                )
            for name in ("members", "non_members"):
                if not _is_map_dataset(holdout[name]):
                    raise TypeError(
                        f"holdout[{name!r}] must be a map-style dataset (with __len__ and "
                        "__getitem__), a list of 1-D tensors or a 2-D LongTensor, got "
                        f"{type(holdout[name]).__name__}"
                    )
            return holdout
        if not _is_map_dataset(holdout):
            raise TypeError(
                "holdout must be None, 'val', a map-style dataset of non-members (with __len__ "
                "and __getitem__) or a dict with 'members' and 'non_members', got "
                f"{type(holdout).__name__}"
            )
        return holdout

    @staticmethod
    def _check_discoverable(discoverable: Any) -> dict[str, Any] | None:
        """``None`` (off) or the keyword arguments of ``DiscoverableExtraction`` (``{}`` for
        ``True``), checked now by building the metric once."""
        if isinstance(discoverable, bool):
            return {} if discoverable else None
        if not isinstance(discoverable, Mapping):
            raise TypeError(
                f"discoverable must be a bool or a dict of sampling arguments, got "
                f"{type(discoverable).__name__}; e.g. discoverable=True or "
                "discoverable={'temperature': 1.0, 'top_k': 40, 'ns': (1, 100)}"
            )
        unknown = sorted(str(k) for k in discoverable if k not in _DISCOVERABLE_KEYS)
        if unknown:
            raise ValueError(
                f"discoverable has unknown keys {unknown}; the allowed keys are {list(_DISCOVERABLE_KEYS)} "
                "(the arguments of antimemo.metrics.DiscoverableExtraction)"
            )
        kwargs = dict(discoverable)
        try:
            DiscoverableExtraction(**kwargs)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{_NAME}(discoverable={discoverable!r}): {error}") from None
        return kwargs

    def _check_probes(self, probes: Any) -> Tensor:
        need = self.probe_length
        fix = (
            f"each probe must have prefix_length + suffix_length = {self.prefix_length} + "
            f"{self.suffix_length} = {need} tokens; slice them (e.g. probes[:, :{need}]) or "
            "change prefix_length / suffix_length"
        )
        if isinstance(probes, Tensor):
            if probes.dim() != 2 or probes.shape[1] != need or probes.shape[0] < 1:
                raise ValueError(
                    f"probes must have shape [N >= 1, {need}], got {tuple(probes.shape)}; {fix}"
                )
            if not _is_integer_dtype(probes.dtype):
                raise TypeError(
                    f"probes must hold integer token ids, got dtype {probes.dtype}; use "
                    "probes.long()"
                )
            return probes.detach().to("cpu", torch.long).clone()
        if (
            isinstance(probes, (str, bytes, Mapping))
            or not isinstance(probes, Sequence)
            or not probes
        ):
            raise TypeError(
                f"probes must be a LongTensor [N, {need}] or a non-empty list of 1-D tensors, got "
                f"{type(probes).__name__}"
            )
        rows = []
        for i, row in enumerate(probes):
            if not isinstance(row, Tensor) or row.dim() != 1:
                shape = tuple(row.shape) if isinstance(row, Tensor) else type(row).__name__
                raise ValueError(f"probes[{i}] must be a 1-D tensor, got {shape}; {fix}")
            if row.numel() != need:
                raise ValueError(f"probes[{i}] has {row.numel()} tokens; {fix}")
            if not _is_integer_dtype(row.dtype):
                raise TypeError(f"probes[{i}] must hold integer token ids, got dtype {row.dtype}")
            rows.append(row.detach().to("cpu", torch.long))
        return torch.stack(rows)

    def _model(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        if self.model_attr is None:
            return pl_module
        owner = type(pl_module).__name__
        model = getattr(pl_module, self.model_attr, None)
        if model is None:
            raise AttributeError(
                f"{_NAME}(model_attr={self.model_attr!r}): {owner} has no attribute "
                f"{self.model_attr!r} (or it is None); set model_attr to the attribute holding "
                "the causal LM, or model_attr=None to generate with the LightningModule itself"
            )
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"{_NAME}(model_attr={self.model_attr!r}): {owner}.{self.model_attr} must be a "
                f"torch.nn.Module (a causal LM), got {type(model).__name__}"
            )
        return model

    # -------------------------------------------------------------------- Lightning hooks

    @property
    def state_key(self) -> str:
        keys: dict[str, Any] = dict(
            log_prefix=self.log_prefix,
            num_probes=self.num_probes,
            prefix_length=self.prefix_length,
            suffix_length=self.suffix_length,
            seed=self.seed,
        )
        if self.min_distinct_suffix_tokens != 1:  # another draw: keep older checkpoints' keys
            keys["min_distinct_suffix_tokens"] = self.min_distinct_suffix_tokens
        return self._generate_state_key(**keys)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the set-up and draw (or restore) the probes and the MIA sequences."""
        if not trainer.enable_validation:
            reasons = []
            if not is_overridden("validation_step", pl_module):
                reasons.append(f"{type(pl_module).__name__} does not override validation_step")
            if not trainer.limit_val_batches:
                reasons.append(f"limit_val_batches={trainer.limit_val_batches!r}")
            if not reasons:
                reasons.append(
                    "no val_dataloader was given (to fit, the LightningModule or the datamodule)"
                )
            raise RuntimeError(
                f"{_NAME} runs at the end of validation, but this fit has no validation loop: "
                + "; ".join(reasons)
                + ". Define validation_step and a val_dataloader (any small held-out set works)."
            )
        self._model(pl_module)  # fail now, not after the first epoch, when model_attr is wrong
        rng = _get_rng_state(_cuda_in_use())
        try:
            self._prepare_probes(trainer)
            if self.holdout is not None and (
                not _is_val(self.holdout) or trainer.val_dataloaders is not None
            ):
                self._prepare_mia(trainer)
        finally:
            _set_rng_state(rng)  # a dataset's __getitem__ may use the global RNGs
        if self.probes.shape[0] < trainer.world_size:
            raise ValueError(
                f"{_NAME} has {self.probes.shape[0]} probes for {trainer.world_size} processes; "
                f"every rank needs at least one probe: use num_probes >= {trainer.world_size}"
            )
        self._prepare_untargeted(trainer, pl_module)
        self._cost.start()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """In ``trainer.validate(...)`` (an audit), draw the probes from the datamodule's training set."""
        if trainer.state.fn != TrainerFn.VALIDATING:
            return
        self._model(pl_module)
        rng = _get_rng_state(_cuda_in_use())
        try:
            if self.probes is None or self.probe_indices is not None:
                self._prepare_probes(trainer)
            if self.holdout is not None:
                self._prepare_mia(trainer)
        finally:
            _set_rng_state(rng)
        self._prepare_untargeted(trainer, pl_module)

    def _prepare_untargeted(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.untargeted is None or self._untargeted_eval is not None:
            return
        if _is_val(self.holdout) and trainer.val_dataloaders is None:
            return  # holdout="val" before the val loader exists: prepared at the first evaluation
        holdout = None if self.holdout is None else self._mia_sources(trainer)[1]
        config = getattr(self._model(pl_module), "config", None)
        self._untargeted_eval = UntargetedEvaluator(
            self.untargeted, self._train_dataset(trainer), holdout, key=self.input_ids_key,
            bos_id=getattr(config, "bos_token_id", None),
        )  # fmt: skip

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate and log, unless sanity checking, not fitting, or not an evaluation epoch."""
        if not _evaluation_due(trainer, self.every_n_epochs):
            return
        if self.probes is None:
            raise RuntimeError(
                f"{_NAME} has no probes: neither on_train_start nor (in trainer.validate) on_validation_start ran. Pass the callback to the "
                "Trainer before trainer.fit(...)"
            )
        began = self._cost.clock()
        _log_and_record(self, trainer, pl_module, self._evaluate(trainer, pl_module))
        if trainer.state.fn != TrainerFn.FITTING:
            return  # an audit: no fit whose time the evaluation shares
        message = self._cost.evaluated(began, self.every_n_epochs, cycle=self.decode_every_n_evaluations)
        if message is not None:
            rank_zero_warn(message, category=UserWarning)

    def state_dict(self) -> dict[str, Any]:
        """Probe and MIA indices and the history (plain Python values, ``weights_only``-safe)."""

        def copy(indices: list[int] | None) -> list[int] | None:
            return None if indices is None else list(indices)

        return {
            "probe_indices": copy(self.probe_indices),
            "mia_member_indices": copy(self.mia_member_indices),
            "mia_non_member_indices": copy(self.mia_non_member_indices),
            "history": [(epoch, step, dict(r)) for epoch, step, r in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore indices and history; the next ``on_train_start`` re-reads those examples."""

        def as_list(value: Any) -> list[int] | None:
            if value is None:
                return None
            if isinstance(value, Tensor):
                value = value.tolist()
            return [int(v) for v in value]

        self.probe_indices = as_list(state_dict.get("probe_indices"))
        self.mia_member_indices = as_list(state_dict.get("mia_member_indices"))
        self.mia_non_member_indices = as_list(state_dict.get("mia_non_member_indices"))
        self.history = [
            (int(epoch), int(step), {k: float(v) for k, v in results.items()})
            for epoch, step, results in state_dict.get("history", [])
        ]
        self.last_results = dict(self.history[-1][2]) if self.history else {}
        if not self._explicit_probes:
            self.probes = None  # re-read from the dataset at on_train_start
        self._mia_members = self._mia_non_members = None

    # -------------------------------------------------------------------- drawing

    def _train_dataset(self, trainer: pl.Trainer) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        if trainer.train_dataloader is None and trainer.state.fn == TrainerFn.VALIDATING and datamodule is not None:
            # an audit (trainer.validate): the datamodule's training set, in the order fit would see it
            if getattr(datamodule, "train_dataset", None) is None:
                datamodule.setup("fit")
            return _loader_dataset(
                datamodule.train_dataloader(),
                "datamodule's training dataloader",
                "pass probes= (and, for MIA, holdout={'members': ..., 'non_members': ...})",
            )
        return _loader_dataset(
            trainer.train_dataloader,
            "training dataloader",
            "pass probes= (and, for MIA, holdout={'members': ..., 'non_members': ...})",
        )

    def _named_dataset(self, trainer: pl.Trainer) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        dataset = getattr(datamodule, self.probe_dataset, None) if datamodule is not None else None
        if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"{_NAME}(probe_dataset={self.probe_dataset!r}): trainer.datamodule "
                f"({type(datamodule).__name__}) has no map-style dataset attribute {self.probe_dataset!r} "
                f"(got {type(dataset).__name__}); e.g. TextDataModule(duplicates=8) provides "
                "'duplicated_dataset', or pass probe_dataset=None to probe the training set"
            )
        return dataset

    def _prepare_probes(self, trainer: pl.Trainer) -> None:
        if self._explicit_probes:
            return
        need, key = self.probe_length, self.input_ids_key
        dataset = self._train_dataset(trainer) if self.probe_dataset is None else self._named_dataset(trainer)
        if self.probe_indices is not None:
            self.probes = fetch_probes(dataset, self.probe_indices, need, key, "training dataset")
            return
        draw = draw_probes(dataset, self.num_probes, need, self.seed, key, "training dataset", **self._filter)
        if len(draw.indices) < self.num_probes:
            distinct = ""
            if self.min_distinct_suffix_tokens > 1:
                distinct = (
                    f" and at least min_distinct_suffix_tokens={self.min_distinct_suffix_tokens} "
                    "distinct token ids in their suffix"
                )
            padded = f" ({ATTENTION_MASK_KEY} 0 is padding, not text)" if draw.padded else ""
            raise ValueError(
                f"{_NAME}(num_probes={self.num_probes}) needs {self.num_probes} training examples "
                f"with at least prefix_length + suffix_length = {self.prefix_length} + "
                f"{self.suffix_length} = {need} tokens{distinct}, but only {len(draw.indices)} of the "
                f"{len(dataset)} training examples qualify "
                f"({draw.reasons(need, self.min_distinct_suffix_tokens)}){padded}; lower num_probes, "
                "prefix_length, suffix_length" + (" or min_distinct_suffix_tokens" if distinct else "")
                + ", or pass probes="
            )
        self.probe_indices = draw.indices
        self.probes = torch.stack(draw.rows)

    @property
    def _filter(self) -> dict[str, int]:
        """The probe filter's keyword arguments of :func:`~antimemo.probes.draw_probes` (used by
        every draw alike)."""
        return {"suffix_length": self.suffix_length, "min_distinct": self.min_distinct_suffix_tokens}

    def _mia_sources(self, trainer: pl.Trainer) -> tuple[Any, Any]:
        if isinstance(self.holdout, Mapping):
            return self.holdout["members"], self.holdout["non_members"]
        members = self._train_dataset(trainer)
        if _is_val(self.holdout):
            non_members = _loader_dataset(
                trainer.val_dataloaders,
                "validation dataloader (holdout='val')",
                "pass holdout=<dataset of non-members> instead",
            )
            return members, non_members
        return members, self.holdout

    def _prepare_mia(self, trainer: pl.Trainer) -> None:
        need, key = self.probe_length, self.input_ids_key
        members_src, non_members_src = self._mia_sources(trainer)
        if self.mia_member_indices is not None and self.mia_non_member_indices is not None:
            self._mia_members = fetch_probes(members_src, self.mia_member_indices, need, key, "MIA member")
            self._mia_non_members = fetch_probes(
                non_members_src, self.mia_non_member_indices, need, key, "MIA non-member"
            )
            return
        m_idx, m_rows, *_ = draw_probes(
            members_src, self.num_probes, need, self.seed, key, "MIA member", **self._filter
        )
        n_idx, n_rows, *_ = draw_probes(
            non_members_src, self.num_probes, need, self.seed, key, "MIA non-member", **self._filter
        )
        count = min(len(m_idx), len(n_idx))
        if count == 0:
            raise ValueError(
                f"{_NAME}(holdout={self._holdout_name()}) found {len(m_idx)} member and "
                f"{len(n_idx)} non-member examples with at least prefix_length + suffix_length = "
                f"{need} tokens; MIA needs at least one of each: use longer examples or lower "
                "prefix_length / suffix_length"
            )
        if 2 * count < trainer.world_size:
            raise ValueError(
                f"{_NAME}: MIA has {count} members and {count} non-members for "
                f"{trainer.world_size} processes; every rank needs at least one sequence, so "
                "provide more holdout examples"
            )
        if count < self.num_probes:
            rank_zero_warn(
                f"{_NAME}: MIA uses {count} members and {count} non-members (not num_probes="
                f"{self.num_probes}): only {len(m_idx)} member and {len(n_idx)} non-member "
                f"examples have >= {need} tokens",
                category=UserWarning,
            )
        self.mia_member_indices, self.mia_non_member_indices = m_idx[:count], n_idx[:count]
        self._mia_members = torch.stack(m_rows[:count])
        self._mia_non_members = torch.stack(n_rows[:count])

    def _holdout_name(self) -> str:
        if isinstance(self.holdout, str):
            return repr(self.holdout)
        return type(self.holdout).__name__

    # -------------------------------------------------------------------- evaluation

    def _scorer(self) -> ProbeScorer:
        """The Lightning-free scorer, built from the current arguments (they may be changed
        after construction)."""
        return ProbeScorer(
            prefix_length=self.prefix_length,
            suffix_length=self.suffix_length,
            batch_size=self.batch_size,
            use_cache=self.use_cache,
            near_verbatim_threshold=self.near_verbatim_threshold,
            mia_scores=self.mia_scores,
            decode=self.decode,
            discoverable=self.discoverable,
        )

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        model = self._model(pl_module)
        device = pl_module.device
        rank, world = trainer.global_rank, trainer.world_size
        decode_now = self._decode_due(trainer)
        modes = _module_modes(pl_module, model)
        rng = _get_rng_state(device.type == "cuda" or _cuda_in_use())
        try:
            model.eval()
            if self.holdout is not None and self._mia_members is None:
                self._prepare_mia(trainer)  # holdout="val" before the val loader existed
            with torch.inference_mode():
                scorer = self._scorer()
                mia: MembershipInference | None = None
                if self.holdout is not None:
                    mia = scorer.new_membership_metric(device)
                shared = mia is not None and self._members_are_probes()
                # With ``shared``, one pass per chunk gives the greedy suffix *and* the member
                # MIA log-probs (the members are this rank's probes, the same share).
                # Between full decodes (decode_every_n_evaluations), one teacher-forced pass gives
                # the greedy exact match (and the members' log-probs, and p_z) without decoding.
                score = scorer.extraction if decode_now else scorer.teacher_forced
                results = score(
                    model, self.probes[rank::world], device, member_metric=mia if shared else None
                )
                if self.untargeted is not None and self._untargeted_eval is None:
                    self._prepare_untargeted(trainer, pl_module)
                if self._untargeted_eval is not None:
                    results.update(self._untargeted_eval.evaluate(model, device, rank, world))
                if mia is not None:
                    results.update(
                        scorer.membership(
                            model,
                            self._mia_members,
                            self._mia_non_members,
                            device,
                            mia,
                            rank=rank,
                            world=world,
                            members_scored=shared,
                        )
                    )
        finally:
            for module, training in modes:
                module.training = training  # per module: Module.train() would recurse
            _set_rng_state(rng)
        return results

    def _decode_due(self, trainer: pl.Trainer) -> bool:
        """True when this evaluation runs the full greedy decode: every
        ``decode_every_n_evaluations``-th evaluation counted from the first (by ``len(history)``,
        which is checkpointed, so a resumed fit keeps the cadence), and every evaluation in the
        fit's last epoch (``max_epochs``), so that a fit that runs to its end logs every key of its
        final model. An audit (``trainer.validate``) always decodes."""
        if getattr(getattr(trainer, "state", None), "fn", None) == TrainerFn.VALIDATING:
            return True
        if len(self.history) % self.decode_every_n_evaluations == 0:
            return True
        max_epochs = getattr(trainer, "max_epochs", None)
        return isinstance(max_epochs, int) and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs

    def _members_are_probes(self) -> bool:
        """True when the MIA members are exactly the probes (the usual case: same dataset, seed
        and length rule), so one teacher-forced pass serves both."""
        return self._scorer().members_are(self._mia_members, self.probes)
