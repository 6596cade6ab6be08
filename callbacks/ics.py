"""``InternalCovariateShift``: the paper's Definition 2.1 logged during training (PROTOCOL §1)."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from bnlightning.callbacks.base import MeasurementCallback
from bnlightning.callbacks.functional import ICS_MODES, check_chunk_size, check_mode, internal_covariate_shift, resolve_layers

__all__ = ["InternalCovariateShift"]


class InternalCovariateShift(MeasurementCallback):
    r"""Log how much the gradient of each layer changes when the layers before it take their step.

    Per measured layer i, on the current training batch: ``G_i`` = gradient w.r.t. W_i
    at step t, and ``G'_i`` = the same gradient with the weights of every earlier
    Conv/Linear layer (plus any earlier measured layer) replaced by their value after
    the real optimizer step, W^(t+1). Layer i, later layers, biases and norm gamma/beta
    keep their step-t values; the batch, the random draws (noisy BN noise, dropout
    masks) and the modes (norms in training mode) are the same for G and G'; running
    statistics are untouched. "Earlier" is the order of a forward pass.

    W^(t+1): for plain ``torch.optim.SGD`` (no momentum) ``W - lr * (grad + weight_decay * W)``
    with the group's lr; for any other optimizer, one step of a shadow copy of it (same
    class and hyper-parameters, deep copy of its state, float32 clones of all its
    parameters). With ``update_from="trainer"`` (default) the step uses the gradient the
    trainer is about to apply (``.grad`` in ``on_before_optimizer_step``: unscaled,
    accumulated, all-reduced, before gradient clipping), so W^(t+1) are the next step's
    weights; ``"measured"`` uses the float32 G of the stashed batch instead.

    Logged metrics (per layer, ``<layer>`` the module name relative to the LightningModule):

    - ``ics/l2/<layer>`` = ||G_i - G'_i||_2 (ideal 0)
    - ``ics/cos/<layer>`` = cos(G_i, G'_i) (ideal 1)
    - ``ics/rel/<layer>`` = ||G_i - G'_i||_2 / ||G_i||_2

    Args:
        layers: module names relative to the LightningModule, e.g. ``["net.conv5", "net.conv10"]``
            (default: every Conv/Linear layer). An unknown name is an error listing the valid ones.
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        update_from: ``trainer`` or ``measured`` gradient for W^(t+1) (see above).
        mode: ``auto`` (vmap for networks without convolutions, else ``prefix``), ``vmap``, ``loop`` or
            ``prefix`` (one pass through the updated layers gives every layer's input; each layer then
            needs only the rest of the network; layers where that is not provably exact get a full pass).
        chunk_size: at most this many layers per vmap call (bounds memory; default all).
        loss_method: the module's method ``(batch) -> scalar loss`` (the one requirement).

    Raises:
        ValueError: bad ``every_n_steps``, ``update_from``, ``mode``, ``chunk_size``; at setup an unknown layer.
        MisconfigurationException: at setup, manual optimization or an unsupported strategy.
        AttributeError: at setup, the module has no ``loss_method``.

    Example::

        trainer = Trainer(callbacks=[InternalCovariateShift(layers=["net.conv5", "net.conv10"], every_n_steps=100)])
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        every_n_steps: int = 100,
        update_from: Literal["trainer", "measured"] = "trainer",
        mode: Literal["auto", "vmap", "loop", "prefix"] = "auto",
        chunk_size: int | None = None,
        loss_method: str = "loss",
    ) -> None:
        super().__init__(every_n_steps, loss_method)
        if update_from not in ("trainer", "measured"):
            raise ValueError(f"unknown update_from {update_from!r}; accepted: trainer, measured")
        check_mode(mode, ICS_MODES)
        check_chunk_size(chunk_size)
        if layers is not None and not layers:
            raise ValueError("layers must be None (every Conv/Linear layer) or a non-empty list of module names")
        self.layers = list(layers) if layers is not None else None
        self.update_from = update_from
        self.mode = mode
        self.chunk_size = chunk_size
        self._layers: list[str] = []

    shares_gradient = True  # G is shared with LossLandscape on a step both measure (base.shared_gradient)

    def _state_key_extra(self) -> dict[str, Any]:
        return {"layers": self.layers}

    @override
    def on_measurement_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = resolve_layers(pl_module, self.layers)

    @override
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any) -> dict[str, Tensor]:
        step_grads = None
        if self.update_from == "trainer":
            step_grads = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        return internal_covariate_shift(
            pl_module, batch, optimizer, self._layers, loss_method=self.loss_method, step_grads=step_grads, mode=self.mode, chunk_size=self.chunk_size,
            gradient=self.shared_gradient(trainer, pl_module, batch),
        )

    @override
    def charts(self) -> dict[str, list[str]]:
        return {f"ics_{kind}": [f"ics/{kind}/{layer}" for layer in self._layers] for kind in ("l2", "cos", "rel")}
