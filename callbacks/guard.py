"""The observer-effect guard: a measurement leaves the training run exactly as it found it.

``observer_guard`` makes sure that, after the block, everything a measurement could disturb is
as before, and it does so at the cost of the small state only:

- **restored exactly** (snapshot, then put back): every module's parameter, buffer and submodule
  *slots* (the same objects as before, so a substitute can never be left behind in a module
  registered under several names) and its other instance attributes (a cached mask, an RNN's
  weight list, state a ``training_step`` keeps on ``self``), every buffer's *value*
  (BatchNorm's running statistics and ``num_batches_tracked``), each submodule's train flag,
  ``requires_grad`` flags, the states of torchmetrics metrics inside the module, and every random
  number generator (torch CPU and CUDA, Python, NumPy);
- **checked, not copied**: parameters, their ``.grad`` and the optimizers' state and
  hyper-parameters are large (with Adam, three times the model), and the measurements provably
  never write them: they compute on substitutes. The guard records each tensor's identity and
  version counter (``Tensor._version``, bumped by every in-place write) and raises
  ``ObserverEffectError`` on exit if one changed (a write through the legacy ``.data`` attribute has
  a version counter of its own and escapes the check; nothing in this package uses ``.data``). That is a bug in the
  measurement (or in whatever ran inside the block), never a condition to recover from.

``RngState`` is the RNG part alone; the measurement functions use it to replay the same random
draws (noisy BatchNorm's noise, dropout masks) in every pass they make. It and the other state
primitives live in the functional layer (``functional/_state.py``), which is pure torch; this
module re-exports them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from bnlightning.callbacks.functional._optimizer import torch_optimizer
from bnlightning.callbacks.functional._state import (
    RngState,
    metric_states,
    module_attributes,
    restore_metric_states,
    restore_module_attributes,
)

__all__ = [
    "ObserverEffectError",
    "RngState",
    "metric_states",
    "module_attributes",
    "observer_guard",
    "restore_metric_states",
    "restore_module_attributes",
]


class ObserverEffectError(RuntimeError):
    """Something inside ``observer_guard`` wrote a parameter, a gradient or optimizer state."""


# --- the guard ---------------------------------------------------------------------------
def _stamp(t: Any) -> Any:
    """Identity and version of a tensor (``None`` stays ``None``); other values as they are."""
    return (id(t), t._version) if isinstance(t, Tensor) else t


def _optimizer_stamp(opt: torch.optim.Optimizer) -> tuple[Any, Any]:
    state = {id(p): {k: _stamp(v) for k, v in s.items()} for p, s in opt.state.items()}
    groups = [{k: ([id(p) for p in v] if k == "params" else _stamp(v)) for k, v in g.items()} for g in opt.param_groups]
    return state, groups


@contextlib.contextmanager
def observer_guard(module: nn.Module, optimizers: Iterable[Any] = ()) -> Iterator[None]:
    """Restore ``module``'s slots, buffers, modes, metric states and every RNG; check the rest.

    Args:
        module: the module whose state is kept.
        optimizers: optimizers (torch or Lightning-wrapped) whose state and hyper-parameters must
            not change.

    Raises:
        ObserverEffectError: on exit, when a parameter value or ``requires_grad`` flag, a ``.grad``
            (its object or its value) or an optimizer's state or hyper-parameters changed inside
            the block. Everything restorable has been restored by then.

    Example::

        with observer_guard(model, [optimizer]):
            measurement_forward(model, batch)   # train-mode BN: running stats restored after
    """
    rng = RngState.capture()
    modules = list(module.modules())
    attributes = module_attributes(module)
    params = [(n, p, p._version, p.requires_grad, _stamp(p.grad)) for n, p in module.named_parameters()]
    buffers = [(b, b._version, b.detach().clone()) for b in module.buffers()]
    modes = [(m, m.training) for m in modules]
    metrics = metric_states(module)
    opts = [torch_optimizer(o) for o in optimizers]
    stamps = [_optimizer_stamp(o) for o in opts]
    try:
        yield
    finally:
        restore_module_attributes(attributes)
        with torch.no_grad():
            for b, version, value in buffers:
                # Only what was written, so that a restore bumps no version counter. Values are compared
                # too: BatchNorm's kernel updates running statistics without bumping the counter.
                if b._version != version or not torch.equal(b, value):
                    b.copy_(value)
        for m, training in modes:
            m.training = training
        restore_metric_states(metrics)
        rng.restore()
        changed = [f"parameter {n}" for n, p, v, rg, _ in params if p._version != v or p.requires_grad != rg]
        changed += [f"gradient of {n}" for n, p, _, _, g in params if _stamp(p.grad) != g]
        changed += [f"state of {type(o).__name__}" for o, s in zip(opts, stamps) if _optimizer_stamp(o) != s]
        if changed:
            raise ObserverEffectError(
                f"a measurement changed training state it must leave alone: {', '.join(changed[:5])}"
            )
