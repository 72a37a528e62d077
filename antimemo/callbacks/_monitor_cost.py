"""Wall-time cost of a monitor's evaluations against the rest of the fit.

A memorization evaluation costs a fixed amount of work (greedy decoding of every probe), so its
share of training time depends on how much training happens between evaluations: with the
recipe's model, one ``MemorizationMonitor()`` evaluation costs about 4 training steps, which is
20% of a 16-step epoch and 1% of a 446-step one (docs/benchmarks.md). :class:`EvaluationCost`
times each evaluation and the fit time since the previous one, so that the monitor can say, once
per fit, when it takes more than ``budget`` of the fit and which ``every_n_epochs`` would not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["EvaluationCost", "cost_warning"]

DEFAULT_BUDGET = 0.10


def cost_warning(
    name: str, seconds: float, other_seconds: float, every_n_epochs: int, budget: float = DEFAULT_BUDGET
) -> str | None:
    """The warning text when an evaluation of ``seconds`` exceeds ``budget`` of the
    ``other_seconds`` the fit spent outside the monitor since its previous evaluation, else None.

    The suggested ``every_n_epochs`` assumes epochs of equal length: spacing evaluations ``f``
    times further apart divides their share by ``f``.

    Example:
        >>> cost_warning("MemorizationMonitor", 0.1, 10.0, every_n_epochs=1) is None
        True
        >>> print(cost_warning("MemorizationMonitor", 0.4, 2.0, every_n_epochs=1))  # doctest: +ELLIPSIS
        MemorizationMonitor: one evaluation took 0.40 s, 20% of the 2.00 s ... set every_n_epochs=2, ...
    """
    if other_seconds <= 0.0:
        return None
    share = seconds / other_seconds
    if share <= budget:
        return None
    suggested = math.ceil(every_n_epochs * share / budget - 1e-9)
    return (
        f"{name}: one evaluation took {seconds:.2f} s, {share:.0%} of the {other_seconds:.2f} s the "
        f"fit spent since the previous one (every_n_epochs={every_n_epochs}). To keep the monitor "
        f"under {budget:.0%} of training time, set every_n_epochs={suggested}, or use fewer probes "
        "(num_probes) or a larger batch_size. An evaluation is a fixed amount of work whatever the "
        "epoch length, so short epochs make it relatively expensive; see docs/monitor.md, 'Cost'. "
        "This is reported once per fit."
    )


class EvaluationCost:
    """Times evaluations and the fit time between them; see :func:`cost_warning`.

    Call :meth:`start` when the fit starts, then :meth:`evaluated` after each evaluation with the
    clock reading taken just before it and the monitor's current ``every_n_epochs``. ``seconds``
    lists every evaluation's wall time.

    Example:
        >>> ticks = iter([0.0, 10.0, 10.5, 20.5, 22.5])
        >>> cost = EvaluationCost("Monitor", clock=lambda: next(ticks))
        >>> cost.start()
        >>> began = cost.clock()
        >>> cost.evaluated(began, every_n_epochs=1) is None     # 0.5 s against 10 s: 5%
        True
        >>> began = cost.clock()
        >>> cost.evaluated(began, every_n_epochs=1)[:40]        # 2 s against 10 s: 20%
        'Monitor: one evaluation took 2.00 s, 20%'
        >>> cost.seconds
        [0.5, 2.0]
    """

    def __init__(
        self,
        name: str,
        budget: float = DEFAULT_BUDGET,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self.budget = budget
        self.clock = clock
        self.seconds: list[float] = []
        self._pairs: list[tuple[float, float]] = []  # (evaluation, fit time before it) this fit
        self._mark: float | None = None
        self._warned = False

    def start(self) -> None:
        """A new fit: time from now, and warn again at most once."""
        self._mark = self.clock()
        self._warned = False
        self._pairs = []

    def evaluated(self, began: float, every_n_epochs: int, cycle: int = 1) -> str | None:
        """Record an evaluation that began at clock reading ``began`` and ended now; return the
        warning text the first time in this fit that evaluations exceed the budget.

        ``cycle`` evaluations are judged together (their summed time against the summed fit time
        before them), once that many have run: a monitor that decodes fully every
        ``decode_every_n_evaluations`` and scores cheaply in between is judged on its average,
        not on its one expensive evaluation.

        Example:
            >>> ticks = iter([0.0, 10.0, 12.0, 32.0, 32.1])
            >>> cost = EvaluationCost("Monitor", clock=lambda: next(ticks))
            >>> cost.start()
            >>> cost.evaluated(cost.clock(), every_n_epochs=1, cycle=2) is None  # 2 s of 10 s: wait
            True
            >>> cost.evaluated(cost.clock(), every_n_epochs=1, cycle=2) is None  # (2 + 0.1) s of 30 s: 7%
            True
        """
        ended = self.clock()
        seconds = ended - began
        self.seconds.append(seconds)
        other = None if self._mark is None else began - self._mark
        self._mark = ended
        if other is None or self._warned:
            return None
        self._pairs.append((seconds, other))
        if len(self._pairs) < cycle:
            return None
        window = self._pairs[-cycle:]
        seconds, other = sum(s for s, _ in window), sum(o for _, o in window)
        message = cost_warning(self.name, seconds, other, every_n_epochs, self.budget)
        self._warned = message is not None
        return message
