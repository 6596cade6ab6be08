"""Hessian-vector products: the operator ``v -> H v`` of a loss at a point (pure torch; PROTOCOL §9).

The Hessian is only ever touched through this product (the interface of curvlinops'
``HessianLinearOperator``); the algorithms on it are in ``_lanczos.py`` (top eigenvalues) and
``_trace.py`` (trace).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor

from bnlightning.callbacks.functional._vectors import Hvp, Vec, check_like

__all__ = ["HVP_METHODS", "HvpMethod", "check_hvp_method", "make_hvp"]

HvpMethod = Literal["retained", "double_backward", "jvp"]
HVP_METHODS: tuple[str, ...] = ("retained", "double_backward", "jvp")


def check_hvp_method(method: str, name: str = "hvp_method") -> None:
    """One clear error for an HVP form not in ``HVP_METHODS``; ``name`` is the argument as the caller calls it."""
    if method not in HVP_METHODS:
        raise ValueError(f"unknown {name} {method!r}; accepted: {', '.join(HVP_METHODS)}")


def make_hvp(loss_of: Callable[[Vec], Tensor], params: Mapping[str, Tensor], method: HvpMethod = "retained") -> Hvp:
    """``v -> H v`` for H the Hessian of ``loss_of`` at ``params``.

    Methods (timings: ``bench/curvature.py``, docs/benchmarks.md "Curvature"; one HVP in
    training steps, forward + backward, on a 2-core CPU: VGG-11-BN at width 0.125 / 0.25 and a
    3x100 BN MLP: retained 1.99 / 1.87 / 1.67 (+ a one-off set-up of about 1 step),
    double_backward 2.97 / 2.71 / 2.76, jvp 4.03 / 3.16 / 5.36):

    - ``"retained"`` (default, the fastest measured): double backward through one
      retained graph. ``loss_of`` runs once, here, with ``create_graph=True``; each call is
      one backward of ``<grad, v>`` through that graph (no new forward). It holds the graph
      (the activations and the first backward's) until the returned function is dropped, which
      is what the two other methods build anyway during each call.
    - ``"double_backward"``: the same, rebuilding the graph (forward + backward) on every call.
    - ``"jvp"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad(loss_of)``:
      the memory-lean form (no second-order graph), forward and backward on every call.

    With ``"jvp"``/``"double_backward"``, ``loss_of`` must compute the same function on every
    call: replay the RNG state inside it when the loss draws random numbers (dropout, noisy
    BatchNorm). In all cases pass cloned buffers to ``functional_call`` so that a train-mode
    BatchNorm does not update the module's own running statistics.

    Args:
        loss_of: ``params_dict -> scalar loss`` (e.g. a ``torch.func.functional_call`` wrapper).
        params: the point at which H is taken (float32 tensors; never written).
        method: ``"retained"``, ``"double_backward"`` or ``"jvp"``.

    Returns:
        ``hvp(v: dict[str, Tensor]) -> dict[str, Tensor]``.

    Raises:
        ValueError: an unknown ``method`` or non-float32 ``params``.

    Example::

        buffers = dict(model.named_buffers())
        def loss_of(p):
            b = {k: t.clone() for k, t in buffers.items()}
            return F.cross_entropy(functional_call(model, {**p, **b}, (x,)), y)
        hvp = make_hvp(loss_of, {k: p.detach() for k, p in model.named_parameters()})
    """
    check_hvp_method(method, "HVP method")
    check_like(params, "params")
    point = {k: t.detach() for k, t in params.items()}
    if method == "jvp":
        return _jvp_hvp(loss_of, point)
    if method == "double_backward":
        return lambda v: _second_order(point, *_first_order(loss_of, point), v, retain=False)
    leaves, grads = _first_order(loss_of, point)
    return lambda v: _second_order(point, leaves, grads, v, retain=True)


def _jvp_hvp(loss_of: Callable[[Vec], Tensor], point: Vec) -> Hvp:
    """Forward-over-reverse: the directional derivative of the gradient along v."""
    grad_fn = torch.func.grad(loss_of)

    def hvp_jvp(v: Vec) -> Vec:
        return torch.func.jvp(grad_fn, (point,), ({k: v[k] for k in point},))[1]

    return hvp_jvp


def _first_order(loss_of: Callable[[Vec], Tensor], point: Vec) -> tuple[list[Tensor], tuple[Tensor | None, ...]]:
    """Fresh leaves at ``point`` and the loss's gradient with its graph (``create_graph=True``)."""
    leaves = [t.detach().requires_grad_(True) for t in point.values()]
    with torch.enable_grad():
        loss = loss_of(dict(zip(point, leaves)))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    return leaves, grads


def _second_order(point: Vec, leaves: list[Tensor], grads: tuple[Tensor | None, ...], v: Vec, retain: bool) -> Vec:
    """H v as the vector-Jacobian product vᵀ ∂(grad)/∂w (H symmetric): one backward through the gradient's graph."""
    # A parameter whose gradient is constant (or absent) has a zero row in H.
    live = [(g, v[k]) for g, k in zip(grads, point) if g is not None and g.requires_grad]
    if not live:
        return {k: torch.zeros_like(t) for k, t in point.items()}
    outputs, directions = zip(*live)
    with torch.enable_grad():
        hv = torch.autograd.grad(outputs, leaves, grad_outputs=directions, retain_graph=retain, allow_unused=True)
    return {k: torch.zeros_like(t) if h is None else h for (k, t), h in zip(point.items(), hv)}
