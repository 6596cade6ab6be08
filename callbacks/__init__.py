"""Measurement callbacks for any Lightning module: ICS, loss landscape, activation statistics.

Depends on torch and lightning only. No edit to the user's module is needed: the loss is
``loss_fn(module, batch)`` when given (a ``LossFn``, or an import path from YAML), else
``module.<loss_method>(batch)`` when given, else the module's ``loss`` method if it takes one batch
(an ``nn.Module`` attribute such as ``nn.CrossEntropyLoss()`` never counts), else its own
``training_step``; resolved once at setup (``resolve_loss``) and checked on the first batch.

Callbacks: ``InternalCovariateShift`` (PROTOCOL §1), ``LossLandscape`` (§2), ``ActivationStats``
(§3), ``HessianSpectrum`` (§9); the stability gauges of §12: ``GradientCurvature``, ``ActivationGradients``,
``EffectiveLearningRate``, ``SpectralDensity`` (functions ``gradient_curvature``, ``adaptive_preconditioner``,
``preconditioned_sharpness``, ``activation_gradients``, ``effective_lr``, ``spectral_density``). Functional API (pure
functions, ``bnlightning.callbacks.functional``): ``internal_covariate_shift``, ``loss_landscape``,
``activation_stats``, ``measurement_forward``, ``step_gradient``, ``sgd_update``, ``optimizer_update``. The
observer-effect guard: ``observer_guard``, ``RngState``. Building blocks of a new measurement: ``MeasurementCallback``,
``TwoStepMeasurement`` (before/after the optimizer step), ``MeasurementCoordinator`` (what one trainer's callbacks
share, G included).
"""

from bnlightning.callbacks.activations import ActivationStats
from bnlightning.callbacks.base import MeasurementCallback
from bnlightning.callbacks.coordinator import MeasurementCoordinator
from bnlightning.callbacks.functional import (
    LossFn,
    activation_stats,
    internal_covariate_shift,
    loss_landscape,
    mean_shift,
    measurement_forward,
    optimizer_update,
    residual_variance,
    resolve_loss,
    sgd_update,
    step_gradient,
    weight_layer_names,
)
from bnlightning.callbacks.functional.gauges import (
    activation_gradients,
    adaptive_preconditioner,
    effective_lr,
    gradient_curvature,
    preconditioned_sharpness,
)
from bnlightning.callbacks.functional.sld import spectral_density
from bnlightning.callbacks.gauges import ActivationGradients, EffectiveLearningRate, GradientCurvature, SpectralDensity
from bnlightning.callbacks.guard import ObserverEffectError, RngState, observer_guard
from bnlightning.callbacks.hessian import HessianSpectrum
from bnlightning.callbacks.ics import InternalCovariateShift
from bnlightning.callbacks.landscape import LossLandscape
from bnlightning.callbacks.meanshift import MeanShift
from bnlightning.callbacks.residual import ResidualVariance
from bnlightning.callbacks.twostep import MeasuredStep, TwoStepMeasurement

__all__ = [
    "ActivationGradients",
    "ActivationStats",
    "EffectiveLearningRate",
    "GradientCurvature",
    "HessianSpectrum",
    "InternalCovariateShift",
    "LossFn",
    "LossLandscape",
    "MeanShift",
    "MeasuredStep",
    "MeasurementCallback",
    "MeasurementCoordinator",
    "ObserverEffectError",
    "ResidualVariance",
    "RngState",
    "SpectralDensity",
    "TwoStepMeasurement",
    "activation_gradients",
    "activation_stats",
    "adaptive_preconditioner",
    "effective_lr",
    "gradient_curvature",
    "internal_covariate_shift",
    "loss_landscape",
    "mean_shift",
    "measurement_forward",
    "observer_guard",
    "optimizer_update",
    "preconditioned_sharpness",
    "residual_variance",
    "resolve_loss",
    "sgd_update",
    "spectral_density",
    "step_gradient",
    "weight_layer_names",
]
