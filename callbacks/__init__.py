"""Measurement callbacks for any Lightning module: ICS, loss landscape, activation statistics.

Depends on torch and lightning only. A module is measurable when it offers
``loss(batch) -> Tensor`` (name configurable with ``loss_method=``): the scalar
training loss on a batch computed with the module's current parameters.

Callbacks: ``InternalCovariateShift`` (PROTOCOL §1), ``LossLandscape`` (§2),
``ActivationStats`` (§3). Functional API (pure functions): ``internal_covariate_shift``,
``loss_landscape``, ``activation_stats``, ``measurement_forward``, ``sgd_update``,
``optimizer_update``. The observer-effect guard: ``observer_guard``, ``RngState``.
"""

from bnlightning.callbacks.activations import ActivationStats
from bnlightning.callbacks.base import MeasurementCallback
from bnlightning.callbacks.functional import (
    activation_stats,
    internal_covariate_shift,
    loss_landscape,
    measurement_forward,
    optimizer_update,
    sgd_update,
    step_gradient,
    weight_layer_names,
)
from bnlightning.callbacks.guard import RngState, observer_guard
from bnlightning.callbacks.ics import InternalCovariateShift
from bnlightning.callbacks.landscape import LossLandscape
from bnlightning.callbacks.meanshift import MeanShift, mean_shift
from bnlightning.callbacks.residual import ResidualVariance, residual_variance

__all__ = [
    "ActivationStats",
    "InternalCovariateShift",
    "LossLandscape",
    "MeanShift",
    "MeasurementCallback",
    "ResidualVariance",
    "RngState",
    "activation_stats",
    "internal_covariate_shift",
    "loss_landscape",
    "mean_shift",
    "measurement_forward",
    "observer_guard",
    "optimizer_update",
    "residual_variance",
    "sgd_update",
    "step_gradient",
    "weight_layer_names",
]
