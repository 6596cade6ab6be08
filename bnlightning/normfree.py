"""Normalizer-free training pieces (PROTOCOL §11; Brock et al. 2021; the article "Batch Normalization… or not?").

Scaled weight standardisation is a model option (``VGG(weight_standardization=True)``,
``ResNet(weight_standardization=True)``, built on timm's ``ScaledStdConv2d``). Adaptive
gradient clipping is a training modifier, so it is a callback, ``AdaptiveGradientClipping``,
that applies timm's maintained ``adaptive_clip_grad`` to the gradient the optimizer is
about to apply.

Which gradient. Lightning calls ``on_before_optimizer_step`` once per optimizer step, after
the backward passes of every accumulated micro-batch, after the DDP all-reduce and after
unscaling (16-bit AMP), and *before* its own ``gradient_clip_val`` clipping. An optimizer
step pre-hook would be too early: for plain precision Lightning passes the training step
as the optimizer's closure, and ``Optimizer.step`` runs its pre-hooks before the closure,
i.e. before the gradient exists. So the callback clips in ``on_before_optimizer_step`` and
refuses to run together with ``gradient_clip_val`` (which would change the gradient again
afterwards): what it leaves in ``.grad`` is exactly what the optimizer applies. It also
places itself first among the callbacks, so that measurement callbacks that read ``.grad``
in the same hook (the ICS update W^(t+1)) see the clipped gradient.
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

__all__ = ["AdaptiveGradientClipping", "LinearCallOrder", "final_linear_layer"]


class LinearCallOrder:
    """While entered, records the names of ``module``'s ``nn.Linear`` submodules in the order their
    ``forward`` calls finish (forward hooks that return nothing: outputs are untouched).

    Registration order says nothing about use: a classifier defined first in ``__init__`` runs last.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.order: list[str] = []
        self._handles: list[Any] = []

    def __enter__(self) -> LinearCallOrder:
        for name, m in self.module.named_modules():
            if isinstance(m, nn.Linear):
                self._handles.append(m.register_forward_hook(lambda _m, _a, _o, name=name: self.order.append(name)))
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def last(self) -> str | None:
        """The last ``nn.Linear`` to run (the classifier), or None when none ran."""
        return self.order[-1] if self.order else None


def final_linear_layer(module: nn.Module, *inputs: Any) -> str | None:
    """Name of the last ``nn.Linear`` to run in ``module(*inputs)`` (forward order), or None.

    The forward runs without gradients, in the module's current mode.
    """
    with LinearCallOrder(module) as calls, torch.no_grad():
        module(*inputs)
    return calls.last


class AdaptiveGradientClipping(Callback):
    r"""Adaptive gradient clipping (AGC, Brock et al. 2021) of every step's gradient.

    Per unit u (a row of a Linear weight, an output channel of a conv weight; a bias or
    gain vector counts as one unit) with weights W_u and gradient G_u: if
    ``||G_u|| / max(||W_u||, eps) > clip_factor`` then
    ``G_u <- clip_factor * max(||W_u||, eps) / ||G_u|| * G_u`` (timm's
    ``adaptive_clip_grad``). The final linear layer is not clipped (Brock et al.), nor are
    the modules named in ``exclude``. "Final" is in forward order: the last ``nn.Linear`` whose
    ``forward`` runs in the first training step (recorded by forward hooks on that step only),
    wherever it is registered. Which parameters are left unclipped is said once, in one
    info line (``rank_zero_info``).

    Args:
        clip_factor: lambda, the largest allowed ||G_u|| / ||W_u|| (> 0; the paper uses
            0.01-0.16, smaller for larger batches).
        eps: the floor on ||W_u|| that lets zero-initialised weights move (> 0).
        exclude: module names (relative to the LightningModule) whose parameters are not
            clipped; default: the final ``nn.Linear`` in forward order only (none when no
            ``nn.Linear`` runs). ``[]`` clips everything.

    Raises:
        ValueError: a non-positive ``clip_factor`` or ``eps``; at setup an unknown module name.
        MisconfigurationException: at setup, together with ``Trainer(gradient_clip_val=...)``
            or with manual optimization.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: bnlightning.normfree.AdaptiveGradientClipping
              init_args: {clip_factor: 0.04}
    """

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: list[str] | None = None) -> None:
        super().__init__()
        for name, value in (("clip_factor", clip_factor), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)
        self.exclude = list(exclude) if exclude is not None else None
        self._skip: set[int] | None = None
        self._calls: LinearCallOrder | None = None
        self.clipped_steps = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(clip_factor=self.clip_factor, eps=self.eps)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "AdaptiveGradientClipping needs automatic optimization (it clips in on_before_optimizer_step)"
            )
        if trainer.gradient_clip_val:
            raise MisconfigurationException(
                f"AdaptiveGradientClipping with Trainer(gradient_clip_val={trainer.gradient_clip_val}): Lightning "
                "clips after this callback, so the optimizer would not apply the AGC gradient. Use one of the two."
            )
        modules = dict(pl_module.named_modules())
        self._skip, self._calls = None, None
        if self.exclude is not None:
            bad = [n for n in self.exclude if n not in modules or not n]
            if bad:
                raise ValueError(
                    f"exclude: unknown module {bad[0]!r}. Valid module names: {', '.join(n for n in modules if n)}"
                )
            self._exclude(pl_module, self.exclude, "as `exclude` says")
        # First among the callbacks: later ones in the same hook (measurements) see the clipped gradient.
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connectors, not declared on Trainer
        callbacks.remove(self)
        callbacks.insert(0, self)

    def _exclude(self, pl_module: pl.LightningModule, names: list[str], why: str) -> None:
        params = [p for n in names for p in pl_module.get_submodule(n).parameters()]
        self._skip = {id(p) for p in params}
        pname = {id(p): n for n, p in pl_module.named_parameters()}
        unclipped = ", ".join(pname[id(p)] for p in params if id(p) in pname) or "none"
        rank_zero_info(f"AdaptiveGradientClipping: not clipping {unclipped} ({why}).")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._skip is None and self._calls is None:  # the default exclusion: watch the first forward
            self._calls = LinearCallOrder(pl_module).__enter__()

    def _exclude_final_linear(self, pl_module: pl.LightningModule) -> None:
        calls, self._calls = self._calls, None
        if calls is not None:
            calls.__exit__(None, None, None)
        last = calls.last if calls is not None else None
        if last is None:
            self._skip = set()
            rank_zero_info(
                "AdaptiveGradientClipping: no nn.Linear ran in the first training step; clipping every parameter."
            )
            return
        self._exclude(pl_module, [last], f"{last}: the last nn.Linear in the forward pass; `exclude=` to choose")

    def clipped_parameters(self, optimizer: Any) -> list[torch.Tensor]:
        """The optimizer's parameters that AGC clips (every one not excluded)."""
        opt = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer -> torch optimizer
        skip = self._skip or set()
        return [p for group in opt.param_groups for p in group["params"] if id(p) not in skip]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._skip is None:
            self._exclude_final_linear(pl_module)
        from timm.utils.agc import (
            adaptive_clip_grad,  # timm is slow to import; only runs that clip pay
        )

        with torch.no_grad():
            adaptive_clip_grad(self.clipped_parameters(optimizer), clip_factor=self.clip_factor, eps=self.eps)
        self.clipped_steps += 1

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._calls is not None:  # fit ended (or failed) before the first optimizer step
            self._calls.__exit__(None, None, None)
            self._calls = None
