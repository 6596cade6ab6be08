"""What the three measurement callbacks share: when to measure, on what, how to log.

Timing. A callback measures on optimizer steps ``t`` with ``(t + 1) % every_n_steps == 0``
(``t`` = ``trainer.global_step`` before the step), the same steps on every rank, so
collectives (SyncBatchNorm) cannot hang. The ``+ 1`` lines the measurements up with
the steps Lightning hands to its loggers (those with ``(t + 1) % log_every_n_steps == 0``):
with ``every_n_steps`` a multiple of ``Trainer(log_every_n_steps=...)`` every
measurement is written; otherwise a warning says some will be dropped.

Batch. ``on_train_batch_start`` keeps a reference to the batch of a measured step; with
gradient accumulation that is the *last micro-batch* of the step, not the whole
effective batch. The measurement runs in ``on_before_optimizer_step``: weights are
still those of step ``t``, gradients are unscaled, accumulated and all-reduced, and
it runs outside autocast. Everything runs inside ``observer_guard`` (parameters,
``.grad``, buffers, modes, optimizer state and every RNG restored exactly).

Logging. Scalars go through ``pl_module.log(name, value, on_step=True, on_epoch=False)``
(rank zero's value reaches the logger; no ``sync_dist``, so no collective). When a
``WandbLogger`` is attached, each callback keeps the history of its scalars and, at the
end of training, logs one line chart per measurement (``wandb.plot.line_series``, x =
``trainer/global_step``) under ``charts/...``.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from bnlightning.callbacks.functional import StepGradient, check_loss_method, step_gradient
from bnlightning.callbacks.guard import RngState, observer_guard

from typing_extensions import override

__all__ = ["MeasurementCallback"]


class _SharedGradient:
    """One step's G, kept between the callbacks that measure on that step (see ``shared_gradient``).

    Validity key. A later callback may use ``gradient`` only if it would compute exactly the
    same numbers itself, i.e. if every input of that pass is the same as when it was taken:

    - the step (``trainer.global_step``), the module object, ``loss_method`` and the stashed batch
      object (identity) plus the version counter of each of its tensors (no in-place change);
    - the values of every parameter and buffer (``torch.equal`` with clones taken with G), their
      ``requires_grad`` flags (which parameters are trainable) and every submodule's train flag;
    - every RNG state (torch CPU and CUDA, Python, NumPy): the pass replays it.

    ``observer_guard`` restores parameters, buffers, modes and RNGs bit-exactly after each
    callback, so in a plain run the second callback starts from the state the first one
    started from and the key matches; anything that changed one of these in between (another
    callback editing weights or drawing random numbers) makes it miss, and the gradient is
    recomputed. Both consumers take G the same way (``step_gradient`` is their own first pass),
    so a hit gives bit-identical results.
    """

    def __init__(self, trainer: pl.Trainer, module: pl.LightningModule, loss_method: str, batch: Any, gradient: StepGradient) -> None:
        self.step = trainer.global_step
        self.module, self.loss_method, self.batch = module, loss_method, batch
        self.batch_versions = _tensor_versions(batch)
        self.rng = RngState.capture()
        self.params = [(n, p.detach().clone(), p.requires_grad) for n, p in module.named_parameters()]
        self.buffers = [(n, b.detach().clone()) for n, b in module.named_buffers()]
        self.modes = [m.training for m in module.modules()]
        self.gradient = gradient

    def matches(self, trainer: pl.Trainer, module: pl.LightningModule, loss_method: str, batch: Any) -> bool:
        if trainer.global_step != self.step or module is not self.module or loss_method != self.loss_method or batch is not self.batch:
            return False
        if _tensor_versions(batch) != self.batch_versions or not self.rng.equals(RngState.capture()):
            return False
        if [m.training for m in module.modules()] != self.modes:
            return False
        params, buffers = list(module.named_parameters()), list(module.named_buffers())
        if len(params) != len(self.params) or len(buffers) != len(self.buffers):
            return False
        for (n, p), (n0, v0, rg0) in zip(params, self.params):
            if n != n0 or p.requires_grad != rg0 or p.dtype != v0.dtype or p.shape != v0.shape or not torch.equal(p.detach(), v0):
                return False
        return all(n == n0 and b.dtype == v0.dtype and b.shape == v0.shape and torch.equal(b.detach(), v0) for (n, b), (n0, v0) in zip(buffers, self.buffers))


def _tensor_versions(batch: Any) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []

    def walk(x: Any) -> None:
        if isinstance(x, Tensor):
            out.append((id(x), x._version))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(batch)
    return out


#: trainer -> the G of its current step, while a callback that will use it has yet to measure.
_SHARED: weakref.WeakKeyDictionary[pl.Trainer, _SharedGradient] = weakref.WeakKeyDictionary()


def _is_compiled(module: torch.nn.Module) -> bool:
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def wandb_loggers(trainer: pl.Trainer) -> list[Any]:
    """The trainer's ``WandbLogger``s (empty without wandb installed)."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class MeasurementCallback(Callback):
    """Base class: schedule, batch stash, guard, logging, counters and W&B charts.

    Subclasses implement ``measure(trainer, pl_module, batch, optimizer) -> dict[str, Tensor]``
    and may set ``charts()`` (title -> list of metric names drawn as one chart).

    Args:
        every_n_steps: measure every this many optimizer steps (>= 1).
        loss_method: name of the module's method ``(batch) -> scalar loss``.

    Raises:
        ValueError: ``every_n_steps < 1`` or an empty ``loss_method``.
        MisconfigurationException: at setup, for manual optimization or a strategy other
            than single-device or DDP (sharded parameters cannot be measured).
        AttributeError: at setup, when the module lacks ``loss_method``.
    """

    def __init__(self, every_n_steps: int = 100, loss_method: str = "loss") -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if not isinstance(loss_method, str) or not loss_method:
            raise ValueError(f"loss_method must be the name of a method of the LightningModule, got {loss_method!r}")
        self.every_n_steps = every_n_steps
        self.loss_method = loss_method
        self.measurements = 0
        self.last_measured_step = -1
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._batch: Any = None
        self._keep_history = False
        self._logged_keys: set[str] = set()

    # --- schedule ---------------------------------------------------------------------
    def is_measurement_step(self, step: int) -> bool:
        return (step + 1) % self.every_n_steps == 0

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads this for every hook call of every step (profiler names): built once,
        # rebuilt only when an argument it depends on is reassigned (see __setattr__).
        key = self.__dict__.get("_state_key_cache")
        if key is None:
            key = self._generate_state_key(every_n_steps=self.every_n_steps, **self._state_key_extra())
            self.__dict__["_state_key_cache"] = key
        return key

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("every_n_steps", "layers", "step_sizes", "step_size_mode"):
            self.__dict__.pop("_state_key_cache", None)
        super().__setattr__(name, value)

    def _state_key_extra(self) -> dict[str, Any]:
        return {}

    # --- setup checks -------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"{name} needs automatic optimization (it measures in `on_before_optimizer_step`, between backward and "
                f"the optimizer step); {type(pl_module).__name__} sets `automatic_optimization = False`. Remove the "
                f"callback or call the functions of `bnlightning.callbacks.functional` from your training_step."
            )
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise MisconfigurationException(
                f"{name} supports the single-device and DDP strategies (every rank holds all parameters); got "
                f"{type(strategy).__name__}."
            )
        check_loss_method(pl_module, self.loss_method)
        if _is_compiled(pl_module):
            warnings.warn(
                f"{name}: the module (or a submodule) is torch.compile'd; measurement passes run compiled and may "
                f"recompile (train-mode norms, hooks, vmap). Measure an uncompiled module for speed and exactness.",
                stacklevel=2,
            )
        if trainer.loggers and trainer.log_every_n_steps > 0 and self.every_n_steps % trainer.log_every_n_steps != 0:
            warnings.warn(
                f"{name}(every_n_steps={self.every_n_steps}) is not a multiple of Trainer(log_every_n_steps="
                f"{trainer.log_every_n_steps}): Lightning writes step metrics to the loggers only every "
                f"log_every_n_steps steps, so measurements on other steps are computed but not written.",
                stacklevel=2,
            )
        self._keep_history = bool(wandb_loggers(trainer))
        self.on_measurement_setup(trainer, pl_module)

    def on_measurement_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Subclass hook: validate layer names etc. once the module is known."""

    # --- the measured step ----------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # With gradient accumulation this runs per micro-batch: the last one is kept.
        self._batch = batch if self.is_measurement_step(trainer.global_step) else None
        self._forget_flushed(trainer)

    def _forget_flushed(self, trainer: pl.Trainer) -> None:
        """Mark last measurement's step metrics as reset once the loggers have had them.

        Lightning keeps an ``on_step`` value in its result collection until the epoch ends
        and hands it to the loggers again at every later logging step; without this, a
        measurement of step 99 would reappear as the value of steps 149, 199, ...
        """
        if not self._logged_keys:
            return
        results = getattr(trainer, "_results", None)
        for key, metric in (results or {}).items():
            meta = getattr(metric, "meta", None)
            if meta is not None and meta.fx == "on_before_optimizer_step" and meta.name in self._logged_keys:
                metric.reset()
        self._logged_keys = set()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._batch is None or not self.is_measurement_step(trainer.global_step):
            return
        batch, self._batch = self._batch, None
        with observer_guard(pl_module, [optimizer]):
            metrics = self.measure(trainer, pl_module, batch, optimizer)
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False)
        self._logged_keys = set(metrics)
        self.measurements += 1
        self.last_measured_step = trainer.global_step
        if self._keep_history:
            for key, value in metrics.items():
                self.history.setdefault(key, []).append((trainer.global_step, float(value)))

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any) -> dict[str, Tensor]:
        raise NotImplementedError

    # --- G shared between callbacks on one step ---------------------------------------------
    #: Subclasses whose measurement starts with G = step_gradient(module, batch) set this.
    shares_gradient = False

    def _pending_sharers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> bool:
        """Whether another callback will still take G of ``batch`` on this step."""
        return any(
            cb is not self and isinstance(cb, MeasurementCallback) and cb.shares_gradient and cb._batch is batch
            and cb.loss_method == self.loss_method and cb.is_measurement_step(trainer.global_step)
            for cb in trainer.callbacks
        )

    def shared_gradient(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> StepGradient | None:
        """G of this step's batch when another callback measures on it too, else ``None``.

        Call from ``measure`` (inside the guard, before anything else). The first of the
        callbacks measuring on a step computes ``step_gradient`` and keeps it, with its
        validity key (``_SharedGradient``), only if another sharing callback still has this
        batch stashed; the last one to use it drops it, and ``on_train_batch_end`` drops
        whatever is left, so G never outlives its step nor is held when one callback measures.
        ``None`` means: compute G yourself (the function's own first pass, same numbers).
        """
        entry = _SHARED.pop(trainer, None)
        more = self._pending_sharers(trainer, pl_module, batch)
        if entry is not None and entry.matches(trainer, pl_module, self.loss_method, batch):
            if more:
                _SHARED[trainer] = entry
            return entry.gradient
        if not more:
            return None
        gradient = step_gradient(pl_module, batch, loss_method=self.loss_method)
        _SHARED[trainer] = _SharedGradient(trainer, pl_module, self.loss_method, batch, gradient)
        return gradient

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        _SHARED.pop(trainer, None)

    # --- W&B charts -----------------------------------------------------------------------
    def charts(self) -> dict[str, list[str]]:
        """Chart title -> metric names drawn as lines of that chart."""
        return {}

    def wandb_charts(self) -> dict[str, Any]:
        """``wandb.plot.line_series`` charts built from the history (keys ``charts/<title>``)."""
        import wandb

        out = {}
        for title, keys in self.charts().items():
            keys = [k for k in keys if self.history.get(k)]
            if not keys:
                continue
            steps = [s for s, _ in self.history[keys[0]]]
            ys = [[v if math.isfinite(v) else float("nan") for _, v in self.history[k]] for k in keys]
            out[f"charts/{title}"] = wandb.plot.line_series(xs=steps, ys=ys, keys=keys, title=title, xname="trainer/global_step")
        return out

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in wandb_loggers(trainer):
            charts = self.wandb_charts()
            if charts:
                logger.experiment.log(charts)

    # --- resumable counters ---------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"measurements": self.measurements, "last_measured_step": self.last_measured_step, "history": {k: list(v) for k, v in self.history.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measurements = int(state_dict.get("measurements", 0))
        self.last_measured_step = int(state_dict.get("last_measured_step", -1))
        self.history = {k: [tuple(x) for x in v] for k, v in state_dict.get("history", {}).items()}
