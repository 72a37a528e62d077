"""Goldfish token dropout as a Lightning callback (Hans et al., 2024).

The callback rewrites the ``labels`` of every *training* batch before ``training_step`` sees
them: targets chosen by :func:`antimemo.functional.goldfish.goldfish_mask` are set to
``ignore_index``, so any loss that honours ``ignore_index`` (Hugging Face causal LMs given
``labels=``, ``torch.nn.functional.cross_entropy(..., ignore_index=...)``) skips them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from antimemo._checks import check_seed, is_int
from antimemo.callbacks._interactions import check_composition, declare
from antimemo.callbacks._seams import loss_seam, same_labels, track_use, was_used
from antimemo.dp.hf import find_causal_lms
from antimemo.functional.goldfish import (
    _check_exempt,
    _check_h,
    _check_k,
    _is_integer_dtype,
    goldfish_mask,
)

__all__ = ["GOLDFISH_PRETRAINING_PRESET", "GoldfishTokenDropout"]


def _fraction(counts: Tensor) -> Tensor:
    """``dropped / supervised`` from a ``[dropped, supervised]`` count tensor (0 when none)."""
    return counts[0].to(torch.float32) / counts[1].clamp_min(1).to(torch.float32)


def _silence_epoch_sync_warning(name: str) -> None:
    """Lightning advises ``sync_dist=True`` for epoch values logged under DDP; ours is already
    the global value (counts summed over ranks), so ignore the advice for exactly this key."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    warnings.filterwarnings(
        "ignore",
        message=rf"It is recommended to use `self\.log\({re.escape(repr(name))}, \.\.\., sync_dist",
    )


#: Goldfish settings for pretraining at scale, as used by Apertus (arXiv 2509.14233):
#: drop 1 target in 50 (2%), hashing the 50 preceding tokens.
GOLDFISH_PRETRAINING_PRESET: dict[str, int] = {"k": 50, "h": 50}


class GoldfishTokenDropout(pl.Callback):
    """Drop a deterministic ``1/k`` of training targets (goldfish loss).

    In ``on_train_batch_start`` the callback reads ``batch[input_ids_key]`` (and
    ``batch["attention_mask"]`` when present), computes
    ``goldfish_mask(input_ids, k, h, seed, exempt_token_ids, attention_mask)`` and replaces
    ``batch[labels_key]`` with a copy in which the dropped targets are ``ignore_index``. When
    the batch has no labels, they are created as a copy of ``input_ids`` (int64) with padding
    (``attention_mask == 0``) at ``ignore_index``. Targets already at ``ignore_index`` (prompt,
    padding) stay so. The caller's tensors are never modified in place: the batch dict gets a
    new labels tensor, so a dataset that hands out cached tensors is not corrupted.

    Labels follow the Hugging Face convention: aligned with ``input_ids``, shifted by the loss
    (``labels[..., i]`` is the target predicted from ``input_ids[..., :i]``). Validation, test
    and predict batches are never touched, so validation loss stays the plain loss.

    Logged: the dropped fraction, dropped supervised targets / supervised targets before
    dropping, counted over ``labels[..., 1:]`` (a causal LM never uses position 0 as a target).
    The two counts are accumulated as tensors on the batch's device (no host sync per step) and
    turned into fractions only when logged:

    - ``goldfish/dropped_fraction_step``, in ``on_train_batch_end`` of every
      ``trainer.log_every_n_steps``-th optimizer step (the steps Lightning sends to loggers):
      the fraction over all batches since the previous such log;
    - ``goldfish/dropped_fraction_epoch`` (and, for ``trainer.callback_metrics`` only,
      ``goldfish/dropped_fraction``), in ``on_train_epoch_end``: the fraction over the whole
      epoch.

    Under DDP the counts are summed over ranks (``trainer.strategy.reduce``, one all-reduce of
    two integers per log) before dividing, so every rank logs the exact global fraction. No
    random numbers are drawn: the global RNG is untouched.

    ``state_dict()`` stores ``{"k", "h", "seed"}``; ``load_state_dict`` raises if a checkpoint
    was trained with other values, because resuming with another hash silently changes which
    targets the model is allowed to learn.

    **Proof that the labels reached the loss.** Goldfish only works if ``training_step`` passes
    the rewritten ``batch[labels_key]`` to the loss. After each training step's forward (in
    ``on_before_backward``, so before any update) the callback checks it: when the
    LightningModule holds a Hugging Face causal LM that was called with ``labels=`` in the step,
    those labels must equal the rewritten ones; otherwise the rewritten labels tensor must have
    been read by some torch operation (a loss computed by hand from ``batch["labels"]``). If
    not, it raises and shows the one-line fix: a ``training_step`` that passes
    ``labels=batch["input_ids"]`` would otherwise train without goldfish while logging a dropped
    fraction.

    Args:
        k: drop about one target in ``k`` (integer ``>= 2``).
        h: number of preceding tokens hashed (integer ``>= 1``).
        seed: seed of the hash (any integer).
        ignore_index: label value the loss ignores (``-100`` for Hugging Face and PyTorch).
        exempt_token_ids: target token ids never dropped (e.g. EOS or other special tokens).
        input_ids_key: batch key of the token ids.
        labels_key: batch key of the labels (created when absent).

    Example:
        >>> import lightning.pytorch as pl
        >>> from antimemo.callbacks.goldfish import GoldfishTokenDropout
        >>> goldfish = GoldfishTokenDropout(k=4, h=13)
        >>> trainer = pl.Trainer(callbacks=[goldfish], max_steps=10)  # doctest: +SKIP
        >>> GoldfishTokenDropout.pretraining().k
        50
    """

    declaration = declare("labels", domain="lm", note="rewrites batch[labels_key]; verified to reach the loss")

    def __init__(
        self,
        k: int = 4,
        h: int = 13,
        seed: int = 0,
        ignore_index: int = -100,
        exempt_token_ids: Iterable[int] = (),
        input_ids_key: str = "input_ids",
        labels_key: str = "labels",
    ) -> None:
        super().__init__()
        self.k = _check_k(k)
        self.h = _check_h(h)
        self.seed = check_seed(seed)
        if not is_int(ignore_index):
            raise TypeError(
                f"ignore_index must be an integer label value, got {ignore_index!r}; "
                "use -100 (the Hugging Face / PyTorch default)"
            )
        self.ignore_index = int(ignore_index)
        self.exempt_token_ids = _check_exempt(exempt_token_ids)
        for name, value in (("input_ids_key", input_ids_key), ("labels_key", labels_key)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} must be a non-empty string batch key, got {value!r}")
        self.input_ids_key = input_ids_key
        self.labels_key = labels_key
        self._seam_handles: list[Any] = []
        self._seams: list[Any] = []
        self._expected: Tensor | None = None
        self._epoch_counts: Tensor | None = None  # [dropped, supervised] this epoch
        self._window_counts: Tensor | None = None  # the same since the last step log
        self._last_logged_step = -1

    @classmethod
    def pretraining(cls, **overrides: Any) -> GoldfishTokenDropout:
        """Build the callback with the pretraining preset (k=50, h=50, as in Apertus).

        Args:
            **overrides: any constructor argument, applied over
                :data:`GOLDFISH_PRETRAINING_PRESET`.

        Returns:
            A configured :class:`GoldfishTokenDropout`.

        Example:
            >>> cb = GoldfishTokenDropout.pretraining(seed=3)
            >>> (cb.k, cb.h, cb.seed)
            (50, 50, 3)
        """
        return cls(**{**GOLDFISH_PRETRAINING_PRESET, **overrides})

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(k={self.k}, h={self.h}, seed={self.seed}, "
            f"ignore_index={self.ignore_index}, exempt_token_ids={self.exempt_token_ids}, "
            f"input_ids_key={self.input_ids_key!r}, labels_key={self.labels_key!r})"
        )

    def apply(self, batch: MutableMapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Mask the labels of one batch in place of the dict (the tensors are not mutated).

        Args:
            batch: a mutable mapping holding ``input_ids_key`` (and optionally
                ``"attention_mask"`` and ``labels_key``).

        Returns:
            ``(dropped, supervised)``: 0-d int64 tensors counting the dropped targets and the
            supervised targets before dropping, over ``labels[..., 1:]``.

        Example:
            >>> import torch
            >>> batch = {"input_ids": torch.arange(64).unsqueeze(0)}
            >>> dropped, supervised = GoldfishTokenDropout(k=4).apply(batch)
            >>> int(supervised), batch["labels"].shape
            (63, torch.Size([1, 64]))
        """
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"GoldfishTokenDropout needs dict-like training batches with the key "
                f"{self.input_ids_key!r} (optionally 'attention_mask' and {self.labels_key!r}), "
                f"got {type(batch).__name__}; return a dict from your Dataset or collate_fn"
            )
        if not isinstance(batch, MutableMapping):
            raise TypeError(
                f"GoldfishTokenDropout writes batch[{self.labels_key!r}], but the batch is an "
                f"immutable {type(batch).__name__}; return a plain dict from your collate_fn"
            )
        if self.input_ids_key not in batch:
            raise KeyError(
                f"GoldfishTokenDropout: training batch has no key {self.input_ids_key!r} "
                f"(input_ids_key); keys present: {sorted(map(str, batch.keys()))}. Pass "
                f"input_ids_key=... to name the token-id entry"
            )
        input_ids = batch[self.input_ids_key]
        attention_mask = batch.get("attention_mask")
        drop = goldfish_mask(
            input_ids,
            k=self.k,
            h=self.h,
            seed=self.seed,
            exempt_token_ids=self.exempt_token_ids,
            attention_mask=attention_mask,
        )
        labels = batch.get(self.labels_key)
        if labels is None:
            labels = input_ids.to(torch.long, copy=True)
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, self.ignore_index)
        else:
            if not isinstance(labels, Tensor):
                raise TypeError(
                    f"batch[{self.labels_key!r}] must be a tensor of label ids, got "
                    f"{type(labels).__name__}"
                )
            if not _is_integer_dtype(labels.dtype):
                raise TypeError(
                    f"batch[{self.labels_key!r}] must have an integer dtype, got {labels.dtype}; "
                    "convert with labels.long()"
                )
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"batch[{self.labels_key!r}] has shape {tuple(labels.shape)} but "
                    f"batch[{self.input_ids_key!r}] has {tuple(input_ids.shape)}; goldfish needs "
                    "unshifted labels aligned with input_ids (the Hugging Face convention)"
                )
        supervised_before = labels != self.ignore_index
        batch[self.labels_key] = labels.masked_fill(drop, self.ignore_index)
        dropped = (drop & supervised_before)[..., 1:].sum()
        supervised = supervised_before[..., 1:].sum()
        return dropped, supervised

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the callbacks compose; watch the labels every Hugging Face causal LM receives (fit only)."""
        if stage != "fit":
            return
        check_composition(trainer)
        self._release()
        self._seams = [loss_seam(lm) for lm in find_causal_lms(pl_module)]
        self._seam_handles = [seam.observe(self) for seam in self._seams]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Stop watching the models' labels (fit only)."""
        if stage == "fit":
            self._release()

    def _release(self) -> None:
        for handle in self._seam_handles:
            handle.remove()
        self._seam_handles, self._seams, self._expected = [], [], None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Raise if the rewritten labels did not reach the loss of this training step."""
        expected, self._expected = self._expected, None
        if expected is None or expected.numel() == 0:
            return  # no batch, or an empty one (e.g. a Poisson draw under DP): nothing to drop
        seen = [labels for seam in self._seams for labels in seam.labels_seen]
        key = self.labels_key
        fix = (
            f"pass the rewritten labels to the loss, e.g. loss = self.model(input_ids=batch[{self.input_ids_key!r}], "
            f"attention_mask=batch.get('attention_mask'), labels=batch[{key!r}]).loss"
        )
        if seen:
            if not any(same_labels(labels, expected) for labels in seen):
                names = ", ".join(sorted({type(seam.model).__name__ for seam in self._seams}))
                raise RuntimeError(
                    f"GoldfishTokenDropout rewrote batch[{key!r}], but the model ({names}) was called with other "
                    f"labels in training_step (e.g. labels=batch[{self.input_ids_key!r}]), so no target was dropped "
                    f"from the loss. Fix: {fix}"
                )
            return
        if not was_used(expected):
            raise RuntimeError(
                f"GoldfishTokenDropout rewrote batch[{key!r}], but training_step never read it (no Hugging Face "
                f"causal LM was called with labels=, and no torch operation used batch[{key!r}]), so goldfish had no "
                f"effect on the loss. Fix: {fix}; or, for a hand-written loss, "
                f"F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[{key!r}][:, 1:].flatten(), ignore_index=-100)"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reset the epoch's dropped / supervised counts."""
        self._epoch_counts = None
        self._window_counts = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Mask the training batch's labels and add its counts to the running totals."""
        dropped, supervised = self.apply(batch)
        batch[self.labels_key] = self._expected = track_use(batch[self.labels_key])
        for seam in self._seams:
            seam.open((trainer.global_step, batch_idx))
        counts = torch.stack((dropped, supervised))
        if self._epoch_counts is None or self._epoch_counts.device != counts.device:
            self._epoch_counts = torch.zeros_like(counts)
            self._window_counts = torch.zeros_like(counts)
        self._epoch_counts += counts
        self._window_counts += counts

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Log ``goldfish/dropped_fraction_step`` on Lightning's logging cadence."""
        for seam in self._seams:
            seam.close()
        if self._window_counts is None or not self._log_due(trainer):
            return
        counts = self._reduce(trainer, self._window_counts)
        self._window_counts.zero_()
        pl_module.log(
            "goldfish/dropped_fraction_step",
            _fraction(counts),
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``goldfish/dropped_fraction_epoch`` (the fraction over the whole epoch)."""
        if self._epoch_counts is None:
            return
        fraction = _fraction(self._reduce(trainer, self._epoch_counts))
        has_logger = getattr(trainer, "logger", None) is not None
        for name, to_logger in (
            ("goldfish/dropped_fraction_epoch", has_logger),
            ("goldfish/dropped_fraction", False),
        ):
            _silence_epoch_sync_warning(name)
            pl_module.log(
                name,
                fraction,
                on_step=False,
                on_epoch=True,
                logger=to_logger,
                batch_size=1,
                sync_dist=False,  # already the global fraction (counts summed over ranks)
            )

    def _log_due(self, trainer: pl.Trainer) -> bool:
        """True once per optimizer step that is a multiple of ``log_every_n_steps``.

        ``global_step`` is already incremented when ``on_train_batch_end`` runs, so this matches
        the steps at which Lightning sends step metrics to the loggers; micro-batches of
        gradient accumulation (no new optimizer step) never log twice."""
        every = trainer.log_every_n_steps
        step = int(trainer.global_step)
        if not every or step <= 0 or step % every != 0 or step == self._last_logged_step:
            return False
        self._last_logged_step = step
        return True

    @staticmethod
    def _reduce(trainer: pl.Trainer, counts: Tensor) -> Tensor:
        """Sum the ``[dropped, supervised]`` counts over all ranks (a no-op on one process)."""
        if trainer.world_size <= 1:
            return counts.clone()
        return trainer.strategy.reduce(counts.clone(), reduce_op="sum")

    def state_dict(self) -> dict[str, Any]:
        """The hash configuration, stored in checkpoints: ``{"k", "h", "seed"}``."""
        return {"k": self.k, "h": self.h, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that a checkpoint was trained with this callback's ``(k, h, seed)``.

        Raises:
            ValueError: the checkpoint's configuration differs or is incomplete.
        """
        mine = self.state_dict()
        missing = [key for key in mine if key not in state_dict]
        if missing:
            raise ValueError(
                f"GoldfishTokenDropout checkpoint state lacks {missing} (got {state_dict!r}); "
                f"it was not written by this callback"
            )
        theirs = {key: state_dict[key] for key in mine}
        if theirs != mine:
            diff = ", ".join(
                f"{key}: checkpoint {theirs[key]!r} vs now {mine[key]!r}"
                for key in mine
                if theirs[key] != mine[key]
            )
            raise ValueError(
                f"The checkpoint was trained with GoldfishTokenDropout(k={theirs['k']}, "
                f"h={theirs['h']}, seed={theirs['seed']}) but this run uses (k={self.k}, "
                f"h={self.h}, seed={self.seed}) [{diff}]; resuming with a different hash silently "
                f"changes which targets are dropped. Resume with GoldfishTokenDropout("
                f"k={theirs['k']}, h={theirs['h']}, seed={theirs['seed']}) or start a new run "
                f"without ckpt_path"
            )
