"""Metric names as they are logged: every key a measurement writes is built here, and the report
(``bnlightning.report``) reads the same names from here instead of re-typing them.

Names are ``<family>/<...>``: a constant for a fixed name (``HESSIAN_LAMBDA_MAX``), a constant for a
family whose names carry a layer or block (``ICS_L2`` for ``ics/l2/<layer>``), and a small builder for
the latter (``ics_key("l2", layer)``). Prefix matching in the report uses ``FAMILY + "/"``.
"""

from __future__ import annotations

import re

_ORIG_MOD = re.compile(r"(?<![^./])_orig_mod\.")


def metric_name(name: str) -> str:
    """``name`` without the ``_orig_mod.`` segments that ``torch.compile`` inserts into module names
    (``act/net._orig_mod.fc1/mean`` -> ``act/net.fc1/mean``)."""
    return _ORIG_MOD.sub("", name)


# Internal covariate shift (Santurkar et al. 2018): ``ics/<kind>/<layer>``.
ICS = "ics"
ICS_KINDS = ("l2", "cos", "rel")
ICS_L2 = "ics/l2"
ICS_COS = "ics/cos"
ICS_REL = "ics/rel"


def ics_key(kind: str, layer: str) -> str:
    """``ics/<kind>/<layer>``, ``kind`` one of :data:`ICS_KINDS`."""
    return f"{ICS}/{kind}/{layer}"


# Loss landscape and gradient predictiveness along the gradient direction.
LANDSCAPE = "landscape"
LANDSCAPE_LOSS = "landscape/loss"  # the family of the loss band below, as the report labels it
LANDSCAPE_LOSS_MIN = "landscape/loss_min"
LANDSCAPE_LOSS_MAX = "landscape/loss_max"
LANDSCAPE_GRAD_L2_MAX = "landscape/grad_l2_max"
LANDSCAPE_BETA_EFF = "landscape/beta_eff"
LANDSCAPE_METRICS = (LANDSCAPE_LOSS_MIN, LANDSCAPE_LOSS_MAX, LANDSCAPE_GRAD_L2_MAX, LANDSCAPE_BETA_EFF)

# Hessian spectrum (whole model: ``hessian/<stat>``; a layer block: ``hessian/<block>/<stat>``) and the
# curvature gauges that share the ``hessian/`` family.
HESSIAN = "hessian"
HESSIAN_LAMBDA_MAX = "hessian/lambda_max"
HESSIAN_TRACE = "hessian/trace"
HESSIAN_SHARPNESS_RATIO = "hessian/sharpness_ratio"
HESSIAN_PRECOND_LAMBDA_MAX = "hessian/precond_lambda_max"
HESSIAN_PRECOND_ITERATIONS = "hessian/precond_iterations"
HESSIAN_GRAD_CURVATURE = "hessian/grad_curvature"
HESSIAN_UPDATE_CURVATURE = "hessian/update_curvature"
HESSIAN_PREDICTED_CHANGE = "hessian/predicted_change"
HESSIAN_ACTUAL_CHANGE = "hessian/actual_change"


def hessian_prefix(block: str = "") -> str:
    """``hessian/`` for the whole model, ``hessian/<block>/`` for one layer's block."""
    return f"{HESSIAN}/{block}/" if block else f"{HESSIAN}/"


def hessian_eig(j: int) -> str:
    """``hessian/eig_<j>``, the ``j``-th largest eigenvalue (1-based)."""
    return f"{HESSIAN}/eig_{j}"


def hessian_curvature(kind: str) -> str:
    """``hessian/<kind>_curvature`` (``kind``: ``grad`` for gᵀHg/‖g‖², ``update`` for uᵀHu/‖u‖²)."""
    return f"{HESSIAN}/{kind}_curvature"


def hessian_curvature_ratio(kind: str) -> str:
    """``hessian/<kind>_curvature_ratio`` (``kind``: ``grad`` or ``update``)."""
    return f"{HESSIAN}/{kind}_curvature_ratio"


# Activation statistics: ``act/<layer>/<stat>`` (``q15``/``q50``/``q85``/``mean``/``std``/``saturated``/``dead``).
ACT = "act"
ACT_QUANTILES = ("q15", "q50", "q85")


def act_key(layer: str, stat: str) -> str:
    """``act/<layer>/<stat>``; ``act/<layer>`` (the histogram's name) when ``stat`` is empty."""
    return f"{ACT}/{layer}/{stat}" if stat else f"{ACT}/{layer}"


# Mean shift: ``meanshift/<layer>/cos``, ``meanshift/<layer>/channel_mean``.
MEANSHIFT = "meanshift"
MEANSHIFT_MAJORITY_SHARE = "meanshift/majority_share"


def meanshift_key(layer: str, stat: str) -> str:
    """``meanshift/<layer>/<stat>`` (``cos`` or ``channel_mean``)."""
    return f"{MEANSHIFT}/{layer}/{stat}"


# Residual-branch variance: ``resvar/<block>/<stat>`` (``branch``, ``skip``, ``ratio``).
RESVAR = "resvar"


def resvar_key(block: str, stat: str) -> str:
    """``resvar/<block>/<stat>``."""
    return f"{RESVAR}/{block}/{stat}"


# Gradient of the loss w.r.t. a BN layer's activations: ``gradact/<layer>/<stat>``.
GRADACT = "gradact"


def gradact_key(layer: str, stat: str) -> str:
    """``gradact/<layer>/<stat>`` (``norm``, ``input_norm``, ``bound``, ``gamma``, ``sigma``)."""
    return f"{GRADACT}/{layer}/{stat}"


# Effective learning rate of scale-invariant weights: ``efflr/<layer>/<stat>`` (``norm``, ``lr``, ``angle``).
EFFLR = "efflr"


def efflr_key(layer: str, stat: str) -> str:
    """``efflr/<layer>/<stat>``."""
    return f"{EFFLR}/{layer}/{stat}"


# Stochastic Lanczos quadrature spectral density: ``sld/<mode>/<stat>`` (``node_<i>``, ``weight_<i>``,
# ``lambda_max``, ``lambda_min``, ``hvps``).
SLD = "sld"


def sld_key(mode: str, stat: str) -> str:
    """``sld/<mode>/<stat>``."""
    return f"{SLD}/{mode}/{stat}"


#: Every family above; a logged measurement name starts with one of these and a ``/``.
FAMILIES = (ICS, LANDSCAPE, HESSIAN, ACT, MEANSHIFT, RESVAR, GRADACT, EFFLR, SLD)
