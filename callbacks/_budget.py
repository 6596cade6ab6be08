"""When to measure: the fixed or log-spaced schedule, and the overhead budget shared by a trainer's callbacks.

Schedule. ``"fixed"``: steps t with ``(t + 1) % every_n_steps == 0``. ``"log"``: steps t with t + 1 in
``log_steps()`` (10 per decade: 1, 2, 3, 4, 6, 7, 8, 10, 13, 16, 20, 26, 32, 40, 51, 64, 80, 100, 126,
...), dense early in training where the dynamics change fastest, sparse later.

Budget (``max_overhead``). Each measurement callback times its own measurements (the clock of the
callback that set the ledger up, ``time.perf_counter`` by default). *Training time* is the time since
training started minus every measurement callback's time. A budgeted callback with budget b, among
n budgeted callbacks whose largest budget is B, may spend ``a = min(b, B / n)`` of the training time:
on a step its schedule proposes, it measures when ``spent + last_cost <= a * training_time`` (its
measurement time so far plus what its last measurement cost) and the callbacks' time together plus
that cost stays within ``B * training_time``. Its first measurement is on the first proposed step on
which the callbacks owe no time (``total spent <= B * training_time``; its own cost is unknown until it
has measured once, so that first one may overshoot, and the next waits until it is repaid). Together
the callbacks spend at most B of the training time, each at most an equal share unless its own budget
is smaller; a callback spends its share on as many measurements as its cost allows. Under DDP, rank zero decides and
broadcasts the decision, so every rank measures on the same steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

__all__ = ["SCHEDULES", "OverheadLedger", "check_max_overhead", "check_schedule", "is_scheduled", "log_steps"]

SCHEDULES = ("fixed", "log")
#: Points per decade of the ``"log"`` schedule.
LOG_PER_DECADE = 10


def check_max_overhead(value: Any) -> float | None:
    """``None`` or a number in (0, 1); anything else is one line naming the value and the range."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0.0 < value < 1.0
    if not ok:
        raise ValueError(
            "max_overhead must be None or a number in (0, 1) (the fraction of training time measurements may take), "
            f"got {value!r}"
        )
    return float(value)


def check_schedule(value: Any) -> str:
    if value not in SCHEDULES:
        raise ValueError(f"unknown schedule {value!r}; accepted: {', '.join(SCHEDULES)}")
    return value


def log_steps(upto: int) -> list[int]:
    """The step counts t + 1 <= ``upto`` at which the ``"log"`` schedule measures: ceil(10^(j/10)), deduplicated."""
    out: list[int] = []
    j = 0
    while True:
        n = math.ceil(10 ** (j / LOG_PER_DECADE) - 1e-9)
        if n > upto:
            return out
        if not out or n != out[-1]:
            out.append(n)
        j += 1


def is_scheduled(step: int, every_n_steps: int, schedule: str) -> bool:
    """Whether the schedule proposes optimizer step ``step`` (0-based ``trainer.global_step``)."""
    n = step + 1
    if schedule == "log":
        # n is a schedule point iff it is the ceiling of some 10^(j/10): test the j just below and above
        j = math.floor(LOG_PER_DECADE * math.log10(n)) if n > 1 else 0
        return any(math.ceil(10 ** (i / LOG_PER_DECADE) - 1e-9) == n for i in (j - 1, j, j + 1) if i >= 0)
    return n % every_n_steps == 0


class OverheadLedger:
    """The measurement time of one trainer's callbacks, and the training time it is weighed against.

    One ledger per trainer, held by its ``MeasurementCoordinator`` (created with the clock of the first
    callback set up). Times are in the units of ``clock`` (seconds by default).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.start: float | None = None
        self.start_step = 0
        self.spent: dict[int, float] = {}  # id(callback) -> measurement time this fit
        self.last: dict[int, tuple[int, float]] = {}  # id(callback) -> (step, cost of its last measurement)

    def begin(self, step: int) -> None:
        """Start the training clock (once per fit: later calls of the same fit are no-ops)."""
        if self.start is None:
            self.start, self.start_step = self.clock(), step
            self.spent, self.last = {}, {}

    def end(self) -> None:
        self.start = None

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` out of the training time without charging anyone: setup work done on the
        first batch (the measured loss's check), which is neither training nor a measurement."""
        if self.start is not None:
            self.start += seconds

    def training_time(self) -> float:
        if self.start is None:
            return 0.0
        return max(self.clock() - self.start - sum(self.spent.values()), 0.0)

    def charge(self, callback: object, step: int, seconds: float) -> None:
        """Add a part of ``callback``'s measurement of ``step`` (parts of one step add up to its cost)."""
        key = id(callback)
        self.spent[key] = self.spent.get(key, 0.0) + seconds
        prev = self.last.get(key)
        self.last[key] = (step, prev[1] + seconds if prev is not None and prev[0] == step else seconds)

    def allows(self, callback: object, allowance: float, pool: float) -> bool:
        """Whether ``callback`` may measure now: its own time within ``allowance`` of the training time and
        everyone's within ``pool`` of it, counting what its last measurement cost."""
        key = id(callback)
        train, total = self.training_time(), sum(self.spent.values())
        if key not in self.last:
            return total <= pool * train  # its cost is known only once it has measured: wait until no debt is left
        cost = self.last[key][1]
        return self.spent[key] + cost <= allowance * train and total + cost <= pool * train

    def cost_steps(self, callback: object, step: int) -> float:
        """The last measurement's cost in mean training steps of this fit so far (the steps before ``step``)."""
        last = self.last.get(id(callback))
        steps = step - self.start_step
        train = self.training_time()
        if last is None or train <= 0 or steps <= 0:
            return float("nan")
        return last[1] / (train / steps)
