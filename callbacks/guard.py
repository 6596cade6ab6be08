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
  a version counter of its own and escapes the check; nothing in this package uses ``.data``). That is a bug in the measurement (or in
  whatever ran inside the block), never a condition to recover from.

``RngState`` is the RNG part alone; the measurement functions use it to replay the same random
draws (noisy BatchNorm's noise, dropout masks) in every pass they make.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

try:  # NumPy is optional for torch; restore its global generator when it is there.
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with every torch wheel we use
    _np = None  # type: ignore[assignment]

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


class RngState:
    """A snapshot of every global random number generator; ``restore()`` rewinds to it.

    Example::

        rng = RngState.capture()
        a = torch.rand(3)
        rng.restore()
        assert torch.equal(a, torch.rand(3))
    """

    def __init__(self, torch_cpu: Tensor, cuda: list[Tensor] | None, python: Any, numpy: Any) -> None:
        self.torch_cpu, self.cuda, self.python, self.numpy = torch_cpu, cuda, python, numpy

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        numpy = _np.random.get_state() if _np is not None else None
        return cls(torch.get_rng_state(), cuda, random.getstate(), numpy)

    def equals(self, other: RngState) -> bool:
        """Whether ``other`` holds exactly the same generator states."""
        if not torch.equal(self.torch_cpu, other.torch_cpu) or self.python != other.python:
            return False
        if self.cuda is None or other.cuda is None:
            if (self.cuda is None) != (other.cuda is None):
                return False
        elif len(self.cuda) != len(other.cuda) or not all(torch.equal(a, b) for a, b in zip(self.cuda, other.cuda)):
            return False
        if (self.numpy is None) != (other.numpy is None):
            return False
        if self.numpy is not None:
            a, b = self.numpy, other.numpy
            return len(a) == len(b) and all(_np.array_equal(x, y) if isinstance(x, _np.ndarray) else x == y for x, y in zip(a, b))
        return True

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        if _np is not None and self.numpy is not None:
            _np.random.set_state(self.numpy)


# --- torchmetrics states ---------------------------------------------------------------
_METRIC_EXTRA = ("_update_count", "_computed", "_forward_cache")


def _copy_state(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v, v.detach().clone()
    if isinstance(v, list):
        return v, list(v)  # list states (cat metrics) only ever grow by appending new tensors
    return v, v


def metric_states(module: nn.Module) -> list[tuple[Any, dict[str, Any]]]:
    """The state of every torchmetrics ``Metric`` inside ``module`` (``Metric.metric_state`` plus its
    update counters): each value's object and a copy of it, for ``restore_metric_states``."""
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - lightning depends on torchmetrics
        return []
    out = []
    for m in module.modules():
        if isinstance(m, Metric):
            state = {k: _copy_state(v) for k, v in m.metric_state.items()}
            state.update({k: _copy_state(getattr(m, k)) for k in _METRIC_EXTRA if hasattr(m, k)})
            out.append((m, state))
    return out


def restore_metric_states(saved: list[tuple[Any, dict[str, Any]]]) -> None:
    """Put each state's original object back in place, holding its original value."""
    for m, state in saved:
        for k, (original, copied) in state.items():
            if isinstance(original, Tensor):
                with torch.no_grad():
                    original.copy_(copied)
            elif isinstance(original, list):
                original[:] = copied
            object.__setattr__(m, k, original)


# --- module attributes -------------------------------------------------------------------
def module_attributes(module: nn.Module) -> list[tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """A shallow copy of every submodule's instance attributes and of its parameter, buffer and
    submodule slots (references only: cheap), for ``restore_module_attributes``."""
    return [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in module.modules()]


def restore_module_attributes(saved: list[tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]]) -> None:
    """Put back every attribute a pass set or replaced on a module (a cached mask, an RNN's
    ``_flat_weights``, a ``training_step`` that keeps state on ``self``), and every slot."""
    for m, attrs, params, buffers, modules in saved:
        current = vars(m)
        for k in [k for k in current if k not in attrs]:
            del current[k]
        for k, v in attrs.items():
            if current.get(k) is not v:
                current[k] = v
        for slots, kept in ((m._parameters, params), (m._buffers, buffers), (m._modules, modules)):
            if len(slots) != len(kept) or any(slots.get(k) is not v for k, v in kept.items()):  # identity, never tensor ==
                slots.clear()
                slots.update(kept)


# --- the guard ---------------------------------------------------------------------------
def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Lightning's ``LightningOptimizer`` wraps the torch optimizer as ``_optimizer``."""
    return getattr(optimizer, "_optimizer", optimizer)


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
    opts = [_unwrap_optimizer(o) for o in optimizers]
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
            raise ObserverEffectError(f"a measurement changed training state it must leave alone: {', '.join(changed[:5])}")
