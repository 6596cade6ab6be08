"""``InternalCovariateShift``: the paper's Definition 2.1 logged during training (PROTOCOL §1)."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from bnlightning.callbacks._layers import checked_layers
from bnlightning.callbacks.functional import ICS_MODES, internal_covariate_shift
from bnlightning.callbacks.functional._batching import check_chunk_size, check_memory_budget, check_mode
from bnlightning.callbacks.functional._layers import resolve_layers
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional._updates import check_optimizer
from bnlightning.callbacks.functional.names import ICS_KINDS, ics_key
from bnlightning.callbacks.twostep import MeasuredStep, TwoStepMeasurement

__all__ = ["InternalCovariateShift"]


class InternalCovariateShift(TwoStepMeasurement):
    r"""Log how much the gradient of each layer changes when the layers before it take their step.

    Per measured layer i, on the current training batch: ``G_i`` = gradient w.r.t. W_i
    at step t, and ``G'_i`` = the same gradient with the weights of every earlier
    Conv/Linear layer (plus any earlier measured layer) replaced by their value after
    the real optimizer step, W^(t+1). Layer i, later layers, biases and norm gamma/beta
    keep their step-t values; the batch, the random draws (noisy BN noise, dropout
    masks) and the modes (norms in training mode) are the same for G and G'; running
    statistics are untouched. "Earlier" is the order of a forward pass.

    W^(t+1). With ``update_from="trainer"`` (default) it is the real step: the callback is a
    ``TwoStepMeasurement``: it keeps a copy of W^t before the step (one parameter-sized copy) and
    measures right after the optimizer has stepped, so W^(t+1) is bit for bit
    what the trainer applied: any optimizer and scheduler, after gradient accumulation,
    unscaling, the DDP all-reduce *and* gradient clipping. A step the GradScaler skips (inf/NaN
    gradients) is not measured. ``"measured"`` instead steps a one-parameter copy of the
    optimizer per parameter on the float32 G of the stashed batch (``optimizer_update``;
    elementwise torch optimizers only).

    Shared parameters. The unit is the Parameter object: a Parameter used in several places
    counts as *before* layer i when its first use in the forward pass comes before layer i's
    first use (order recorded per torch operation, so tied weights and ``F.linear(x, self.w)``
    count); the measured layer's own Parameter never moves; G is the gradient w.r.t. the
    Parameter, summed over its uses.

    Logged metrics (per layer, ``<layer>`` the module name relative to the LightningModule):

    - ``ics/l2/<layer>`` = ||G_i - G'_i||_2 (ideal 0)
    - ``ics/cos/<layer>`` = cos(G_i, G'_i) (ideal 1)
    - ``ics/rel/<layer>`` = ||G_i - G'_i||_2 / ||G_i||_2

    Args:
        layers: module names relative to the LightningModule, e.g. ``["net.conv5", "net.conv10"]``
            (default: every Conv/Linear layer). An unknown name is an error listing the valid ones.
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        update_from: ``trainer`` or ``measured`` gradient for W^(t+1) (see above).
        mode: ``auto`` (``prefix`` for networks with convolutions, else vmap in chunks that fit
            ``memory_budget``, else the loop; the choice is logged once), ``vmap``, ``loop`` or
            ``prefix`` (one pass through the updated layers gives every layer's input; each layer then
            needs only the rest of the network; layers where that is not provably exact get a full pass).
        chunk_size: at most this many layers per vmap call.
        memory_budget: bytes ``auto`` may spend on batched members (default: half the free CUDA memory;
            on CPU twice the parameters' float32 size, at least 256 MiB).
        loss_fn: ``(module, batch) -> scalar loss`` or its import path (default: see ``loss_method``).
        loss_method: the module's method ``(batch) -> scalar loss`` (default: ``loss`` if it takes one
            batch, else ``training_step``; see ``MeasurementCallback``).
        max_overhead: ``None``, or the fraction in (0, 1) of training time this callback's measurements may
            take: it then times them and skips scheduled steps to stay within it (shared fairly with the
            other budgeted callbacks; ``every_n_steps`` is the densest spacing) and logs ``ics/cost_steps``.
        schedule: ``"fixed"`` (every ``every_n_steps`` steps) or ``"log"`` (about 10 steps per decade:
            1, 2, 3, 4, 6, 7, 8, 10, 13, 16, 20, ..., 100, 126, ...).

    Raises:
        ValueError: bad ``every_n_steps``, ``update_from``, ``mode``, ``chunk_size``; at setup an unknown layer.
        MisconfigurationException: at setup, manual optimization, an unsupported strategy, LBFGS.
        AttributeError: at setup, no ``loss_fn``, ``loss_method`` or ``training_step`` to measure with.

    Example::

        trainer = Trainer(callbacks=[InternalCovariateShift(layers=["net.conv5", "net.conv10"], every_n_steps=100)])
    """

    metric_prefix = "ics"

    def __init__(
        self,
        layers: list[str] | None = None,
        every_n_steps: int = 100,
        update_from: Literal["trainer", "measured"] = "trainer",
        mode: Literal["auto", "vmap", "loop", "prefix"] = "auto",
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        loss_fn: LossFn | str | None = None,
        loss_method: str | None = None,
        max_overhead: float | None = None,
        schedule: str = "fixed",
    ) -> None:
        super().__init__(every_n_steps, loss_fn, loss_method, max_overhead, schedule)
        if update_from not in ("trainer", "measured"):
            raise ValueError(f"unknown update_from {update_from!r}; accepted: trainer, measured")
        check_mode(mode, ICS_MODES)
        check_chunk_size(chunk_size)
        check_memory_budget(memory_budget)
        self.layers = checked_layers(layers, "every Conv/Linear layer")
        self.update_from = update_from
        self.mode = mode
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self._layers: list[str] = []

    needs_gradient = True  # G is shared with LossLandscape on a step both measure (the coordinator)

    @override
    def on_measurement_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = resolve_layers(pl_module, self.layers)

    @override
    def spans_step(self) -> bool:
        return self.update_from == "trainer"  # "measured": one phase, before the step (``measure``)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.update_from == "measured":
            for opt in trainer.optimizers:
                try:
                    check_optimizer(opt)
                except TypeError as err:
                    raise MisconfigurationException(f"InternalCovariateShift(update_from='measured'): {err}") from None

    @override
    def before_step(self, step: MeasuredStep) -> tuple[dict[str, Tensor], Any]:
        # W^t, kept until the optimizer has stepped: the one parameter-sized copy this measurement
        # needs; and G at W^t when LossLandscape measures this batch too.
        weights = {n: p.detach().clone() for n, p in step.module.named_parameters() if p.requires_grad}
        return weights, self.shared_gradient(step.trainer, step.module, step.batch)

    @override
    def after_step(self, step: MeasuredStep) -> dict[str, Tensor]:
        weights, shared = step.kept
        module = step.module
        if shared is not None:
            shared.rng.restore()  # the draws G was computed with (the same as step.rng between our callbacks)
        return internal_covariate_shift(
            module,
            step.batch,
            layers=self._layers,
            next_weights=dict(module.named_parameters()),
            weights=weights,
            loss_fn=self.measured_loss(module),
            mode=self.mode,
            chunk_size=self.chunk_size,
            memory_budget=self.memory_budget,
            gradient=shared.gradient if shared is not None else None,
            reduce=self.reduce(step.trainer),
        )

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any
    ) -> dict[str, Tensor]:
        # update_from="measured": W^(t+1) from a one-parameter optimizer copy stepped on the measured G
        shared = self.shared_gradient(trainer, pl_module, batch)
        if shared is not None:
            shared.rng.restore()
        return internal_covariate_shift(
            pl_module,
            batch,
            optimizer,
            self._layers,
            loss_fn=self.measured_loss(pl_module),
            mode=self.mode,
            chunk_size=self.chunk_size,
            memory_budget=self.memory_budget,
            gradient=shared.gradient if shared is not None else None,
            reduce=self.reduce(trainer),
        )

    @override
    def charts(self) -> dict[str, list[str]]:
        return {f"ics_{kind}": [ics_key(kind, layer) for layer in self._layers] for kind in ICS_KINDS}
