"""The seams through which antimemo callbacks change training. No callback reaches in on its own.

Three seams, each owned here and installed at most once per model or trainer:

- **The per-sequence loss chain** (:class:`LossSeam`, one per Hugging Face causal LM). One
  forward hook (``register_forward_hook(with_kwargs=True)``, a documented PyTorch mechanism)
  on the LM recomputes the per-sequence losses ``L_i`` from the returned ``logits`` and the
  ``labels`` the model received, runs the registered stages in their documented order, reduces,
  and returns the output with ``loss`` replaced. A stage sees a :class:`SequenceLosses` and
  changes its ``values`` (per-sequence losses) or ``weights``; the reduction is
  ``sum_i w_i v_i / D`` (target-weighted, Hugging Face's own token mean when nothing changed) or,
  when :class:`~antimemo.callbacks.DifferentialPrivacy` registers its per-sequence reduction,
  ``mean_i (w_i / n_i) v_i`` (one sequence = one privacy unit). With no enabled stage and no
  reduction registered the model's loss is left untouched, bit for bit. Order:

  ====== ==================================== ===========================================
  order  stage                                effect
  ====== ==================================== ===========================================
  100    ``LossTruncation``                   ``w_i = 0`` for sequences above the threshold
  200    ``LossFloor``                        ``v_i = |v_i - b| + b``
  --     reduction (default or DP)            the batch loss
  ====== ==================================== ===========================================

  The seam also records, per training batch, the labels each call received (label-based
  mitigations check that their rewritten labels reached the loss), the number of calls and the
  final per-sequence values (DP's ghost clipping back-propagates them).

- **The train-loader chain** (:class:`LoaderSeam`, one per trainer). Lightning has no public
  hook that lets a callback replace the train DataLoader it builds, so this is the one place in
  antimemo that touches a Lightning private attribute: ``trainer.fit_loop._data_source``'s
  ``dataloader`` method is wrapped once, and the registered transforms (``DedupSampling`` at
  order 100, DP's Poisson sampling at order 1000: sampling must come last) are applied in order
  each time Lightning requests the loader. The wrapper is removed exactly once, when the last
  transform is unregistered; a wrapper left behind by an interrupted fit is detected and
  replaced.

- **Data-independent gradient terms** (:class:`GradSeam`, one per trainer). A regularizer whose
  gradient does not depend on the data (``SpectralNormPenalty``) hands its term to the seam in
  ``on_before_optimizer_step``. Without DP the term is added to ``p.grad`` at once. Under DP the
  DP optimizer replaces ``p.grad`` by the clipped, noised sum, so DP claims the seam and adds the
  queued terms right after the noise (Opacus' optimizer step hook): a function of the weights
  only, which are already private, so the guarantee is unchanged (post-processing).

Also here: :func:`track_use`, a tensor wrapper that records whether any torch operation read a
tensor, used by label-rewriting callbacks whose model is not a Hugging Face LM.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from antimemo.functional.regularizers import _denominator as denominator
from antimemo.functional.regularizers import per_sequence_lm_loss

__all__ = [
    "GradSeam",
    "LoaderSeam",
    "LossSeam",
    "SequenceLosses",
    "grad_seam",
    "loader_seam",
    "loss_seam",
    "track_use",
    "was_used",
]


class _Handle:
    """What ``register`` returns: ``remove()`` undoes the registration (idempotent)."""

    def __init__(self, remove: Callable[[], None]) -> None:
        self._remove: Callable[[], None] | None = remove

    def remove(self) -> None:
        if self._remove is not None:
            fn, self._remove = self._remove, None
            fn()


# ------------------------------------------------------------------------------------------------
# the per-sequence loss chain
# ------------------------------------------------------------------------------------------------


@dataclass
class SequenceLosses:
    """One training call's per-sequence losses, as stages see and change them.

    Attributes:
        raw: ``[B]`` float32 mean cross-entropy of each sequence (0 without targets), with grad.
        values: ``[B]`` the values being reduced (stages replace it; starts as ``raw``).
        weights: ``[B]`` the reduction weights (starts as the target counts ``n_i``).
        num_targets: ``[B]`` int64 target counts.
        num_items: Hugging Face's ``num_items_in_batch`` if the call passed one.
    """

    raw: Tensor
    values: Tensor
    weights: Tensor
    num_targets: Tensor
    num_items: Any = None


def _denominator(seq: SequenceLosses) -> Tensor:
    d = denominator(seq.num_targets, seq.num_items, seq.values)
    return d.clamp_min(1) if seq.num_items is None else d  # a batch without targets: loss 0, not NaN


def target_weighted_reduction(seq: SequenceLosses) -> tuple[Tensor, Tensor]:
    """``sum_i w_i v_i / D``: Hugging Face's token mean when no stage changed anything."""
    return (seq.values * seq.weights).sum() / _denominator(seq), seq.values * seq.weights


def per_sequence_reduction(seq: SequenceLosses) -> tuple[Tensor, Tensor]:
    """``mean_i (w_i / n_i) v_i``: each sequence's own mean (0 without targets), then the batch mean."""
    per = seq.values * (seq.weights / seq.num_targets.clamp_min(1).to(seq.weights.dtype))
    loss = per.mean() if per.numel() else per.sum()
    return loss, per


class LossSeam:
    """The loss chain of one Hugging Face causal LM (get it with :func:`loss_seam`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._stages: list[tuple[int, object, Callable[[SequenceLosses], None], Callable[[], bool]]] = []
        self._reduction: tuple[object, Callable[[SequenceLosses], tuple[Tensor, Tensor]]] | None = None
        self._observers: list[object] = []
        self._hook: Any = None
        try:
            self._signature: inspect.Signature | None = inspect.signature(model.forward)
        except (TypeError, ValueError):  # pragma: no cover - C-implemented forward
            self._signature = None
        self.active = False
        self.reset()

    # -- registration ---------------------------------------------------------------------------
    def add_stage(
        self, owner: object, order: int, fn: Callable[[SequenceLosses], None], enabled: Callable[[], bool]
    ) -> _Handle:
        """Register ``fn`` at ``order``; it runs when ``enabled()`` is true. One stage per owner."""
        for _, other, _, _ in self._stages:
            if other is owner:
                raise RuntimeError(f"{type(owner).__name__} registered two stages on one loss seam")
            if type(other) is type(owner):
                raise ValueError(
                    f"two {type(owner).__name__} callbacks rewrite the training loss of one model; keep one"
                )
        self._stages.append((order, owner, fn, enabled))
        self._stages.sort(key=lambda s: s[0])
        self._install()
        return _Handle(lambda: self._drop(owner))

    def set_reduction(self, owner: object, fn: Callable[[SequenceLosses], tuple[Tensor, Tensor]]) -> _Handle:
        """Replace the default target-weighted reduction (DP's per-sequence mean)."""
        if self._reduction is not None and self._reduction[0] is not owner:
            raise ValueError(
                f"{type(owner).__name__} and {type(self._reduction[0]).__name__} both set the loss reduction of one model"
            )
        self._reduction = (owner, fn)
        self._install()
        return _Handle(lambda: self._drop(owner))

    def observe(self, owner: object) -> _Handle:
        """Record labels and calls for ``owner`` without changing the loss."""
        if owner not in self._observers:
            self._observers.append(owner)
        self._install()
        return _Handle(lambda: self._drop(owner))

    @property
    def reduction_owner(self) -> object | None:
        """The callback that set the reduction (DP), or ``None`` for the default."""
        return None if self._reduction is None else self._reduction[0]

    @property
    def stage_owners(self) -> list[str]:
        """Class names of the registered stages, in the order they run."""
        return [type(owner).__name__ for _, owner, _, _ in self._stages]

    def _drop(self, owner: object) -> None:
        self._stages = [s for s in self._stages if s[1] is not owner]
        if self._reduction is not None and self._reduction[0] is owner:
            self._reduction = None
        self._observers = [o for o in self._observers if o is not owner]
        if not self._stages and self._reduction is None and not self._observers:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            _LOSS_SEAMS.pop(self.model, None)

    def _install(self) -> None:
        if self._hook is None:
            self._hook = self.model.register_forward_hook(self._forward_hook, with_kwargs=True)

    # -- per batch ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the previous batch's record."""
        self.calls = 0
        self.labels_seen: list[Tensor] = []
        self.last_per_sequence: Tensor | None = None
        self.last_loss: Tensor | None = None
        self.plain_loss: Tensor | None = None
        self.stats: dict[str, Tensor] = {}
        self.batch_size = 1
        self._batch_key: Any = None

    def open(self, key: Any) -> None:
        """Open the training-batch window (idempotent per ``key``; the first call resets)."""
        if self._batch_key != key or not self.active:
            self.reset()
            self._batch_key = key
        self.active = True

    def close(self) -> None:
        """Close the window (the batch's record stays readable until the next ``open``)."""
        self.active = False

    # -- the hook -------------------------------------------------------------------------------
    def _arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if not args or self._signature is None:
            return kwargs
        try:
            bound = self._signature.bind_partial(*args, **kwargs)
        except TypeError:
            return kwargs
        out = dict(bound.arguments)
        extra = out.pop("kwargs", None)
        if isinstance(extra, dict):
            out.update(extra)
        return out

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.active or not torch.is_grad_enabled() or not module.training:
            return None
        arguments = self._arguments(args, kwargs)
        labels = arguments.get("labels")
        if labels is None:
            return None
        if arguments.get("shift_labels") is not None:
            raise NotImplementedError(
                f"{', '.join(self.stage_owners) or 'antimemo'}: the model was called with shift_labels=; the loss "
                "chain supports labels= (unshifted, Hugging Face convention). Pass labels instead"
            )
        self.calls += 1
        self.labels_seen.append(labels)
        if isinstance(output, Mapping):
            loss, logits = output.get("loss"), output.get("logits")
        elif isinstance(output, tuple) and len(output) >= 2:
            loss, logits = output[0], output[1]
        else:
            raise TypeError(
                "antimemo's loss chain expects the model to return a Hugging Face ModelOutput (or a tuple (loss, "
                f"logits, ...)), got {type(output).__name__}"
            )
        if not isinstance(logits, Tensor) or not isinstance(loss, Tensor):
            raise TypeError(
                f"antimemo's loss chain: the model's output has no loss/logits tensors (loss={type(loss).__name__}, "
                f"logits={type(logits).__name__}); call the model with labels=... and return logits"
            )
        self.batch_size = int(logits.shape[0])
        self.plain_loss = loss.detach()
        stages = [(owner, fn) for _, owner, fn, enabled in self._stages if enabled()]
        if not stages and self._reduction is None:
            return None
        with torch._C.DisableTorchFunctionSubclass():
            plain_labels = labels.view(labels.shape)
        losses, num_targets = per_sequence_lm_loss(logits, plain_labels, _ignore_index(self))
        seq = SequenceLosses(
            raw=losses,
            values=losses,
            weights=num_targets.to(losses.dtype),
            num_targets=num_targets,
            num_items=arguments.get("num_items_in_batch"),
        )
        initial_weights = seq.weights
        for _, fn in stages:
            fn(seq)
        if self._reduction is None and seq.values is seq.raw and seq.weights is initial_weights:
            return None  # no stage changed anything (e.g. truncation warming up): the model's own loss
        reduce = self._reduction[1] if self._reduction is not None else target_weighted_reduction
        new_loss, per = reduce(seq)
        self.last_per_sequence = per
        self.last_loss = new_loss
        if isinstance(output, Mapping):
            output["loss"] = new_loss
            return output
        return (new_loss, *output[1:])


def _ignore_index(seam: LossSeam) -> int:
    values = {int(getattr(owner, "ignore_index", -100)) for _, owner, _, _ in seam._stages}
    if seam._reduction is not None:
        values.add(int(getattr(seam._reduction[0], "ignore_index", -100)))
    if len(values) > 1:
        raise ValueError(
            f"the callbacks on one model's loss use different ignore_index values {sorted(values)} "
            f"({', '.join(seam.stage_owners)}); give them the same ignore_index"
        )
    return values.pop() if values else -100


_LOSS_SEAMS: weakref.WeakKeyDictionary[nn.Module, LossSeam] = weakref.WeakKeyDictionary()


def loss_seam(model: nn.Module) -> LossSeam:
    """The loss chain of ``model`` (created on first use, dropped when nothing is registered)."""
    seam = _LOSS_SEAMS.get(model)
    if seam is None:
        seam = _LOSS_SEAMS[model] = LossSeam(model)
    return seam


def existing_loss_seam(model: nn.Module) -> LossSeam | None:
    """The loss chain of ``model`` if one is registered."""
    return _LOSS_SEAMS.get(model)


# ------------------------------------------------------------------------------------------------
# the train-loader chain
# ------------------------------------------------------------------------------------------------


class LoaderSeam:
    """The train-loader chain of one trainer (get it with :func:`loader_seam`)."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = weakref.ref(trainer)
        self._transforms: list[tuple[int, object, Callable[[Any], Any]]] = []
        self._source: Any = None
        self._applied: set[int] = set()  # id() of the owners whose transform built a loader
        self._had_attr = False
        self._original_attr: Any = None

    @property
    def owners(self) -> list[str]:
        """Class names of the registered transforms, in the order they apply."""
        return [type(owner).__name__ for _, owner, _ in self._transforms]

    def register(self, owner: object, order: int, fn: Callable[[Any], Any]) -> _Handle:
        """Apply ``fn(loader) -> loader`` at ``order`` each time Lightning builds the train loader."""
        if any(o is owner for _, o, _ in self._transforms):
            raise RuntimeError(f"{type(owner).__name__} registered two train-loader transforms")
        self._transforms.append((order, owner, fn))
        self._transforms.sort(key=lambda t: t[0])
        self._install()
        return _Handle(lambda: self._drop(owner))

    def check_applied(self, owner: object, consequence: str) -> None:
        """Raise if Lightning built the train loader without running ``owner``'s transform (called
        in ``on_train_start``): the mitigation would otherwise be silently inert.

        Args:
            owner: the registered callback.
            consequence: what training would do instead, e.g. "duplicates would be trained on as usual".
        """
        if id(owner) not in self._applied:
            raise RuntimeError(
                f"{type(owner).__name__}: the train loader was not built through the trainer's train-loader chain, "
                f"so {consequence}. Give the loader through LightningModule/DataModule.train_dataloader() or "
                "trainer.fit(train_dataloaders=...), and do not replace trainer.fit_loop's data source"
            )

    def _install(self) -> None:
        trainer = self._trainer()
        if trainer is None or self._source is not None:
            return
        source = trainer.fit_loop._data_source
        current = vars(source).get("dataloader")
        stale = getattr(current, "_antimemo_loader_seam", None)
        if stale is not None:  # left behind by a fit that did not reach teardown
            self._had_attr, self._original_attr = stale
            if not self._had_attr:
                del source.dataloader
            else:
                source.dataloader = self._original_attr
        else:
            self._had_attr, self._original_attr = "dataloader" in vars(source), current
        original = source.dataloader

        def dataloader() -> Any:
            loader = original()
            for _, owner, fn in list(self._transforms):
                loader = fn(loader)
                self._applied.add(id(owner))
            return loader

        dataloader._antimemo_loader_seam = (self._had_attr, self._original_attr)  # type: ignore[attr-defined]
        source.dataloader = dataloader
        self._source = source

    def _drop(self, owner: object) -> None:
        self._transforms = [t for t in self._transforms if t[1] is not owner]
        if self._transforms or self._source is None:
            return
        source, self._source = self._source, None
        if self._had_attr:
            source.dataloader = self._original_attr
        else:
            vars(source).pop("dataloader", None)
        trainer = self._trainer()
        if trainer is not None:
            _LOADER_SEAMS.pop(trainer, None)


_LOADER_SEAMS: weakref.WeakKeyDictionary[Any, LoaderSeam] = weakref.WeakKeyDictionary()


def loader_seam(trainer: Any) -> LoaderSeam:
    """The train-loader chain of ``trainer`` (created on first use)."""
    seam = _LOADER_SEAMS.get(trainer)
    if seam is None:
        seam = _LOADER_SEAMS[trainer] = LoaderSeam(trainer)
    return seam


# ------------------------------------------------------------------------------------------------
# data-independent gradient terms
# ------------------------------------------------------------------------------------------------


class GradSeam:
    """Where data-independent gradient terms are added (get it with :func:`grad_seam`)."""

    def __init__(self) -> None:
        self.claimed_by: object | None = None
        self._pending: list[tuple[object, Callable[[], None]]] = []
        self.applied: dict[str, int] = {}

    def claim(self, owner: object) -> _Handle:
        """Defer the terms until ``owner`` calls :meth:`flush` (DP: after the noise)."""
        self.claimed_by = owner

        def release() -> None:
            if self.claimed_by is owner:
                self.claimed_by = None
                self._pending = []

        return _Handle(release)

    def add(self, owner: object, apply: Callable[[], None]) -> None:
        """Add ``apply`` (which adds the term to ``p.grad``): now, or at the claimer's flush."""
        if self.claimed_by is None:
            self._run(owner, apply)
        else:
            self._pending = [p for p in self._pending if p[0] is not owner] + [(owner, apply)]

    def flush(self) -> None:
        """Apply the queued terms (called by the claimer after it has set ``p.grad``)."""
        pending, self._pending = self._pending, []
        for owner, apply in pending:
            self._run(owner, apply)

    def _run(self, owner: object, apply: Callable[[], None]) -> None:
        apply()
        name = type(owner).__name__
        self.applied[name] = self.applied.get(name, 0) + 1


_GRAD_SEAMS: weakref.WeakKeyDictionary[Any, GradSeam] = weakref.WeakKeyDictionary()


def grad_seam(trainer: Any) -> GradSeam:
    """The gradient-term seam of ``trainer`` (created on first use)."""
    seam = _GRAD_SEAMS.get(trainer)
    if seam is None:
        seam = _GRAD_SEAMS[trainer] = GradSeam()
    return seam


# ------------------------------------------------------------------------------------------------
# use tracking for rewritten labels
# ------------------------------------------------------------------------------------------------

_METADATA = {
    Tensor.shape.__get__,  # type: ignore[attr-defined]
    Tensor.size,
    Tensor.dim,
    Tensor.ndim.__get__,  # type: ignore[attr-defined]
    Tensor.numel,
    Tensor.__len__,
    Tensor.device.__get__,  # type: ignore[attr-defined]
    Tensor.dtype.__get__,  # type: ignore[attr-defined]
    Tensor.is_floating_point,
    Tensor.element_size,
    Tensor.__repr__,
    Tensor.__format__,
}


class _UseTracked(Tensor):
    """A tensor that notes when a torch operation (not a shape/dtype query) reads it.

    The results of operations are plain tensors, so the tracking does not spread.
    """

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in _METADATA:
            for a in (*args, *kwargs.values()):
                if isinstance(a, _UseTracked):
                    a.__dict__["_antimemo_used"] = True
                elif isinstance(a, (list, tuple)):
                    for b in a:
                        if isinstance(b, _UseTracked):
                            b.__dict__["_antimemo_used"] = True
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def track_use(tensor: Tensor) -> Tensor:
    """``tensor`` as a view that records whether any torch operation reads it (:func:`was_used`)."""
    with torch._C.DisableTorchFunctionSubclass():
        tracked = tensor.as_subclass(_UseTracked)
    tracked.__dict__["_antimemo_used"] = False
    return tracked


def was_used(tensor: Tensor) -> bool:
    """Whether a tensor from :func:`track_use` was read by a torch operation."""
    return bool(tensor.__dict__.get("_antimemo_used", False))


def same_labels(a: Tensor, b: Tensor) -> bool:
    """``torch.equal`` on the values, without marking tracked tensors as used."""
    if a is b:
        return True
    with torch._C.DisableTorchFunctionSubclass():
        if a.shape != b.shape:
            return False
        return bool(torch.equal(a.detach().to(b.device), b.detach()))
