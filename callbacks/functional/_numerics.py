"""How every measurement computes: float32 outside autocast, compiled regions run eagerly, ranks averaged.

- **Float32** outside autocast with TF32 off (``exact_float32``), whatever precision trains; the
  batch and the module's values are read as float32 (``to_float32``, ``float32``).
- **Eager, and second order where needed.** Measurements run the module's own Python code:
  ``torch.compile`` regions run eagerly (``torch.compiler.set_stance("force_eager")``, the same
  function without the compiled kernels, whose backward has no double backward); passes that
  differentiate twice (Hessian-vector products) run attention through the math kernel of
  ``F.scaled_dot_product_attention`` (the CPU flash kernel has no double backward).
- **Ranks** (``reduce_dict``): under DDP every gradient and loss is averaged over ranks before
  any norm, in one collective per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

#: A mean over ranks (DDP), applied to one flat tensor.
Reduce = Callable[[Tensor], Tensor]


@contextlib.contextmanager
def exact_float32(device_type: str = "cpu") -> Iterator[None]:
    """Autocast off (for ``device_type`` and CPU), TF32 off, gradients on; restored after."""
    prev = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if device_type != "cpu":
                stack.enter_context(torch.autocast(device_type, enabled=False))
            stack.enter_context(torch.enable_grad())
            yield
    finally:
        torch.set_float32_matmul_precision(prev[2])
        torch.backends.cuda.matmul.allow_tf32 = prev[0]
        torch.backends.cudnn.allow_tf32 = prev[1]


def to_float32(batch: Any) -> Any:
    """Every floating tensor of ``batch`` (any nesting of lists, tuples, dicts) as float32."""
    return apply_to_collection(batch, Tensor, lambda t: t.float() if t.is_floating_point() else t)


def float32(t: Tensor) -> Tensor:
    """``t`` detached, as float32: no copy when it already is float32 (the measurement never writes it)."""
    return t.detach().to(torch.float32)


def reduce_dict(tensors: Mapping[str, Tensor], reduce: Reduce | None) -> dict[str, Tensor]:
    """Every tensor of ``tensors`` passed through ``reduce`` (a mean over ranks) in one call."""
    if reduce is None or not tensors:
        return dict(tensors)
    names = list(tensors)
    flat = reduce(torch.cat([tensors[n].reshape(-1) for n in names]))
    out, i = {}, 0
    for n in names:
        k = tensors[n].numel()
        out[n] = flat[i : i + k].view_as(tensors[n])
        i += k
    return out


def eager() -> contextlib.AbstractContextManager[Any]:
    """``torch.compile`` regions (``torch.compile(m)``, ``m.compile()``) run as plain eager code in the
    block: the same function, none of the compiled backward's limits (no double backward, donated
    buffers), no recompilation for the measurement's substitutes and vmap. Needs torch >= 2.6
    (``torch.compiler.set_stance``); older versions run the compiled code (the callbacks warn)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def can_run_eager() -> bool:
    return hasattr(torch.compiler, "set_stance")


def math_attention() -> contextlib.AbstractContextManager[Any]:
    """``F.scaled_dot_product_attention`` through its math kernel, the one with a double backward (CPU's
    flash kernel has none); the same function, as plain matrix products."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
