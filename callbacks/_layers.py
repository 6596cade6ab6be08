"""How callbacks choose the named modules they measure.

``checked_layers`` checks every callback's ``layers=`` argument at construction (a non-empty list of
module names, or None for the callback's default). ``ModuleLayersCallback`` is the base of
``ActivationStats`` and ``MeanShift``: its names are checked against the module at setup by
``module_layers``; ``None`` means ``default_activation_layers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from torch import nn
from typing_extensions import override

from bnlightning.callbacks.base import MeasurementCallback
from bnlightning.callbacks.functional import activation_kind
from bnlightning.callbacks.functional._loss import LossFn

__all__ = ["ModuleLayersCallback", "checked_layers", "default_activation_layers", "module_layers"]


def checked_layers(layers: Sequence[str] | None, default: str) -> list[str] | None:
    """A callback's ``layers=`` argument as a list, or None (``default`` says what None measures); one line
    naming the value for anything but a non-empty list of module names. The names themselves are checked
    against the module at setup."""
    if layers is None:
        return None
    if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(n, str) and n for n in layers):
        raise ValueError(f"layers must be None ({default}) or a non-empty list of module names, got {layers!r}")
    return list(layers)


def default_activation_layers(module: nn.Module) -> list[str]:
    """Every activation module (its input is read) or, if there is none, every Conv/Linear (output)."""
    acts = [n for n, m in module.named_modules() if n and activation_kind(m)]
    if acts:
        return acts
    return [n for n, m in module.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def module_layers(module: nn.Module, layers: list[str] | None) -> list[str]:
    """``layers`` checked against ``module``'s submodule names, or ``default_activation_layers`` when None.

    Raises:
        ValueError: an unknown name (the valid ones are listed), or no default layer in the module.
    """
    modules = dict(module.named_modules())
    if layers is None:
        found = default_activation_layers(module)
        if not found:
            raise ValueError(f"{type(module).__name__} has no activation, Conv or Linear module; pass layers=")
        return found
    bad = [n for n in layers if n not in modules or not n]
    if bad:
        raise ValueError(f"unknown layer {bad[0]!r}. Valid module names: {', '.join(n for n in modules if n)}")
    return list(layers)


class ModuleLayersCallback(MeasurementCallback):
    """A measurement over named modules' activations (``ActivationStats``, ``MeanShift``).

    ``layers`` (module names, or None for ``default_activation_layers``) is checked when given,
    resolved against the module at setup into ``_layers``, and is part of the state key.
    """

    def __init__(
        self,
        layers: list[str] | None,
        every_n_steps: int,
        loss_fn: LossFn | str | None,
        loss_method: str | None,
        max_overhead: float | None = None,
        schedule: str = "fixed",
    ) -> None:
        super().__init__(every_n_steps, loss_fn, loss_method, max_overhead, schedule)
        self.layers = checked_layers(layers, "default layers")
        self._layers: list[str] = []

    @override
    def on_measurement_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = module_layers(pl_module, self.layers)
