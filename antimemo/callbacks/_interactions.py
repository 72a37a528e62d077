"""Declared interactions between antimemo callbacks, checked for every pair at ``setup``.

Each antimemo callback class declares what it changes (:class:`Declaration`): ``labels``,
``loss``, ``grads``, ``sampler``, ``model`` (activations), ``optimizer``, ``knob`` (another
callback's setting) or nothing (``evaluation`` only). :func:`check_composition` looks at every
pair of antimemo callbacks on the trainer. A pair either works (and is exercised by
``tests/test_composition.py``) or is refused before the first step with one error that names
both callbacks, the reason and the fix. The table of refusals is :data:`REFUSALS`; docs/design.md
prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

__all__ = ["CHANGES", "Declaration", "CompositionError", "REFUSALS", "check_composition", "declared_callbacks"]

#: What a callback may change in training.
CHANGES = ("labels", "loss", "grads", "sampler", "model", "optimizer", "knob", "evaluation")


@dataclass(frozen=True)
class Declaration:
    """What one callback class changes, and where it applies.

    Attributes:
        changes: a subset of :data:`CHANGES`.
        domain: ``"lm"`` (Hugging Face causal LMs, token batches), ``"diffusion"`` (the
            ``DiffusionModule``) or ``"any"``.
        repeatable: whether two instances may share a trainer (two monitors on different probe
            sets can; two goldfish hashes cannot).
    """

    changes: frozenset[str]
    domain: str = "any"
    repeatable: bool = False
    note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.changes) - set(CHANGES)
        if unknown:
            raise ValueError(f"unknown changes {sorted(unknown)}; use {CHANGES}")
        if self.domain not in ("lm", "diffusion", "any"):
            raise ValueError(f"domain must be 'lm', 'diffusion' or 'any', got {self.domain!r}")


def declare(*changes: str, domain: str = "any", repeatable: bool = False, note: str = "") -> Declaration:
    """Shorthand for :class:`Declaration`."""
    return Declaration(frozenset(changes), domain, repeatable, note)


class CompositionError(ValueError):
    """Two callbacks on one trainer that antimemo refuses to combine."""


#: A refusal rule: ``rule(a, b) -> "reason. Fix: ..."`` or ``None`` when this configuration works.
Rule = Callable[[Any, Any], "str | None"]


def _dp_truncation(dp: Any, trunc: Any) -> str:
    return (
        "loss truncation drops a sequence when its loss is above a quantile of other sequences' losses, so one "
        "example's gradient depends on the other examples; that breaks DP-SGD's per-example sensitivity bound and "
        "the epsilon would not be a guarantee. Fix: remove LossTruncation (LossFloor is per-sequence and works "
        "with DP)"
    )


def _dp_dedup(dp: Any, dedup: Any) -> str | None:
    if getattr(dedup, "policy", None) != "downweight":
        return None
    return (
        "policy='downweight' samples clusters with replacement at unequal rates, but the DP accountant assumes "
        "Poisson sampling of every example at one rate q, so the reported epsilon would be wrong. Fix: "
        "DedupSampling(policy='drop') or policy='cap' (DP then Poisson-samples the kept examples)"
    )


def _dp_watermark(dp: Any, wf: Any) -> str | None:
    if getattr(wf, "policy", None) != "downweight":
        return None
    return (
        "policy='downweight' samples items with replacement at unequal rates, but the DP accountant assumes "
        "Poisson sampling of every example at one rate q, so the reported epsilon would be wrong. Fix: "
        "WatermarkFilter(policy='drop') (DP then Poisson-samples the kept items)"
    )


def _dedup_watermark(dedup: Any, wf: Any) -> str:
    return (
        "WatermarkFilter would rebuild the train loader over a subset and discard DedupSampling's sampler (its "
        "epoch order and resumption state). Fix: remove the watermarked items from the dataset first "
        "(antimemo.watermark.detect_watermark), then deduplicate what is left"
    )


def _budget_target(budget: Any) -> str:
    try:
        return budget._class_name(budget.target_name)
    except AttributeError:  # pragma: no cover - not a MemorizationBudget
        return ""


def _budget_dp(budget: Any, dp: Any) -> str | None:
    if _budget_target(budget) != "DifferentialPrivacy":
        return None
    return (
        f"MemorizationBudget(control={budget.control!r}) would change a DifferentialPrivacy setting during "
        "training, but the noise and clipping are fixed when training starts and accounted step by step, so the "
        "change would be silently inert or would falsify the epsilon. Fix: control another mitigation (e.g. "
        "control='goldfish.k') and set DP's noise before the run"
    )


def _dp_diffusion(dp: Any, other: Any) -> str:
    return (
        f"DP-SGD together with {type(other).__name__} on the diffusion model is not verified (no test shows the "
        "per-sample gradients and the accounting stay exact), so antimemo does not run it. Fix: train the "
        "diffusion model without DifferentialPrivacy, or without this callback"
    )


#: Pair rules by class names. Pairs not listed here, of compatible domains, work together.
REFUSALS: dict[frozenset[str], Rule] = {
    frozenset({"DifferentialPrivacy", "LossTruncation"}): _dp_truncation,
    frozenset({"DifferentialPrivacy", "DedupSampling"}): _dp_dedup,
    frozenset({"DifferentialPrivacy", "MemorizationBudget"}): _budget_dp,
    frozenset({"DifferentialPrivacy", "WatermarkFilter"}): _dp_watermark,
    frozenset({"DedupSampling", "WatermarkFilter"}): _dedup_watermark,
    **{
        frozenset({"DifferentialPrivacy", name}): _dp_diffusion
        for name in ("ReplicaMonitor", "ConditioningNoise", "LabelRandomization", "ReplicaPenalty")
    },
}


def declared_callbacks(callbacks: Any) -> list[Any]:
    """The callbacks among ``callbacks`` that carry an antimemo :class:`Declaration`."""
    return [cb for cb in callbacks if isinstance(getattr(type(cb), "declaration", None), Declaration)]


_FIRST = ("MemorizationBudget", "DifferentialPrivacy", "DedupSampling")  # rules take (budget, dp), (dp, other), (dedup, wf)


def _ordered(a: Any, b: Any, names: frozenset[str]) -> tuple[Any, Any]:
    """``(a, b)`` in the argument order of the rule for ``names``."""
    first = min(names, key=lambda n: _FIRST.index(n) if n in _FIRST else len(_FIRST))
    if type(a).__name__ == first:
        return a, b
    return b, a


def refusal(a: Any, b: Any) -> str | None:
    """Why ``a`` and ``b`` cannot share a trainer, or ``None`` when they work together."""
    na, nb = type(a).__name__, type(b).__name__
    da, db = type(a).declaration, type(b).declaration
    if type(a) is type(b):
        if da.repeatable:
            return None
        return (
            f"two {na} callbacks on one trainer would both apply, one over the other, and the result matches "
            f"neither configuration. Fix: keep one {na}"
        )
    if {da.domain, db.domain} == {"lm", "diffusion"}:
        lm, diff = (na, nb) if da.domain == "lm" else (nb, na)
        return (
            f"{lm} works on Hugging Face causal-LM token batches and {diff} on the DiffusionModule; one of them "
            "would find nothing to act on. Fix: use the callbacks of your model's kind (docs/design.md, interaction table)"
        )
    names = frozenset({na, nb})
    rule = REFUSALS.get(names)
    if rule is None:
        return None
    x, y = _ordered(a, b, names)
    return rule(x, y)


def check_composition(trainer: Any) -> None:
    """Refuse, with one clear error, any pair of callbacks on ``trainer`` that does not compose.

    Called by antimemo callbacks in ``setup``; cheap and idempotent.

    Raises:
        CompositionError: naming both callbacks, the reason and the fix.
    """
    callbacks = declared_callbacks(getattr(trainer, "callbacks", []))
    for a, b in combinations(callbacks, 2):
        reason = refusal(a, b)
        if reason is not None:
            raise CompositionError(f"{type(a).__name__} + {type(b).__name__} are refused together: {reason}")
