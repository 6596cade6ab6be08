"""Clocks and statistics of the benchmark scripts.

Every script measures the two sides of a ratio in one process, alternating their order
between repeats (so a slow spell of a shared machine hits both sides), and reports
medians. A :class:`Clock` is read only after a device sync, so that asynchronous CUDA
work is counted where it happens; scripts build one from ``--clock`` and pass it to
whatever reads time (no module-level clock to swap).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` so the next clock reading includes it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Clock:
    """Seconds on ``device``: wall time (``perf_counter``) or this process's CPU time.

    On a shared machine, wall time includes the time other jobs held the cores; the CPU
    time this process used is far less sensitive to that (best with ``--threads 1``, so no
    thread spins waiting for a preempted sibling). CPU time does not count DataLoader
    worker processes and means nothing for GPU work.

    Example::

        clock = Clock(torch.device("cpu"))
        seconds, result = clock.timed(lambda: model(x))
    """

    device: torch.device
    kind: Literal["wall", "cpu"] = "wall"

    def now(self) -> float:
        """The clock after a device sync."""
        sync(self.device)
        return time.process_time() if self.kind == "cpu" else time.perf_counter()

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """Seconds ``fn()`` takes and its result."""
        t0 = self.now()
        out = fn()
        return self.now() - t0, out


def make_clock(parser: argparse.ArgumentParser, kind: str, device: torch.device) -> Clock:
    """The clock ``--clock`` asks for, or one ``error:`` line (CPU time of GPU work means nothing)."""
    if kind == "cpu" and device.type != "cpu":
        parser.error("argument --clock: cpu time only measures CPU training; use --clock wall on a GPU")
    return Clock(device, "cpu" if kind == "cpu" else "wall")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """Half the range relative to the median, in percent: a plain noise indicator."""
    if len(values) < 2:
        return 0.0
    m = median(values)
    return 100.0 * (max(values) - min(values)) / 2 / m if m else float("nan")


def verdict(value: float, target: float, noise: float, higher_is_better: bool = True) -> str:
    """Whether ``value`` meets ``target`` *beyond* this run's ``noise`` (same units as ``value``).

    A timing whose noise band straddles the target decides nothing: it reads "within noise",
    not "met" or "MISSED", so a busy machine never turns into a verdict.

    >>> verdict(0.97, 0.95, 0.01), verdict(0.90, 0.95, 0.01), verdict(0.94, 0.95, 0.03)
    ('met', 'missed', 'within noise (±0.03): not decided by this run')
    >>> verdict(8.0, 10.0, 1.0, higher_is_better=False)
    'met'
    """
    margin = (value - target) if higher_is_better else (target - value)
    if abs(margin) <= noise:
        return f"within noise (±{noise:.3g}): not decided by this run"
    return "met" if margin > 0 else "missed"


def alternate(names: Sequence[str], repeat: int) -> list[str]:
    """The run order of repeat ``repeat``: ``names`` forwards on even repeats, backwards on odd ones."""
    return list(names) if repeat % 2 == 0 else list(reversed(names))
