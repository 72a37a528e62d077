"""The monitor's evaluation-cost report: the share arithmetic, the suggested cadence, once per fit."""

import itertools
import re

import pytest

from antimemo.callbacks._monitor_cost import EvaluationCost, cost_warning


def _share_and_suggestion(message):
    share = int(re.search(r"took [\d.]+ s, (\d+)% of", message).group(1))
    suggested = int(re.search(r"set every_n_epochs=(\d+)", message).group(1))
    return share, suggested


def test_no_warning_within_budget_including_the_boundary():
    assert cost_warning("M", 0.5, 10.0, every_n_epochs=1) is None  # 5%
    assert cost_warning("M", 1.0, 10.0, every_n_epochs=1) is None  # exactly 10%
    assert cost_warning("M", 0.3, 2.0, every_n_epochs=1, budget=0.2) is None  # 15% <= 20%
    assert cost_warning("M", 1.0, 0.0, every_n_epochs=1) is None  # nothing to compare against


@pytest.mark.parametrize(
    "seconds, other, every, share, suggested",
    [
        (0.4, 2.0, 1, 20, 2),  # 20% at every epoch: every 2 epochs gives 10%
        (0.41, 2.0, 1, 20, 3),  # 20.5%: every 2 epochs would still be 10.25%
        (0.3, 1.0, 2, 30, 6),  # 30% of 2 epochs' time: 6 epochs apart gives 10%
        (1.0, 1.0, 1, 100, 10),
    ],
)
def test_message_reports_share_and_a_cadence_that_meets_the_budget(seconds, other, every, share, suggested):
    message = cost_warning("MemorizationMonitor", seconds, other, every_n_epochs=every)
    assert message.startswith("MemorizationMonitor: one evaluation took")
    assert f"every_n_epochs={every})" in message
    assert _share_and_suggestion(message) == (share, suggested)
    # the suggested cadence meets the budget and one epoch less would not
    per_epoch = other / every
    assert seconds / (per_epoch * suggested) <= 0.10 + 1e-12
    assert seconds / (per_epoch * (suggested - 1)) > 0.10


def _clock(readings):
    it = iter(readings)
    return lambda: next(it)


def test_warns_once_per_fit_and_again_after_a_new_start():
    # start, then three evaluations of 1 s after 2 s of training each (50%)
    readings = [0.0, 2.0, 3.0, 5.0, 6.0, 8.0, 9.0]
    # a second fit: start, one expensive evaluation
    readings += [100.0, 101.0, 102.0]
    cost = EvaluationCost("M", clock=_clock(readings))
    cost.start()
    messages = [cost.evaluated(cost.clock(), every_n_epochs=1) for _ in range(3)]
    assert messages[0] is not None and messages[1:] == [None, None]
    cost.start()
    assert cost.evaluated(cost.clock(), every_n_epochs=1) is not None
    assert cost.seconds == [1.0, 1.0, 1.0, 1.0]


def test_first_cheap_then_expensive_warns_at_the_expensive_one():
    readings = [0.0, 10.0, 10.5, 11.5, 12.5]  # 0.5 s after 10 s (5%), then 1 s after 1 s (100%)
    cost = EvaluationCost("M", clock=_clock(readings))
    cost.start()
    assert cost.evaluated(cost.clock(), every_n_epochs=1) is None
    assert _share_and_suggestion(cost.evaluated(cost.clock(), every_n_epochs=1)) == (100, 10)


def test_evaluation_without_start_is_timed_but_not_judged():
    cost = EvaluationCost("M", clock=_clock(itertools.count()))
    assert cost.evaluated(cost.clock(), every_n_epochs=1) is None
    assert cost.seconds == [1]


def test_a_decode_cycle_is_judged_on_its_average():
    # one expensive decode (2 s after 10 s of training) and four cheap passes (0.1 s after 10 s each)
    ticks = iter([0.0, 10.0, 12.0] + [v for i in range(4) for v in (22.0 + 10.1 * i, 22.1 + 10.1 * i)])
    cost = EvaluationCost("Monitor", clock=lambda: next(ticks))
    cost.start()
    messages = [cost.evaluated(cost.clock(), every_n_epochs=1, cycle=5) for _ in range(5)]
    assert messages == [None] * 5  # (2 + 4 * 0.1) / 50 s = 4.8%, although the decode alone was 20%
    ticks = iter([0.0, 10.0, 12.0])
    single = EvaluationCost("Monitor", clock=lambda: next(ticks))
    single.start()
    assert "one evaluation took 2.00 s, 20%" in single.evaluated(single.clock(), every_n_epochs=1, cycle=1)
