"""What the measurement callbacks share: when to measure, on what, with which loss, how to log.

Timing. A callback measures on optimizer steps ``t`` with ``(t + 1) % every_n_steps == 0``
(``t`` = ``trainer.global_step`` before the step), or on log-spaced steps (``schedule="log"``), the
same steps on every rank, so collectives (the DDP mean, SyncBatchNorm) cannot hang. With
``max_overhead`` the callback also skips proposed steps to keep its measurement time within that
fraction of the training time (``bnlightning.callbacks._budget``: rank zero decides, every rank follows).

Batch. ``on_train_batch_start`` keeps a reference to the batch of a measured step; with gradient
accumulation that is the *last micro-batch* of the step, not the whole effective batch. Measurements
of the weights at step t run in ``on_before_optimizer_step`` (weights still W^t, outside autocast);
``InternalCovariateShift`` finishes right after the real optimizer step (see there). Everything runs
inside ``observer_guard``.

Loss. Resolved once, at setup, from what the module's signatures say (``functional._loss``):
``loss_fn(module, batch)`` if given (a callable, or an import path such as
``"my_pkg.losses:lm_loss"`` from YAML), else ``module.<loss_method>(batch)`` if given, else the
module's ``loss`` method when it takes one batch (an ``nn.Module`` attribute never counts), else its
own ``training_step`` called with the arguments it accepts, with its ``self.log`` calls silenced and
its torchmetrics states restored: no edit to the user's module is needed. On the first training
batch the callback checks, inside the guard, that the loss gives a scalar depending on the trainable
parameters (falling back from ``loss`` to ``training_step`` when only the latter does), so a wrong
loss stops the fit before training goes on, in one line that says how to pass ``loss_fn``.

Failures. A measurement that raises a ``RuntimeError`` (torch's error for what a kernel, the
compiler or the device cannot do: no double backward, out of memory, ...) does not end the run:
the callback logs one warning, keeps the reason in ``failure``, measures no more in this fit, and
training goes on. Any other exception (a bad argument, a bug, ``ObserverEffectError``) propagates
with its traceback, and so does every error under DDP with more than one process (a rank that
carried on would wait forever in the measurement's collectives).

Ranks. Under DDP every gradient and loss behind a measurement is averaged over ranks
(``trainer.strategy.reduce``) before any norm or ratio, so every rank computes the same number and
it does not depend on the world size; only rank zero logs.

Names. Metric names drop the ``_orig_mod`` segments ``torch.compile`` puts into module names
(``act/net._orig_mod.relu1/mean`` is logged as ``act/net.relu1/mean``), so a compiled run and an
uncompiled one log the same keys.

Logging. Through the public logger API, as Lightning's ``LearningRateMonitor`` does: on rank zero,
``logger.log_metrics(metrics, step=t)`` for each of ``trainer.loggers``, whatever
``log_every_n_steps`` is. With a ``WandbLogger`` attached each callback also keeps the history of
its scalars and, at the end of training, logs one line chart per measurement.

Sharing. The callbacks of one trainer share G (the gradient behind a measured step), the
overhead budget and the checked loss through the trainer's ``MeasurementCoordinator``
(``bnlightning.callbacks.coordinator``), with which each registers at setup; they never look for
each other.

State key. Lightning tells callbacks of one type apart, in checkpoints and profiler names, by
``state_key``: here the class name and every constructor argument that differs from its default (as
given, or as reassigned later; a callable by its import path), so two instances with different
arguments never collide and a resumed run finds its callbacks' counters.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import Self, override

from bnlightning.callbacks._budget import OverheadLedger, check_max_overhead, check_schedule, is_scheduled
from bnlightning.callbacks.coordinator import MeasurementCoordinator, SharedGradient
from bnlightning.callbacks.functional._harness import check_loss
from bnlightning.callbacks.functional._loss import (
    LossFn,
    ResolvedLoss,
    check_loss_fn,
    check_loss_method,
    loss_candidates,
)
from bnlightning.callbacks.functional._numerics import Reduce, can_run_eager
from bnlightning.callbacks.functional._updates import check_optimizer
from bnlightning.callbacks.functional.names import metric_name
from bnlightning.callbacks.guard import ObserverEffectError, observer_guard

__all__ = ["MeasurementCallback"]

log = logging.getLogger("bnlightning.callbacks")

T = TypeVar("T")


_SIGNATURES: dict[type, tuple[inspect.Signature, dict[str, Any]]] = {}  # per class, read once


def _init_signature(cls: type) -> inspect.Signature:
    if cls not in _SIGNATURES:
        signature = inspect.signature(cls.__init__)  # type: ignore[misc]  # a class's __init__, read, not called
        params = list(signature.parameters.values())[1:]  # without self
        _SIGNATURES[cls] = (
            signature,
            {p.name: p.default for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)},
        )
    return _SIGNATURES[cls][0]


def _init_defaults(cls: type) -> dict[str, Any]:
    """Constructor parameter name -> default (``inspect.Parameter.empty`` when it has none), of ``cls``."""
    _init_signature(cls)
    return _SIGNATURES[cls][1]


def _key_value(value: Any) -> Any:
    """A value as the state key shows it: the same in every process (a callable by its import path)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_key_value(v) for v in value)
    if callable(value):
        named = value if hasattr(value, "__qualname__") else type(value)
        return f"{named.__module__}:{named.__qualname__}"
    return value


def _is_default(value: Any, default: Any) -> bool:
    try:
        return bool(value is default or (type(value) is type(default) and value == default))
    except (RuntimeError, TypeError, ValueError):  # e.g. a tensor: never a default
        return False


def _is_compiled(module: torch.nn.Module) -> bool:
    """``torch.compile`` anywhere: ``trainer.fit(torch.compile(module))`` (Lightning unwraps it and keeps a
    ``_compiler_ctx``), ``self.net = torch.compile(self.net)`` (an ``OptimizedModule`` child), ``m.compile()``."""
    if getattr(module, "_compiler_ctx", None):
        return True
    optimized = torch._dynamo.eval_frame.OptimizedModule
    return any(
        isinstance(m, optimized) or getattr(m, "_compiled_call_impl", None) is not None for m in module.modules()
    )


def wandb_loggers(trainer: pl.Trainer) -> list[Any]:
    """The trainer's ``WandbLogger``s (empty without wandb installed)."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class MeasurementCallback(Callback):
    """Base class: schedule, batch stash, loss, guard, DDP mean, logging, counters and W&B charts.

    Subclasses implement ``measure(trainer, pl_module, batch, optimizer) -> dict[str, Tensor]``
    (called inside the guard in ``on_before_optimizer_step``) and may set ``charts()``; a measurement
    that needs the weights after the optimizer step too subclasses ``TwoStepMeasurement`` instead. A
    subclass that starts from G sets ``needs_gradient`` and asks ``shared_gradient`` for it.

    Args:
        every_n_steps: measure every this many optimizer steps (>= 1).
        loss_fn: ``(module, batch) -> scalar loss``, or its import path ``"package.module:function"``.
        loss_method: name of the module's ``(batch) -> loss`` method (``"training_step"`` for its
            training step), used when ``loss_fn`` is not given. Default: the module's ``loss`` method
            if it takes one batch, else its ``training_step``.
        max_overhead: ``None`` (measure on every step the schedule proposes) or a fraction in (0, 1): the
            callback times its measurements and skips proposed steps so that its measurement time stays
            within this fraction of the training time so far (shared fairly with the other budgeted
            callbacks; ``every_n_steps`` is then the densest spacing); logs ``<prefix>/cost_steps``.
        schedule: ``"fixed"`` (every ``every_n_steps`` steps) or ``"log"`` (about 10 steps per decade:
            1, 2, 3, 4, 6, 7, 8, 10, 13, 16, 20, ..., 100, 126, ...; ``every_n_steps`` is not used).

    Attributes:
        failure: why this callback stopped measuring in this fit (see Failures above), else ``None``.

    Raises:
        ValueError: ``every_n_steps < 1``, a ``loss_method`` that is not a name, a ``loss_fn`` that does
            not import or is an ``nn.Module``, ``max_overhead`` not in (0, 1), an unknown ``schedule``;
            at setup a ``loss_method`` that takes no batch (the accepted names are listed); at the
            first batch, no loss of that batch (one line).
        MisconfigurationException: at setup, manual optimization, a strategy other than single-device
            or DDP, or a closure optimizer (LBFGS).
        AttributeError: at setup, an unknown ``loss_method``, or no ``loss_fn``, no ``loss(batch)`` and
            no ``training_step``.
    """

    #: Subclasses whose measurement starts with G at W^t set this (the coordinator shares it on a step).
    needs_gradient = False
    #: The first part of the callback's metric names (``<prefix>/cost_steps``).
    metric_prefix = "measurement"
    #: The clock the overhead budget reads (seconds); tests replace it on the instance.
    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        self = super().__new__(cls)
        # The constructor's arguments as given, for state_key (a copy or an unpickled instance gets its own).
        bound = _init_signature(cls).bind_partial(None, *args, **kwargs)
        self.__dict__["_arguments"] = {k: v for k, v in list(bound.arguments.items())[1:] if k in _init_defaults(cls)}
        return self

    def __init__(
        self,
        every_n_steps: int = 100,
        loss_fn: LossFn | str | None = None,
        loss_method: str | None = None,
        max_overhead: float | None = None,
        schedule: str = "fixed",
    ) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.max_overhead = check_max_overhead(max_overhead)
        self.schedule = check_schedule(schedule)
        self.coordinator: MeasurementCoordinator | None = None  # the trainer's, from setup on
        self._decision: tuple[int, bool] = (-1, False)
        self.loss_fn = loss_fn  # as given (an import path stays a string, for hyper-parameters and YAML)
        self.loss_method = check_loss_method(loss_method)
        self._loss_fn = check_loss_fn(loss_fn)  # the callable, imported once
        self._losses: list[ResolvedLoss] = []  # what the rule allows, resolved at setup
        self._loss: ResolvedLoss | None = None  # the one measured, checked on the first batch
        self.failure: str | None = None
        self.measurements = 0
        self.last_measured_step = -1
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._batch: Any = None
        self._keep_history = False

    @property
    def overhead_ledger(self) -> OverheadLedger | None:
        """The budget's ledger, shared by the trainer's callbacks (``None`` before setup)."""
        return self.coordinator.ledger if self.coordinator is not None else None

    # --- schedule ---------------------------------------------------------------------
    def is_measurement_step(self, step: int) -> bool:
        """Whether the schedule proposes ``step`` and the callback still measures (the budget may still
        skip it: see ``decide``; a failure turns the callback off: see Failures above)."""
        return self.failure is None and is_scheduled(step, self.every_n_steps, self.schedule)

    def decide(self, trainer: pl.Trainer) -> bool:
        """Whether to measure on this step: the schedule, then the budget; once per step, the same on every rank."""
        step = trainer.global_step
        if self._decision[0] == step:
            return self._decision[1]  # gradient accumulation: one decision per optimizer step
        measure = self.is_measurement_step(step)
        coordinator = self.coordinator
        if measure and self.max_overhead is not None and coordinator is not None:
            measure = (
                coordinator.ledger.allows(self, coordinator.allowance(self), coordinator.pool(self))
                if trainer.is_global_zero
                else False
            )
            if trainer.world_size > 1:
                measure = bool(trainer.strategy.broadcast(measure, src=0))
        self._decision = (step, measure)
        return measure

    @contextlib.contextmanager
    def timed(self, trainer: pl.Trainer, step: int) -> Iterator[None]:
        """Charge the time of the block to this callback's measurement of ``step`` (the budget's ledger)."""
        ledger = self.overhead_ledger
        t0 = ledger.clock() if ledger is not None else 0.0
        try:
            yield
        finally:
            if ledger is not None:
                ledger.charge(self, step, ledger.clock() - t0)

    def will_measure(self, batch: Any) -> bool:
        """Whether this callback still has ``batch`` to measure on this step."""
        return self._batch is not None and self._batch is batch

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads this for every hook call of every step (profiler names): built once,
        # rebuilt after a constructor argument is reassigned (see __setattr__).
        key = self.__dict__.get("_state_key_cache")
        if key is None:
            defaults, given = _init_defaults(type(self)), self.__dict__.get("_arguments", {})
            changed = {k: _key_value(v) for k, v in given.items() if not _is_default(v, defaults[k])}
            key = self._generate_state_key(**changed)
            self.__dict__["_state_key_cache"] = key
        return key

    def __setattr__(self, name: str, value: Any) -> None:
        # A constructor argument reassigned after construction (the attribute exists already) is part of
        # the key from now on; the first assignment, in __init__, stores what was given.
        arguments = self.__dict__.get("_arguments")
        if arguments is not None and name in self.__dict__ and name in _init_defaults(type(self)):
            arguments[name] = value
            self.__dict__.pop("_state_key_cache", None)
        super().__setattr__(name, value)

    # --- setup checks -------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"{name} needs automatic optimization (it measures between backward and the optimizer step); "
                f"{type(pl_module).__name__} sets `automatic_optimization = False`. Remove the callback or call the "
                "functions "
                f"of `bnlightning.callbacks.functional` from your training_step."
            )
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise MisconfigurationException(
                f"{name} supports the single-device and DDP strategies (every rank holds all parameters); "
                f"got {type(strategy).__name__}."
            )
        self._losses = loss_candidates(pl_module, self._loss_fn, self.loss_method)
        self._loss, self.failure = None, None
        if _is_compiled(pl_module) and not can_run_eager():  # pragma: no cover - torch < 2.6
            warnings.warn(
                f"{name}: the module (or a submodule) is torch.compile'd and this torch has no "
                "torch.compiler.set_stance; "
                f"measurement passes run compiled and may recompile, and HessianSpectrum fails (no double backward).",
                stacklevel=2,
            )
        self.coordinator = MeasurementCoordinator.of(trainer, self.clock)
        self.coordinator.register(self)
        self._keep_history = bool(wandb_loggers(trainer))
        self.on_measurement_setup(trainer, pl_module)

    def on_measurement_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Subclass hook: validate layer names etc. once the module is known."""

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for opt in trainer.optimizers:
            if isinstance(opt, torch.optim.LBFGS):
                try:
                    check_optimizer(opt)
                except TypeError as err:
                    raise MisconfigurationException(f"{type(self).__name__}: {err}") from None

    # --- the loss ---------------------------------------------------------------------------
    def measured_loss(self, pl_module: pl.LightningModule) -> ResolvedLoss:
        """The loss this callback measures: resolved at setup and checked on the first batch (called
        outside a Trainer, the rule's first candidate for ``pl_module``)."""
        if self._loss is None:
            self._loss = (self._losses or loss_candidates(pl_module, self._loss_fn, self.loss_method))[0]
        return self._loss

    def _check_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """On the first batch of the fit: keep the first candidate that is a loss of it, or stop in one line.
        A callback given the same ``loss_fn`` and ``loss_method`` has checked the same thing: its result is taken."""
        coordinator = self.coordinator
        known = coordinator.checked_loss(self.loss_fn, self.loss_method) if coordinator is not None else None
        if known is not None:
            self._loss = known
            return
        ledger = self.overhead_ledger
        t0 = ledger.clock() if ledger is not None else 0.0
        try:
            with observer_guard(pl_module, trainer.optimizers):
                self._loss, skipped = check_loss(pl_module, batch, self._losses)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from err.__cause__
        finally:
            if ledger is not None:
                ledger.exclude(ledger.clock() - t0)  # setup work: not training time for the budget
        if coordinator is not None:
            coordinator.remember_loss(self.loss_fn, self.loss_method, self._loss)
        log.info(
            "%s measures %s%s", type(self).__name__, self._loss.name, f" ({'; '.join(skipped)})" if skipped else ""
        )

    def measure_or_stop(self, trainer: pl.Trainer, step: int, measure: Callable[[], T]) -> T | None:
        """``measure()``, or ``None`` after a failure that turns this callback off (see Failures above)."""
        try:
            return measure()
        except ObserverEffectError:
            raise
        except RuntimeError as err:
            if trainer.world_size > 1:
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self.failure = f"step {step}: {type(err).__name__}: {first}"
            log.warning("%s stopped measuring in this fit (training goes on): %s", type(self).__name__, self.failure)
            log.debug("%s failure", type(self).__name__, exc_info=err)
            return None

    # --- the measured step ----------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.overhead_ledger is not None:
            self.overhead_ledger.begin(trainer.global_step)
        self._decision = (-1, False)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._loss is None and self._losses:
            self._check_loss(trainer, pl_module, batch)
        # With gradient accumulation this runs per micro-batch: the last one is kept.
        self._batch = batch if self.decide(trainer) else None

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._batch is None or not self.is_measurement_step(trainer.global_step):
            return
        batch = self._batch

        def guarded() -> dict[str, Tensor]:
            with self.timed(trainer, trainer.global_step), observer_guard(pl_module, [optimizer]):
                return self.measure(trainer, pl_module, batch, optimizer)

        metrics = self.measure_or_stop(trainer, trainer.global_step, guarded)
        self._batch = None
        if metrics is not None:
            self.record(trainer, metrics)

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def reduce(self, trainer: pl.Trainer) -> Reduce | None:
        """The mean over ranks the measurement applies to its gradients and losses (``None`` on one process)."""
        if trainer.world_size <= 1:
            return None
        strategy = trainer.strategy
        return lambda t: strategy.reduce(t, reduce_op="mean")

    def record(self, trainer: pl.Trainer, metrics: dict[str, Tensor], step: int | None = None) -> None:
        """Count the measurement and hand its scalars to every logger (rank zero only)."""
        step = trainer.global_step if step is None else step
        values = {metric_name(k): float(v) for k, v in metrics.items()}
        if self.max_overhead is not None and self.overhead_ledger is not None:
            values[f"{self.metric_prefix}/cost_steps"] = self.overhead_ledger.cost_steps(self, step)
        self.measurements += 1
        self.last_measured_step = step
        if self._keep_history:
            for k, v in values.items():
                self.history.setdefault(k, []).append((step, v))
        if trainer.is_global_zero and values:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)

    # --- G shared between callbacks on one step ---------------------------------------------
    def shared_gradient(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> SharedGradient | None:
        """G of this step's batch at the current weights, with its RNG state, when another callback that
        needs it measures this batch too (computed once, by the trainer's coordinator); else ``None``:
        compute G yourself. Call before the optimizer step, inside the guard."""
        if self.coordinator is None:
            return None
        return self.coordinator.gradient(self, trainer, pl_module, batch)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.coordinator is not None:
            self.coordinator.end_step()

    # --- W&B charts -----------------------------------------------------------------------
    def charts(self) -> dict[str, list[str]]:
        """Chart title -> metric names drawn as lines of that chart."""
        return {}

    def wandb_charts(self) -> dict[str, Any]:
        """``wandb.plot.line_series`` charts built from the history (keys ``charts/<title>``)."""
        import wandb

        out = {}
        for title, keys in self.charts().items():
            keys = [metric_name(k) for k in keys]
            keys = [k for k in keys if self.history.get(k)]
            if not keys:
                continue
            steps = [s for s, _ in self.history[keys[0]]]
            ys = [[v if math.isfinite(v) else float("nan") for _, v in self.history[k]] for k in keys]
            out[f"charts/{title}"] = wandb.plot.line_series(
                xs=steps, ys=ys, keys=keys, title=title, xname="trainer/global_step"
            )
        return out

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.overhead_ledger is not None:
            self.overhead_ledger.end()
        if not trainer.is_global_zero:
            return
        for logger in wandb_loggers(trainer):
            charts = self.wandb_charts()
            if charts:
                logger.experiment.log(charts)

    # --- resumable counters ---------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "measurements": self.measurements,
            "last_measured_step": self.last_measured_step,
            "history": {k: list(v) for k, v in self.history.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measurements = int(state_dict.get("measurements", 0))
        self.last_measured_step = int(state_dict.get("last_measured_step", -1))
        self.history = {k: [tuple(x) for x in v] for k, v in state_dict.get("history", {}).items()}
