"""Pure measurement functions (PROTOCOL §1–3); the Callback classes are thin shells over them.

One file per measurement: ``ics.py`` (§1), ``landscape.py`` (§2), ``activations.py`` (§3),
``meanshift.py`` (§10), ``residual.py`` (residual branch vs skip path), ``gauges.py`` and ``sld.py``
(§12), ``hessian.py`` (§9), and ``gradient.py`` (the first pass G they share). The private modules
hold the plumbing, each named for what it holds: ``_loss.py`` (which loss: resolved once),
``_harness.py`` (``LossHarness``: the loss on substitute tensors, in the measurement's frame),
``_numerics.py`` (float32, eager, DDP reduction), ``_order.py`` (forward order), ``_layers.py``
(which modules are layers), ``_memory.py`` (the vmap memory budget), ``_batching.py`` (vmap or
loop), ``_prefix.py`` (ICS's prefix engine), ``_updates.py`` (W^(t+1) without the real step),
``_state.py`` (RNG, torchmetrics and module-attribute snapshots), ``_optimizer.py`` (the torch
optimizer inside Lightning's wrapper); ``names.py`` builds logged metric names.

The layering rule: this package is pure torch. It imports nothing from the callback level above it
(``bnlightning.callbacks.*`` outside ``functional``), nothing of Lightning and nothing of the rest of
``bnlightning``; ``tests/callbacks/test_layering.py`` enforces it.

The Hessian-vector-product toolkit (PROTOCOL §9, torch only; docs/curvature.md) is public here
too: ``make_hvp``, ``top_eigenvalues`` (thick-restart Lanczos, returns an ``EigenResult``, with
``keep_basis=True`` its whole basis as a ``RitzBasis``), ``hutchinson_trace`` and ``krylov_trace`` (the
trace deflated by that basis, a ``TraceResult``), for curvature of any loss you write; they live in
``_hvp.py``, ``_lanczos.py`` and ``_trace.py``, on the vector algebra of ``_vectors.py``.

Every function:

- calls the loss with tensors of its own substituted for the module's parameters (float32;
  no copy when they already are) and buffers (clones: a train-mode BatchNorm updates the clone),
  so the module's own tensors are never written;
- runs in float32, outside autocast, with TF32 off, whatever precision training uses;
- differentiates with ``torch.autograd`` / ``torch.func`` on its substitutes (no ``.grad`` touched);
- replays the RNG state before every pass, so every pass draws the same random numbers (noisy
  BatchNorm's noise, dropout masks), and rewinds it afterwards;
- leaves normalization layers in whatever mode the module is in;
- with ``reduce=`` (a mean over ranks) averages every gradient and loss before any norm.

The loss: every function takes ``loss_fn``, one callable ``(module, batch) -> scalar loss``
(``LossFn``). ``None`` resolves it from the module by the rule of ``resolve_loss``: its ``loss``
method when that takes one batch (an ``nn.Module`` attribute such as ``self.loss =
nn.CrossEntropyLoss()`` never counts), else a LightningModule's own ``training_step``, called with
the arguments it accepts (a tensor or a dict with ``"loss"``; its ``self.log`` calls are silenced
and torchmetrics states restored). ``resolve_loss(module, loss_fn=..., loss_method=...)`` resolves
once; pass its result as ``loss_fn`` to any number of calls.
"""

from bnlightning.callbacks.functional._batching import MODES
from bnlightning.callbacks.functional._hvp import make_hvp
from bnlightning.callbacks.functional._lanczos import EigenResult, RitzBasis, top_eigenvalues
from bnlightning.callbacks.functional._layers import WEIGHT_LAYER_TYPES, weight_layer_names
from bnlightning.callbacks.functional._loss import LossFn, resolve_loss
from bnlightning.callbacks.functional._numerics import exact_float32
from bnlightning.callbacks.functional._trace import TraceResult, hutchinson_trace, krylov_trace
from bnlightning.callbacks.functional._updates import optimizer_update, sgd_update
from bnlightning.callbacks.functional.activations import (
    ACTIVATION_KINDS,
    activation_kind,
    activation_stats,
    capture_forward,
    measurement_forward,
)
from bnlightning.callbacks.functional.gradient import StepGradient, step_gradient
from bnlightning.callbacks.functional.ics import ICS_MODES, internal_covariate_shift
from bnlightning.callbacks.functional.landscape import loss_landscape
from bnlightning.callbacks.functional.meanshift import mean_shift
from bnlightning.callbacks.functional.residual import residual_blocks, residual_variance

__all__ = [
    "ACTIVATION_KINDS",
    "ICS_MODES",
    "MODES",
    "WEIGHT_LAYER_TYPES",
    "LossFn",
    "EigenResult",
    "RitzBasis",
    "TraceResult",
    "StepGradient",
    "activation_kind",
    "activation_stats",
    "capture_forward",
    "exact_float32",
    "hutchinson_trace",
    "internal_covariate_shift",
    "krylov_trace",
    "loss_landscape",
    "mean_shift",
    "make_hvp",
    "measurement_forward",
    "optimizer_update",
    "residual_blocks",
    "residual_variance",
    "resolve_loss",
    "sgd_update",
    "step_gradient",
    "top_eigenvalues",
    "weight_layer_names",
]
