"""The observer-effect guard: a measurement leaves the training run exactly as it found it.

``observer_guard`` snapshots, and on exit restores in place, everything a measurement
could disturb:

- every parameter's value, ``requires_grad`` flag and ``.grad`` (the same tensor object
  when there was one, ``None`` when there was none);
- every buffer, including BatchNorm's ``running_mean``/``running_var`` and the integer
  ``num_batches_tracked``;
- the train/eval flag of every submodule;
- the state and hyper-parameters of the optimizers passed in;
- every random number generator: torch's CPU generator, each initialised CUDA device's
  generator, Python's ``random`` and NumPy's global generator (when NumPy is installed).

Restoring is exact (``Tensor.copy_`` of a clone), so a run with measurements is
bit-identical to a run without them on the same hardware. ``RngState`` is the RNG part
alone; the measurement functions use it to replay the same random draws (noisy
BatchNorm's noise, dropout masks) in every pass they make.
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

__all__ = ["RngState", "observer_guard"]


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
        if (self.cuda is None) != (other.cuda is None) or (self.cuda is not None and (len(self.cuda) != len(other.cuda) or not all(torch.equal(a, b) for a, b in zip(self.cuda, other.cuda)))):
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


def _clone_value(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, Tensor) else v


def _restore_value(current: Any, saved: Any) -> Any:
    """Copy ``saved`` into ``current`` in place when both are tensors of one shape and dtype."""
    if isinstance(current, Tensor) and isinstance(saved, Tensor) and current.shape == saved.shape and current.dtype == saved.dtype:
        with torch.no_grad():
            current.copy_(saved)
        return current
    return _clone_value(saved)


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Lightning's ``LightningOptimizer`` wraps the torch optimizer as ``_optimizer``."""
    return getattr(optimizer, "_optimizer", optimizer)


@contextlib.contextmanager
def observer_guard(module: nn.Module, optimizers: Iterable[Any] = ()) -> Iterator[None]:
    """Snapshot ``module`` (and ``optimizers``) and every RNG; restore them exactly on exit.

    Args:
        module: the module whose parameters, gradients, buffers and modes are kept.
        optimizers: optimizers (torch or Lightning-wrapped) whose state and
            ``param_groups`` hyper-parameters are kept.

    Example::

        with observer_guard(model, [optimizer]):
            model.train()(x).sum().backward()   # anything at all
        # model, optimizer and all RNGs are as before the block
    """
    rng = RngState.capture()
    params = list(module.named_parameters(remove_duplicate=True))
    saved_params = [(p, p.detach().clone(), p.requires_grad, p.grad, None if p.grad is None else p.grad.detach().clone()) for _, p in params]
    buffers = [(mod, name, buf) for mod in module.modules() for name, buf in mod._buffers.items() if buf is not None]
    saved_buffers = [(mod, name, buf, buf.detach().clone()) for mod, name, buf in buffers]
    modes = [(m, m.training) for m in module.modules()]
    opts = [_unwrap_optimizer(o) for o in optimizers]
    saved_opts = []
    for opt in opts:
        state = {p: {k: _clone_value(v) for k, v in s.items()} for p, s in opt.state.items()}
        groups = [{k: _clone_value(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
        saved_opts.append((opt, state, groups))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value, requires_grad, grad_obj, grad_value in saved_params:
                p.copy_(value)
                p.requires_grad_(requires_grad)
                if grad_obj is None:
                    p.grad = None
                else:
                    grad_obj.copy_(grad_value)
                    p.grad = grad_obj
            for mod, name, buf, value in saved_buffers:
                buf.copy_(value)
                mod._buffers[name] = buf
        for m, training in modes:
            m.training = training
        for opt, state, groups in saved_opts:
            for p in [p for p in opt.state if p not in state]:
                del opt.state[p]
            for p, s in state.items():
                current = opt.state[p]
                for k in [k for k in current if k not in s]:
                    del current[k]
                for k, v in s.items():
                    current[k] = _restore_value(current.get(k), v)
            for g, saved in zip(opt.param_groups, groups):
                for k in [k for k in g if k != "params" and k not in saved]:
                    del g[k]
                for k, v in saved.items():
                    g[k] = _restore_value(g.get(k), v)
        rng.restore()
