"""``MemorizationBudget``: hold a memorization figure under a budget by adjusting a mitigation's
strength during training (closed loop).

After every fresh evaluation of the memorization monitor, the callback compares the figure
(default ``memorization/exact_match``) with the budget ``max_value``:

- over budget (``value > max_value``): one step *stronger* (e.g. goldfish ``k`` halved);
- well under (``value < relax_below * max_value``) for ``relax_patience`` evaluations in a row:
  one step *weaker* (e.g. ``k`` doubled), to give fidelity back;
- otherwise the knob stays.

The knob always stays within ``bounds``. See ``docs/ablation.md`` ("MemorizationBudget").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from antimemo._checks import is_number
from antimemo.sections import section_class_names
from antimemo.callbacks._interactions import check_composition, declare

__all__ = ["KNOWN_KNOBS", "MemorizationBudget"]

#: Knobs whose direction and bounds are known: class name -> attribute -> (stronger, integer, bounds).
#: ``stronger`` is ``"decrease"`` when a smaller value mitigates more (goldfish ``k``).
KNOWN_KNOBS: dict[str, dict[str, tuple[str, bool, tuple[float, float]]]] = {
    "GoldfishTokenDropout": {"k": ("decrease", True, (2, 1024))},
    "LossFloor": {"floor": ("increase", False, (0.0, math.inf))},
    "LossTruncation": {"c": ("increase", False, (0.0, 0.95))},
    "SpectralNormPenalty": {"lam": ("increase", False, (0.0, math.inf))},
    "ExampleTiedDropout": {"p_fixed": ("decrease", False, (0.01, 1.0))},
}

class MemorizationBudget(pl.Callback):
    """Keep a memorization figure under ``max_value`` by moving one knob of another callback.

    **Control.** ``control`` names the knob: ``"<callback>.<attribute>"`` or a pair
    ``(callback, attribute)``. ``<callback>`` is a config section name of ``antimemo fit``
    (``goldfish``, ``loss_floor``, ... from :data:`antimemo.sections.CALLBACK_SECTIONS`) or a class
    name (``GoldfishTokenDropout``, ``LossFloor``, or any callback class, subclasses included).
    At ``setup`` exactly one callback in ``trainer.callbacks`` must match. For the knobs in
    :data:`KNOWN_KNOBS` the direction, integrality and bounds are known (goldfish ``k``: smaller is
    stronger, integer, ``[2, 1024]``; ``LossFloor.floor``, ``LossTruncation.c`` (``<= 0.95``),
    ``SpectralNormPenalty.lam``: larger is stronger; ``ExampleTiedDropout.p_fixed``: smaller is
    stronger); for any other attribute pass ``stronger`` (and ``bounds``).

    **Step.** With ``step=None`` (default) a step multiplies or divides the knob by ``factor``
    (``k: 8 -> 4``); with ``step`` it adds or subtracts ``step`` (use this for a knob that
    starts at 0, e.g. ``LossFloor(floor=0)``). Integer knobs are rounded, and move by at least 1.

    **When it reads the figure.** In ``on_validation_end``: Lightning runs every callback's
    ``on_validation_epoch_end`` (where :class:`~antimemo.callbacks.MemorizationMonitor` logs),
    then moves the logged values into ``trainer.callback_metrics``, then runs
    ``on_validation_end``; so the figure is this validation's whatever the order of the
    callbacks. When the metric starts with a ``MemorizationMonitor``'s ``log_prefix``, the
    callback acts only after validations in which that monitor evaluated (its last ``history``
    entry is from the current epoch and not yet acted on; see ``every_n_epochs``);
    otherwise after every validation where the metric is present. The sanity check is ignored.
    A decision applies from the next training batch on; ``ModelCheckpoint`` (always run last by
    Lightning) saves the new value.

    **Logged.** ``budget/<control>`` (e.g. ``budget/goldfish.k``), the knob's value, at every
    training epoch end; and a log line (rank 0) for each change.
    :attr:`history` holds ``[epoch, figure, old, new]`` per decision.

    **DDP.** The figure and the freshness test are taken on rank 0 and broadcast
    (``trainer.strategy.broadcast``), so every rank applies the same decision even if the metric
    was logged without ``sync_dist`` (the monitor's values are already identical on every rank).

    **Checkpoints.** ``state_dict`` holds the knob's value, the decision history and counters
    (plain Python values). On resume the value is written back to the controlled callback in
    ``on_load_checkpoint``, which Lightning calls for every callback before any
    ``load_state_dict``, so callbacks that check their configuration on load
    (``GoldfishTokenDropout``, ``ExampleTiedDropout``) see the value they were saved with.

    Args:
        control: the knob, ``"goldfish.k"`` or ``("LossFloor", "floor")``.
        metric: key in ``trainer.callback_metrics`` (lower = less memorization).
        max_value: the budget.
        relax_below: relax when the figure is below ``relax_below * max_value`` (in ``[0, 1]``;
            0 never relaxes).
        relax_patience: consecutive evaluations well under budget before relaxing (``>= 1``).
        factor: multiplicative step (``> 1``), used when ``step`` is ``None``.
        step: additive step (``> 0``) instead of ``factor``.
        stronger: ``"decrease"`` or ``"increase"``: which way mitigates more (default: from
            :data:`KNOWN_KNOBS`).
        bounds: ``(low, high)`` for the knob (default: from :data:`KNOWN_KNOBS`, else unbounded).
        integer: round the knob (default: from :data:`KNOWN_KNOBS`, else the type of its value).

    Attributes:
        value: the knob's current value (after ``setup``).
        history: ``[[epoch, figure, old, new], ...]``, one entry per decision (``old == new``
            when the knob stayed, e.g. at a bound).

    Example:
        >>> import lightning.pytorch as pl
        >>> from antimemo.callbacks import GoldfishTokenDropout, MemorizationMonitor
        >>> budget = MemorizationBudget(control="goldfish.k", max_value=0.01)
        >>> callbacks = [GoldfishTokenDropout(k=16), MemorizationMonitor(every_n_epochs=5), budget]
        >>> trainer = pl.Trainer(max_epochs=60, check_val_every_n_epoch=5, callbacks=callbacks)  # doctest: +SKIP
        >>> budget.next_value(16, stronger=True), budget.next_value(16, stronger=False)
        (8, 32)
    """

    declaration = declare("knob", domain="lm", note="moves another callback's knob between evaluations")

    def __init__(
        self,
        control: str | tuple[str, str] = "goldfish.k",
        metric: str = "memorization/exact_match",
        max_value: float = 0.01,
        relax_below: float = 0.5,
        relax_patience: int = 2,
        factor: float = 2.0,
        step: float | None = None,
        stronger: str | None = None,
        bounds: tuple[float, float] | None = None,
        integer: bool | None = None,
    ) -> None:
        super().__init__()
        self.target_name, self.attribute = self._check_control(control)
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must be a non-empty metric key, got {metric!r}; e.g. 'memorization/exact_match'")
        self.metric = metric
        if not is_number(max_value) or max_value < 0:
            raise ValueError(f"max_value must be a finite number >= 0, got {max_value!r}; it is the budget, e.g. 0.01")
        self.max_value = float(max_value)
        if not is_number(relax_below) or not 0 <= relax_below <= 1:
            raise ValueError(
                f"relax_below must be a number in [0, 1], got {relax_below!r}; 0.5 relaxes when the figure is "
                "below half the budget, 0 never relaxes"
            )
        self.relax_below = float(relax_below)
        if isinstance(relax_patience, bool) or not isinstance(relax_patience, int) or relax_patience < 1:
            raise ValueError(f"relax_patience must be an integer >= 1, got {relax_patience!r}")
        self.relax_patience = relax_patience
        if not is_number(factor) or factor <= 1:
            raise ValueError(f"factor must be a number > 1, got {factor!r}; factor=2 halves or doubles the knob")
        self.factor = float(factor)
        if step is not None and (not is_number(step) or step <= 0):
            raise ValueError(f"step must be a number > 0 or None (multiplicative steps), got {step!r}")
        self.step = None if step is None else float(step)
        known = KNOWN_KNOBS.get(self._class_name(self.target_name), {}).get(self.attribute)
        if stronger is None:
            if known is None:
                raise ValueError(
                    f"stronger is required for the knob {self.control!r}: pass stronger='decrease' when a smaller "
                    "value mitigates more (like goldfish k) or 'increase' (like a loss floor); known knobs: "
                    + ", ".join(f"{c}.{a}" for c, attrs in KNOWN_KNOBS.items() for a in attrs)
                )
            stronger = known[0]
        if stronger not in ("decrease", "increase"):
            raise ValueError(f"stronger must be 'decrease' or 'increase', got {stronger!r}")
        self.stronger = stronger
        if bounds is None:
            bounds = known[2] if known is not None else (-math.inf, math.inf)
        if (
            not isinstance(bounds, (tuple, list))
            or len(bounds) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            or not bounds[0] <= bounds[1]
        ):
            raise ValueError(f"bounds must be (low, high) numbers with low <= high, got {bounds!r}; e.g. bounds=(2, 64)")
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self._integer_arg = integer if integer is not None else (known[1] if known is not None else None)
        self.integer = bool(self._integer_arg)
        self.value: float | int | None = None
        self.history: list[list[float]] = []
        self._target: Any = None
        self._last_evaluation: list[int] | None = None
        self._under = 0
        self._pending: float | int | None = None

    # ------------------------------------------------------------------------------ helpers

    @staticmethod
    def _check_control(control: Any) -> tuple[str, str]:
        if isinstance(control, str):
            target, _, attribute = control.rpartition(".")
        elif isinstance(control, (tuple, list)) and len(control) == 2 and all(isinstance(c, str) for c in control):
            target, attribute = control
        else:
            target = attribute = ""
        if not target or not attribute:
            raise ValueError(
                f"control must be '<callback>.<attribute>' or a (callback, attribute) pair, got {control!r}; e.g. "
                "control='goldfish.k' or control=('LossFloor', 'floor')"
            )
        return target, attribute

    @property
    def control(self) -> str:
        """``"<callback>.<attribute>"`` as given."""
        return f"{self.target_name}.{self.attribute}"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(control=self.control, metric=self.metric)

    @staticmethod
    def _class_name(name: str) -> str:
        return section_class_names().get(name, name)

    def _clamp(self, value: float) -> float | int:
        value = min(max(value, self.bounds[0]), self.bounds[1])
        if self.integer:
            low, high = math.ceil(self.bounds[0]), math.floor(self.bounds[1])
            return int(min(max(round(value), low), high))
        return float(value)

    def next_value(self, value: float, stronger: bool) -> float | int:
        """The knob after one step (``stronger`` or weaker), within bounds.

        Example:
            >>> b = MemorizationBudget(control=("LossFloor", "floor"), step=0.25, bounds=(0, 1))
            >>> b.next_value(0.0, stronger=True), b.next_value(1.0, stronger=True), b.next_value(0.1, stronger=False)
            (0.25, 1.0, 0.0)
        """
        up = stronger == (self.stronger == "increase")
        if self.step is not None:
            new = value + self.step if up else value - self.step
        else:
            new = value * self.factor if up else value / self.factor
        if self.integer and round(new) == round(value):  # move integer knobs by at least 1
            new = value + 1 if up else value - 1
        return self._clamp(new)

    def decide(self, figure: float) -> float | int:
        """Apply one evaluation's figure: return the knob's new value (the caller stores it in
        :attr:`value`; the relax counter is updated here).

        Example:
            >>> b = MemorizationBudget(control="GoldfishTokenDropout.k", max_value=0.1)
            >>> b.value = 8
            >>> out = []
            >>> for figure in (0.3, 0.01, 0.0):  # over; under once; under twice -> relax
            ...     b.value = b.decide(figure)
            ...     out.append(b.value)
            >>> out
            [4, 4, 8]
        """
        assert self.value is not None
        if figure > self.max_value:
            self._under = 0
            return self.next_value(self.value, stronger=True)
        if figure < self.relax_below * self.max_value:
            self._under += 1
            if self._under >= self.relax_patience:
                self._under = 0
                return self.next_value(self.value, stronger=False)
            return self.value
        self._under = 0
        return self.value

    def _find_target(self, trainer: pl.Trainer) -> Any:
        wanted = self._class_name(self.target_name)
        matches = [
            cb for cb in trainer.callbacks
            if cb is not self and any(c.__name__ == wanted for c in type(cb).__mro__)
        ]  # fmt: skip
        if len(matches) != 1:
            present = [type(cb).__name__ for cb in trainer.callbacks if cb is not self]
            what = "no callback" if not matches else f"{len(matches)} callbacks"
            raise ValueError(
                f"MemorizationBudget(control={self.control!r}): {what} of class {wanted} among the trainer's "
                f"callbacks {present}; add exactly one (e.g. enable the '{self.target_name}' section of the config)"
            )
        target = matches[0]
        if not hasattr(target, self.attribute):
            raise ValueError(
                f"MemorizationBudget(control={self.control!r}): {type(target).__name__} has no attribute "
                f"{self.attribute!r}; name one of its numeric knobs"
            )
        return target

    def _monitor(self, trainer: pl.Trainer) -> Any:
        for cb in trainer.callbacks:
            prefix = getattr(cb, "log_prefix", None)
            if isinstance(prefix, str) and hasattr(cb, "history") and self.metric.startswith(prefix + "/"):
                return cb
        return None

    def _set(self, value: float | int) -> None:
        self.value = value
        if self._target is not None:
            setattr(self._target, self.attribute, value)

    # -------------------------------------------------------------------------------- hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the controlled callback and read the knob's starting value."""
        check_composition(trainer)
        self._target = self._find_target(trainer)
        current = getattr(self._target, self.attribute)
        if not is_number(current):
            raise ValueError(
                f"MemorizationBudget(control={self.control!r}): the knob's value is {current!r}, not a finite number"
            )
        if self._integer_arg is None:
            self.integer = isinstance(current, int)
        if self.step is None and current == 0:
            raise ValueError(
                f"MemorizationBudget(control={self.control!r}): the knob starts at 0, which multiplicative steps "
                "(factor) cannot move; pass step=... (additive) or start from a non-zero value"
            )
        if self._pending is not None:  # restored before setup (load_state_dict without on_load_checkpoint)
            current, self._pending = self._pending, None
        self._set(current)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the figure of this validation (rank 0, broadcast) and move the knob."""
        if trainer.sanity_checking:
            return
        payload: list[Any] = [False, None, None, None]
        if trainer.is_global_zero:
            monitor = self._monitor(trainer)
            raw = trainer.callback_metrics.get(self.metric)
            figure = None if raw is None else float(raw)
            key = None
            if monitor is not None:
                last = monitor.history[-1] if monitor.history else None
                key = None if last is None else [int(last[0]), int(last[1])]
                evaluated = key is not None and key[0] == trainer.current_epoch and key != self._last_evaluation
            else:
                evaluated = True  # any validation is an evaluation of a metric no monitor owns
            missing = None
            if evaluated and figure is None:
                missing = sorted(str(k) for k in trainer.callback_metrics)
            payload = [bool(evaluated and figure is not None and not math.isnan(figure)), figure, key, missing]
        fresh, figure, key, missing = trainer.strategy.broadcast(payload, src=0)
        if missing is not None:
            raise ValueError(
                f"MemorizationBudget(metric={self.metric!r}): the metric is not in trainer.callback_metrics after an "
                f"evaluation, so the budget could never act. Keys present: {missing}. Fix: pass metric=... naming one "
                "of them (e.g. 'memorization/exact_match'), or add the callback that logs it"
            )
        if not fresh:
            return
        if key is not None:
            self._last_evaluation = list(key)
        old = self.value
        new = self.decide(figure)
        self.history.append([int(trainer.current_epoch), float(figure), float(old), float(new)])
        if new != old:
            self._set(new)
            direction = "stronger" if (new < old) == (self.stronger == "decrease") else "weaker"
            rank_zero_info(
                f"MemorizationBudget: {self.metric}={figure:.4f} (budget {self.max_value:g}) after epoch "
                f"{trainer.current_epoch + 1}: {self.control} {old} -> {new} ({direction})"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``budget/<control>``, the knob's value."""
        if self.value is not None:
            pl_module.log(f"budget/{self.control}", float(self.value), on_step=False, on_epoch=True, sync_dist=True)

    # --------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        """The knob's value, the decision history and counters (plain Python values)."""
        return {
            "control": self.control,
            "value": self.value,
            "history": [list(h) for h in self.history],
            "last_evaluation": self._last_evaluation,
            "under": self._under,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the knob's value (written to the controlled callback) and the history."""
        if state_dict.get("control") != self.control:
            raise ValueError(
                f"MemorizationBudget: the checkpoint controls {state_dict.get('control')!r} but this one "
                f"{self.control!r}; resume with the same control"
            )
        self.history = [list(h) for h in state_dict.get("history", [])]
        last = state_dict.get("last_evaluation")
        self._last_evaluation = None if last is None else [int(v) for v in last]
        self._under = int(state_dict.get("under", 0))
        value = state_dict.get("value")
        if value is not None:
            if self._target is not None:
                self._set(value)
            else:
                self.value, self._pending = value, value

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Mapping[str, Any]
    ) -> None:
        """Put the saved knob value on the controlled callback before its own ``load_state_dict``."""
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if state and state.get("value") is not None and self._target is not None:
            self._set(state["value"])
