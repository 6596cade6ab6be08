"""Stability gauges during training (PROTOCOL §12): thin callbacks over ``functional/gauges.py`` and
``functional/sld.py``.

- ``GradientCurvature``: gᵀHg/‖g‖², uᵀHu/‖u‖² along the real step, predicted vs actual loss change.
- ``ActivationGradients``: ‖∂L/∂y‖ per normalization layer output, with Thm 4.1's γ, σ and bound.
- ``EffectiveLearningRate``: ‖W‖, η/‖W‖², ∠(W^t, W^{t+1}) of the scale-invariant weights.
- ``SpectralDensity``: the Hessian's eigenvalue density by stochastic Lanczos quadrature, BN in
  training mode and on its running statistics.

The preconditioned sharpness of adaptive optimizers is logged by ``HessianSpectrum``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from bnlightning.callbacks._layers import checked_layers, module_layers
from bnlightning.callbacks.base import MeasurementCallback
from bnlightning.callbacks.functional._hvp import check_hvp_method
from bnlightning.callbacks.functional._layers import resolve_layers, weight_layer_names
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional.gauges import (
    activation_gradients,
    default_gradact_layers,
    effective_lr,
    gradient_curvature,
    group_lrs,
    scale_invariant_layers,
)
from bnlightning.callbacks.functional.hessian import edge_of_stability
from bnlightning.callbacks.functional.names import (
    HESSIAN_ACTUAL_CHANGE,
    HESSIAN_GRAD_CURVATURE,
    HESSIAN_PREDICTED_CHANGE,
    HESSIAN_UPDATE_CURVATURE,
    efflr_key,
    gradact_key,
    hessian_curvature,
    hessian_curvature_ratio,
    sld_key,
)
from bnlightning.callbacks.functional.sld import NORM_MODES, spectral_density
from bnlightning.callbacks.twostep import MeasuredStep, TwoStepMeasurement

__all__ = ["ActivationGradients", "EffectiveLearningRate", "GradientCurvature", "SpectralDensity"]


def _weight(module: nn.Module, name: str) -> Tensor:
    """The ``weight`` of the submodule ``name`` (the layers measured are chosen for having one)."""
    weight = module.get_submodule(name).weight
    assert isinstance(weight, Tensor), f"{name} has no weight tensor"
    return weight


class GradientCurvature(TwoStepMeasurement):
    r"""Log the curvature along the gradient and along the real update, and the quadratic model's accuracy.

    On the measured step's batch (the training loss, BN in training mode, the same random draws, float32,
    DDP mean), with g and H at W^t and u = W^{t+1} − W^t the step the trainer really applied (any
    optimizer, after accumulation, clipping and the all-reduce; read in an optimizer step post-hook):

    Logged metrics:

    - ``hessian/grad_curvature`` = gᵀHg/‖g‖² (Santurkar et al. Thm 4.2; "batch sharpness", Andreyev &
      Beneventano 2024)
    - ``hessian/update_curvature`` = uᵀHu/‖u‖²
    - ``hessian/predicted_change`` = gᵀu + ½uᵀHu and ``hessian/actual_change`` = L(W^{t+1}) − L(W^t)
    - ``hessian/grad_curvature_ratio``, ``hessian/update_curvature_ratio``: each curvature over 2(1+β)/η
      for SGD with heavy-ball momentum β (1 = edge of stability); NaN for other optimizers

    Cost per measurement: a copy of the parameters, one gradient pass, one HVP set-up, two HVPs, one forward.

    Args:
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        hvp_method: ``retained``, ``double_backward`` or ``jvp`` (see ``HessianSpectrum``).
        loss_fn: ``(module, batch) -> scalar loss`` or its import path (default: see ``loss_method``).
        loss_method: the module's method ``(batch) -> scalar loss`` (default: ``loss`` if it takes one
            batch, else ``training_step``; see ``MeasurementCallback``).

    Raises:
        ValueError: a bad argument.
        MisconfigurationException: at setup, manual optimization, an unsupported strategy, LBFGS.

    Example::

        trainer = Trainer(callbacks=[GradientCurvature(every_n_steps=50)])
    """

    metric_prefix = (
        "gradcurv"  # its metrics are hessian/*; the budget logs gradcurv/cost_steps beside HessianSpectrum's
    )

    def __init__(
        self,
        every_n_steps: int = 100,
        hvp_method: str = "retained",
        loss_fn: LossFn | str | None = None,
        loss_method: str | None = None,
        max_overhead: float | None = None,
        schedule: str = "fixed",
    ) -> None:
        super().__init__(every_n_steps, loss_fn, loss_method, max_overhead, schedule)
        check_hvp_method(hvp_method)
        self.hvp_method = hvp_method

    @override
    def before_step(self, step: MeasuredStep) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in step.module.named_parameters() if p.requires_grad}

    @override
    def after_step(self, step: MeasuredStep) -> dict[str, Tensor]:
        module = step.module
        out = gradient_curvature(
            module,
            step.batch,
            weights=step.kept,
            next_weights=dict(module.named_parameters()),
            hvp_method=self.hvp_method,
            loss_fn=self.measured_loss(module),
            reduce=self.reduce(step.trainer),
        )
        limit = edge_of_stability(step.optimizer)
        for kind in ("grad", "update"):
            out[hessian_curvature_ratio(kind)] = (
                out[hessian_curvature(kind)] / limit if limit else torch.tensor(float("nan"))
            )
        return out

    @override
    def charts(self) -> dict[str, list[str]]:
        return {
            "gradient_curvature": [HESSIAN_GRAD_CURVATURE, HESSIAN_UPDATE_CURVATURE],
            "loss_change": [HESSIAN_PREDICTED_CHANGE, HESSIAN_ACTUAL_CHANGE],
        }


class ActivationGradients(MeasurementCallback):
    r"""Log ‖∂L/∂y‖ at each normalization layer's output (Santurkar et al. Thm 4.1), BN's γ and σ, and the bound.

    One float32 forward and backward of the training loss on the measured step's batch at W^t (BN in
    training mode, running statistics untouched, same random draws), with hooks on the chosen modules
    for that pass only.

    Logged metrics (``<layer>`` the module name relative to the LightningModule):

    - ``gradact/<layer>/norm`` = ‖∂L/∂y‖₂ over the batch, y the layer's output
    - BatchNorm layers also: ``gradact/<layer>/input_norm`` (‖∂L/∂x‖, x its input), ``gradact/<layer>/gamma``
      (mean |γ_j|), ``gradact/<layer>/sigma`` (mean batch σ_j) and ``gradact/<layer>/bound`` (the
      theorem's right-hand side for ‖∂L/∂x‖; see ``functional.gauges.activation_gradients``)

    Args:
        layers: module names (default: every normalization layer; in a network without one, every
            Conv/Linear layer but the last, the positions a normalization layer would follow).
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        loss_fn: ``(module, batch) -> scalar loss`` or its import path (default: see ``loss_method``).
        loss_method: the module's method ``(batch) -> scalar loss`` (default: ``loss`` if it takes one
            batch, else ``training_step``; see ``MeasurementCallback``).

    Raises:
        ValueError: bad arguments; at setup an unknown layer name (the valid ones are listed).

    Example::

        trainer = Trainer(callbacks=[ActivationGradients(every_n_steps=50)])
    """

    metric_prefix = "gradact"

    def __init__(
        self,
        layers: list[str] | None = None,
        every_n_steps: int = 100,
        loss_fn: LossFn | str | None = None,
        loss_method: str | None = None,
        max_overhead: float | None = None,
        schedule: str = "fixed",
    ) -> None:
        super().__init__(every_n_steps, loss_fn, loss_method, max_overhead, schedule)
        self.layers = checked_layers(layers, "every normalization layer")
        self._layers: list[str] = []

    @override
    def on_measurement_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = (
            module_layers(pl_module, self.layers) if self.layers is not None else default_gradact_layers(pl_module)
        )
        if not self._layers:
            raise ValueError(f"{type(pl_module).__name__} has no normalization, Conv or Linear layer; pass layers=")

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any
    ) -> dict[str, Tensor]:
        return activation_gradients(
            pl_module, batch, self._layers, loss_fn=self.measured_loss(pl_module), reduce=self.reduce(trainer)
        )

    @override
    def charts(self) -> dict[str, list[str]]:
        return {"activation_gradient_norm": [gradact_key(n, "norm") for n in self._layers]}


class EffectiveLearningRate(TwoStepMeasurement):
    r"""Log the norm, the effective learning rate and the angular step of scale-invariant weights.

    A weight followed by BatchNorm is scale invariant: the loss depends on its direction only, so its
    direction moves by an angle that grows like η/‖W‖² (van Laarhoven 2017; Hoffer et al. 2018; Arora et
    al. 2019). Per layer, with W^t kept before the real optimizer step and W^{t+1} read right after it:

    Logged metrics: ``efflr/<layer>/norm`` = ‖W^t‖₂, ``efflr/<layer>/lr`` = η/‖W^t‖² (η of the
    weight's parameter group), ``efflr/<layer>/angle`` = ∠(W^t, W^{t+1}) in radians.

    Args:
        layers: Conv/Linear module names (default: the layers whose output feeds a normalization layer,
            found on the first measured batch; in a network without one, every Conv/Linear layer but
            the last, so that the same positions can be compared).
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        loss_fn: ``(module, batch) -> scalar loss`` or its import path, for the one forward that finds the
            layers (default: see ``loss_method``).
        loss_method: the module's method ``(batch) -> scalar loss`` (default: ``loss`` if it takes one
            batch, else ``training_step``; see ``MeasurementCallback``).

    Raises:
        ValueError: bad arguments; at setup an unknown layer name (the valid ones are listed).

    Example::

        trainer = Trainer(callbacks=[EffectiveLearningRate(every_n_steps=10)])
    """

    metric_prefix = "efflr"

    def __init__(
        self,
        layers: list[str] | None = None,
        every_n_steps: int = 100,
        loss_fn: LossFn | str | None = None,
        loss_method: str | None = None,
        max_overhead: float | None = None,
        schedule: str = "fixed",
    ) -> None:
        super().__init__(every_n_steps, loss_fn, loss_method, max_overhead, schedule)
        self.layers = checked_layers(layers, "the scale-invariant layers")
        self._layers: list[str] = []

    @override
    def on_measurement_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = resolve_layers(pl_module, self.layers) if self.layers is not None else []

    @override
    def before_step(self, step: MeasuredStep) -> dict[str, Tensor]:
        module = step.module
        if not self._layers:
            self._layers = (
                scale_invariant_layers(module, step.batch, loss_fn=self.measured_loss(module))
                or weight_layer_names(module)[:-1]
            )
        return {n: _weight(module, n).detach().clone() for n in self._layers}

    @override
    def after_step(self, step: MeasuredStep) -> dict[str, Tensor]:
        after = {n: _weight(step.module, n) for n in self._layers}
        return effective_lr(step.kept, after, group_lrs(step.optimizer, step.module, self._layers))

    @override
    def charts(self) -> dict[str, list[str]]:
        return {f"efflr_{kind}": [efflr_key(n, kind) for n in self._layers] for kind in ("lr", "angle")}


class SpectralDensity(MeasurementCallback):
    r"""Log the Hessian's eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    On the measured step's batch at W^t, over every trainable parameter, for each mode in ``norm_modes``:
    ``train`` (BatchNorm on the batch's statistics, as training runs) and ``running`` (BatchNorm on its
    running statistics, every other module as it is) -- Ghorbani et al. find large outlier eigenvalues
    with population statistics that batch statistics remove.

    Logged metrics, per mode ``<mode>``: ``sld/<mode>/node_<i>`` and ``sld/<mode>/weight_<i>``
    (i = 0 .. n_starts·lanczos_steps − 1: every start's Ritz values and quadrature weights; the report
    draws the smoothed density from them), ``sld/<mode>/lambda_max``, ``sld/<mode>/lambda_min`` (the
    extreme Ritz values) and ``sld/<mode>/hvps`` (the cost: lanczos_steps · n_starts HVPs per mode).

    Args:
        lanczos_steps: m, Lanczos steps per start (>= 2).
        n_starts: random starts (>= 1).
        norm_modes: a non-empty subset of ``("train", "running")``.
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        seed: seed of the start vectors (plus the step; the global RNG is never used).
        hvp_method: ``retained``, ``double_backward`` or ``jvp``.
        loss_fn: ``(module, batch) -> scalar loss`` or its import path (default: see ``loss_method``).
        loss_method: the module's method ``(batch) -> scalar loss`` (default: ``loss`` if it takes one
            batch, else ``training_step``; see ``MeasurementCallback``).

    Raises:
        ValueError: a bad argument.

    Example::

        trainer = Trainer(max_steps=1000, callbacks=[SpectralDensity(every_n_steps=1000, lanczos_steps=30)])
    """

    metric_prefix = "sld"

    def __init__(
        self,
        lanczos_steps: int = 20,
        n_starts: int = 2,
        norm_modes: tuple[str, ...] | list[str] = NORM_MODES,
        every_n_steps: int = 1000,
        seed: int = 0,
        hvp_method: str = "retained",
        loss_fn: LossFn | str | None = None,
        loss_method: str | None = None,
        max_overhead: float | None = None,
        schedule: str = "fixed",
    ) -> None:
        super().__init__(every_n_steps, loss_fn, loss_method, max_overhead, schedule)
        if isinstance(lanczos_steps, bool) or not isinstance(lanczos_steps, int) or lanczos_steps < 2:
            raise ValueError(f"lanczos_steps must be an integer >= 2, got {lanczos_steps!r}")
        if isinstance(n_starts, bool) or not isinstance(n_starts, int) or n_starts < 1:
            raise ValueError(f"n_starts must be an integer >= 1, got {n_starts!r}")
        modes = list(norm_modes) if isinstance(norm_modes, (list, tuple)) else [norm_modes]
        if not modes or any(m not in NORM_MODES for m in modes):
            raise ValueError(f"norm_modes must be a non-empty list of {', '.join(NORM_MODES)}, got {norm_modes!r}")
        check_hvp_method(hvp_method)
        self.lanczos_steps, self.n_starts, self.norm_modes = lanczos_steps, n_starts, tuple(dict.fromkeys(modes))
        self.seed, self.hvp_method = seed, hvp_method

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for mode in self.norm_modes:
            res = spectral_density(
                pl_module,
                batch,
                lanczos_steps=self.lanczos_steps,
                n_starts=self.n_starts,
                norm_mode=mode,
                seed=self.seed + trainer.global_step,
                hvp_method=self.hvp_method,
                loss_fn=self.measured_loss(pl_module),
                reduce=self.reduce(trainer),
            )
            for i, (node, weight) in enumerate(zip(res.nodes.flatten().tolist(), res.weights.flatten().tolist())):
                out[sld_key(mode, f"node_{i}")] = torch.tensor(node, dtype=torch.float32)
                out[sld_key(mode, f"weight_{i}")] = torch.tensor(weight, dtype=torch.float32)
            live = res.nodes[res.weights > 0]
            out[sld_key(mode, "lambda_max")] = live.max().to(torch.float32)
            out[sld_key(mode, "lambda_min")] = live.min().to(torch.float32)
            out[sld_key(mode, "hvps")] = torch.tensor(float(res.hvps))
        return out
