"""One coordinator per trainer: the shared gradient G, the overhead budget and the checked loss.

The measurement callbacks of one trainer do not look for each other. At ``setup`` each registers
with the trainer's ``MeasurementCoordinator`` (``MeasurementCoordinator.of(trainer)``, the one place
it is found or created: one callback alone gets one too), and asks it for what they share:

- **G**, the float32 gradient of the measured loss on the step's batch at the weights W^t, for the
  callbacks that start from it (``needs_gradient``: ``LossLandscape``, ``InternalCovariateShift``).
  On a step where two or more of them measure the same batch with the same loss, the first to ask
  computes G once (``step_gradient``, the functions' own first pass: the same numbers) and every
  other one gets that object; a callback measuring alone computes G inside its own function.
  G is asked for before the optimizer step (``InternalCovariateShift`` asks in its ``before_step``),
  handed out with the RNG state it was computed at (so every later pass replays the same random
  draws), and dropped at the end of the step.
- the **overhead budget** (``OverheadLedger``): the time of every budgeted callback and the
  allowance each may spend (``bnlightning.callbacks._budget``);
- the **measured loss** once it has been checked on the first batch, for callbacks given the same
  ``loss_fn`` and ``loss_method``.

Our callbacks leave the module exactly as they found it (``observer_guard``), so between them
nothing changes. A callback of someone else's that writes a parameter or buffer in place between
two of ours would make G stale: the coordinator notices (version counters) and lets the next one
compute its own.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import lightning.pytorch as pl
import torch

from bnlightning.callbacks._budget import OverheadLedger
from bnlightning.callbacks.functional import StepGradient, step_gradient
from bnlightning.callbacks.functional._loss import ResolvedLoss
from bnlightning.callbacks.guard import RngState

if TYPE_CHECKING:
    from bnlightning.callbacks.base import MeasurementCallback

__all__ = ["MeasurementCoordinator", "SharedGradient"]


class SharedGradient(NamedTuple):
    """G of one measured step and the RNG state it was computed at (restore it to replay its draws)."""

    gradient: StepGradient
    rng: RngState


def _module_state(module: torch.nn.Module) -> tuple[Any, ...]:
    """What a gradient pass reads from the module besides the batch: tensors (by version) and train flags."""
    return (
        tuple((id(t), t._version) for t in module.parameters()),
        tuple((id(t), t._version) for t in module.buffers()),
        tuple(m.training for m in module.modules()),
    )


def _loss_of(callback: MeasurementCallback) -> tuple[Any, ...]:
    """The loss a callback measures, as configured: callbacks share G only when it is the same."""
    return (callback.loss_fn, callback.loss_method)


class MeasurementCoordinator:
    """What the measurement callbacks of one trainer share; get it with ``MeasurementCoordinator.of(trainer)``.

    Attributes:
        callbacks: the registered callbacks, in the order they registered (their ``setup`` order).
        ledger: the overhead budget's ledger, with the clock of the first callback registered.
        gradient_passes: how many times this coordinator computed G (one per step shared).

    Example::

        trainer = Trainer(callbacks=[InternalCovariateShift(), LossLandscape()])
        trainer.fit(model)
        MeasurementCoordinator.of(trainer).gradient_passes  # one per step both measured
    """

    _by_trainer: weakref.WeakKeyDictionary[pl.Trainer, MeasurementCoordinator] = weakref.WeakKeyDictionary()

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.callbacks: list[MeasurementCallback] = []
        self.ledger = OverheadLedger(clock)
        self.gradient_passes = 0
        self._losses: list[tuple[Any, str | None, ResolvedLoss]] = []
        self._gradient: tuple[int, Any, tuple[Any, ...], tuple[Any, ...], SharedGradient] | None = None

    @classmethod
    def of(cls, trainer: pl.Trainer, clock: Callable[[], float] = time.perf_counter) -> MeasurementCoordinator:
        """The coordinator of ``trainer``, created on first use (with ``clock`` for its ledger).

        Held weakly per trainer: it lives as long as the trainer, and two trainers never share one.
        """
        found = cls._by_trainer.get(trainer)
        if found is None:
            found = cls._by_trainer[trainer] = cls(clock)
        return found

    def register(self, callback: MeasurementCallback) -> None:
        """Add ``callback`` (once; a second fit of the same trainer registers again, harmlessly)."""
        if not any(cb is callback for cb in self.callbacks):
            self.callbacks.append(callback)

    # --- the overhead budget ------------------------------------------------------------------
    def budgets(self) -> list[float]:
        """``max_overhead`` of every budgeted callback."""
        return [cb.max_overhead for cb in self.callbacks if cb.max_overhead is not None]

    def pool(self, callback: MeasurementCallback) -> float:
        """What all callbacks together may spend: the largest budget (``callback``'s when it is alone)."""
        return max(self.budgets(), default=callback.max_overhead or 0.0)

    def allowance(self, callback: MeasurementCallback) -> float:
        """``callback``'s share: its own budget, at most the largest budget over the budgeted callbacks."""
        budgets = self.budgets() or [callback.max_overhead or 0.0]
        return min(callback.max_overhead or 0.0, max(budgets) / len(budgets))

    # --- the measured loss ------------------------------------------------------------------
    def checked_loss(self, loss_fn: Any, loss_method: str | None) -> ResolvedLoss | None:
        """The loss a callback given the same ``loss_fn`` and ``loss_method`` has checked, if any."""
        return next((loss for fn, method, loss in self._losses if (fn, method) == (loss_fn, loss_method)), None)

    def remember_loss(self, loss_fn: Any, loss_method: str | None, loss: ResolvedLoss) -> None:
        self._losses.append((loss_fn, loss_method, loss))

    # --- G ------------------------------------------------------------------------------------
    def gradient(
        self, callback: MeasurementCallback, trainer: pl.Trainer, module: pl.LightningModule, batch: Any
    ) -> SharedGradient | None:
        """G of this step's ``batch`` at the module's current weights when another registered callback
        that needs it measures this batch too, else ``None`` (compute it yourself).

        Call before the optimizer step, inside the observer guard. Computed once per step: the first
        caller pays, the others get the same object.
        """
        step, loss, state = trainer.global_step, _loss_of(callback), _module_state(module)
        if self._gradient is not None:
            held_step, held_batch, held_loss, held_state, shared = self._gradient
            if held_step == step and held_batch is batch and held_loss == loss and held_state == state:
                return shared
        peers = (cb for cb in self.callbacks if cb is not callback and cb.needs_gradient and _loss_of(cb) == loss)
        if not any(cb.will_measure(batch) for cb in peers):
            return None
        rng = RngState.capture()  # step_gradient replays from here and rewinds
        gradient = step_gradient(module, batch, loss_fn=callback.measured_loss(module), reduce=callback.reduce(trainer))
        self.gradient_passes += 1
        shared = SharedGradient(gradient, rng)
        self._gradient = (step, batch, loss, state, shared)
        return shared

    def end_step(self) -> None:
        """Drop G: nothing outlives the step it was computed for."""
        self._gradient = None

    def holds_gradient(self) -> bool:
        return self._gradient is not None
