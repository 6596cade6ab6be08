"""The state a measurement must leave as it found it, captured and put back (pure torch).

``RngState`` snapshots every global random number generator (torch CPU and CUDA, Python, NumPy);
the measurement functions replay it before every pass, so each pass draws the same random numbers
(noisy BatchNorm's noise, dropout masks), and rewind it afterwards. ``metric_states`` and
``module_attributes`` capture the torchmetrics states and the module attributes and slots a pass
may set. The observer-effect guard (``bnlightning.callbacks.guard``) is built on these.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor, nn

try:  # NumPy is optional for torch; restore its global generator when it is there.
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with every torch wheel we use
    _np = None  # type: ignore[assignment]

__all__ = ["RngState", "metric_states", "module_attributes", "restore_metric_states", "restore_module_attributes"]


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
            return len(a) == len(b) and all(
                _np.array_equal(x, y) if isinstance(x, _np.ndarray) else x == y for x, y in zip(a, b)
            )
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
def module_attributes(
    module: nn.Module,
) -> list[tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """A shallow copy of every submodule's instance attributes and of its parameter, buffer and
    submodule slots (references only: cheap), for ``restore_module_attributes``."""
    return [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in module.modules()]


def restore_module_attributes(
    saved: list[tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]],
) -> None:
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
            if len(slots) != len(kept) or any(
                slots.get(k) is not v for k, v in kept.items()
            ):  # identity, never tensor ==
                slots.clear()
                slots.update(kept)
