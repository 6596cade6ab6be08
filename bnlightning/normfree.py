"""Normalizer-free training pieces (PROTOCOL §11; Brock et al. 2021, seed 003).

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
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

__all__ = ["AdaptiveGradientClipping", "final_linear_layer"]


def final_linear_layer(module: nn.Module) -> str | None:
    """Name of the last ``nn.Linear`` in registration order (the classifier), or None."""
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


class AdaptiveGradientClipping(Callback):
    r"""Adaptive gradient clipping (AGC, Brock et al. 2021) of every step's gradient.

    Per unit u (a row of a Linear weight, an output channel of a conv weight; a bias or
    gain vector counts as one unit) with weights W_u and gradient G_u: if
    ``||G_u|| / max(||W_u||, eps) > clip_factor`` then
    ``G_u <- clip_factor * max(||W_u||, eps) / ||G_u|| * G_u`` (timm's
    ``adaptive_clip_grad``). The final linear layer is not clipped (Brock et al.), nor are
    the modules named in ``exclude``.

    Args:
        clip_factor: lambda, the largest allowed ||G_u|| / ||W_u|| (> 0; the paper uses
            0.01-0.16, smaller for larger batches).
        eps: the floor on ||W_u|| that lets zero-initialised weights move (> 0).
        exclude: module names (relative to the LightningModule) whose parameters are not
            clipped; default: the final ``nn.Linear`` only. ``[]`` clips everything.

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
        self._skip: set[int] = set()
        self.clipped_steps = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(clip_factor=self.clip_factor, eps=self.eps)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise MisconfigurationException("AdaptiveGradientClipping needs automatic optimization (it clips in on_before_optimizer_step)")
        if trainer.gradient_clip_val:
            raise MisconfigurationException(
                f"AdaptiveGradientClipping with Trainer(gradient_clip_val={trainer.gradient_clip_val}): Lightning clips after "
                "this callback, so the optimizer would not apply the AGC gradient. Use one of the two."
            )
        modules = dict(pl_module.named_modules())
        if self.exclude is None:
            last = final_linear_layer(pl_module)
            names = [last] if last is not None else []
        else:
            bad = [n for n in self.exclude if n not in modules or not n]
            if bad:
                raise ValueError(f"exclude: unknown module {bad[0]!r}. Valid module names: {', '.join(n for n in modules if n)}")
            names = self.exclude
        self._skip = {id(p) for n in names for p in modules[n].parameters()}
        # First among the callbacks: later ones in the same hook (measurements) see the clipped gradient.
        trainer.callbacks.remove(self)
        trainer.callbacks.insert(0, self)

    def clipped_parameters(self, optimizer: Any) -> list[torch.Tensor]:
        """The optimizer's parameters that AGC clips (every one not excluded)."""
        opt = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer -> torch optimizer
        return [p for group in opt.param_groups for p in group["params"] if id(p) not in self._skip]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        from timm.utils.agc import (
            adaptive_clip_grad,  # timm is slow to import; only runs that clip pay
        )

        with torch.no_grad():
            adaptive_clip_grad(self.clipped_parameters(optimizer), clip_factor=self.clip_factor, eps=self.eps)
        self.clipped_steps += 1
