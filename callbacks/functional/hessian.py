"""Curvature on the training batch (PROTOCOL §9): top Hessian eigenvalues and trace, as a pure function.

The linear algebra is in the operator and algorithm files beside it: ``_hvp.py`` (the HVP forms),
``_lanczos.py`` (thick-restart Lanczos), ``_trace.py`` (Hutchinson's trace); this file applies it to a module's training
loss with the measurement rules of the other functions: float32 substitutes, cloned buffers (BatchNorm in training mode,
running statistics untouched), the same random draws in every pass, DDP mean.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from bnlightning.callbacks.functional._harness import LossHarness
from bnlightning.callbacks.functional._hvp import check_hvp_method, make_hvp
from bnlightning.callbacks.functional._lanczos import top_eigenvalues
from bnlightning.callbacks.functional._layers import layer_param, resolve_layers
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional._numerics import Reduce, reduce_dict, to_float32
from bnlightning.callbacks.functional._optimizer import torch_optimizer
from bnlightning.callbacks.functional._trace import krylov_trace
from bnlightning.callbacks.functional.names import hessian_prefix

__all__ = [
    "MIN_PROBES",
    "HessianOperator",
    "HessianResult",
    "edge_of_stability",
    "hessian_operator",
    "hessian_spectrum",
    "sharpness_limit",
]

Vec = dict[str, Tensor]

#: The fewest trace probes a measurement takes when the previous one said deflation pays (the variance
#: estimates behind that decision need a few probes to be worth anything).
MIN_PROBES = 4


class HessianResult(NamedTuple):
    """Metrics and the eigenvectors found (keep them to warm-start the next measurement).

    Attributes:
        metrics: ``hessian/lambda_max``, ``hessian/eig_<j>`` (j = 1..k, descending), ``hessian/iterations``
            (HVPs of the eigen solver), ``hessian/converged`` (1 or 0), ``hessian/hvps`` (all HVPs of the block), and
            with ``n_probes > 0`` ``hessian/trace``, ``hessian/trace_se``, ``hessian/trace_probes`` (the probes used)
            and ``hessian/trace_variance_ratio`` (the deflated probe's variance over a plain one's, see
            ``krylov_trace``); per layer block the same under ``hessian/<layer>/``.
        eigenvectors: block name (``""`` for the whole network, else the layer) -> the top-k eigenvectors.
        trace_ratios: block name -> ``trace_variance_ratio`` (pass it as ``trace_ratios`` next time).
    """

    metrics: dict[str, Tensor]
    eigenvectors: dict[str, list[Vec]]
    trace_ratios: dict[str, float]


class HessianOperator:
    """``v -> H v`` for H the Hessian of a module's training loss on one batch (see :func:`hessian_operator`).

    Attributes:
        point: parameter name -> its float32 value (the point at which H is taken; never written).
        calls: the HVPs computed so far.
    """

    def __init__(self, hvp: Callable[[Vec], Vec], point: Vec, reduce: Reduce | None) -> None:
        self._hvp, self.point, self._reduce, self.calls = hvp, point, reduce, 0

    def __call__(self, v: Mapping[str, Tensor]) -> Vec:
        """H v for ``v`` shaped like ``point`` (float32 tensors); under DDP the mean over ranks."""
        self.calls += 1
        hv = self._hvp({k: v[k] for k in self.point})
        return reduce_dict(hv, self._reduce) if self._reduce is not None else hv


@contextlib.contextmanager
def hessian_operator(
    module: nn.Module,
    batch: Any,
    names: Sequence[str] | None = None,
    *,
    method: str = "retained",
    loss_fn: LossFn | None = None,
    reduce: Reduce | None = None,
    _model: LossHarness | None = None,
) -> Iterator[HessianOperator]:
    """The Hessian of the training loss on ``batch`` as an operator ``v -> H v``, for the block of ``with``.

    The loss is taken as every measurement takes it: float32 outside autocast, BatchNorm in training
    mode on the batch's statistics with its running statistics untouched (each pass gets fresh clones
    of the buffers, made inside the pass so that ``torch.func`` transforms may update them), the same
    random draws in every pass (the RNG replayed), and nothing of the module written. Use the
    operator only inside the ``with`` block (the retained graph and the RNG frame live there).

    Args:
        module: any module; ``loss_fn`` as in ``internal_covariate_shift``.
        batch: the batch.
        names: the parameters H is taken over (default: every trainable one): the block of H for them.
        method: ``retained`` (default; one forward and backward here, then one backward per HVP),
            ``double_backward`` or ``jvp`` (forward-over-reverse, no retained graph), see ``make_hvp``.
        reduce: mean over ranks (DDP), applied to every product: H of the global-batch loss.

    Example::

        with hessian_operator(model, batch) as hvp:
            v = {n: torch.randn_like(p) for n, p in hvp.point.items()}
            curvature = sum((v[n] * hv).sum() for n, hv in hvp(v).items())  # vᵀ H v
    """
    check_hvp_method(method)
    model = _model if _model is not None else LossHarness(module, loss_fn)
    names = list(model.trainable) if names is None else list(names)
    batch = to_float32(batch)
    with model.session(second_order=True) as rng:
        buffers = model.fresh_buffers()

        def loss_of(p: Vec) -> Tensor:
            rng.restore()  # the same random draws in every pass
            fresh = {n: b.clone() for n, b in buffers.items()}  # made inside the pass: a transform may update it
            return model.loss({**model.values, **fresh, **p}, batch)

        point = {n: model.values[n] for n in names}
        op = HessianOperator(make_hvp(loss_of, point, method), point, reduce)  # type: ignore[arg-type]
        try:
            yield op
        finally:
            op._hvp = _released


def _released(v: Vec) -> Vec:
    raise RuntimeError("this HessianOperator was used after its `with hessian_operator(...)` block ended")


def hessian_spectrum(
    module: nn.Module,
    batch: Any,
    *,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int = 100,
    n_probes: int = 20,
    layers: Sequence[str] = (),
    whole: bool = True,
    v0: Mapping[str, list[Vec]] | None = None,
    seed: int = 0,
    max_basis: int | None = None,
    hvp_method: str = "retained",
    loss_fn: LossFn | None = None,
    reduce: Reduce | None = None,
    trace_ratios: Mapping[str, float] | None = None,
) -> HessianResult:
    """Top-k eigenvalues (algebraic) and trace of the Hessian of the training loss on ``batch``.

    H = ∇²L(w) over every trainable parameter (and, per name in ``layers``, the block of H for that
    layer's weight), accessed only through Hessian-vector products; the module is never written.

    Args:
        module: any module; ``loss_fn`` as in ``internal_covariate_shift``.
        batch: the batch.
        k: how many top eigenvalues.
        tol: the eigen solver's tolerance on each eigenvalue's relative error (see ``_lanczos.top_eigenvalues``).
        max_iter: cap on the eigen solver's HVPs per block.
        n_probes: the trace's accuracy, as the plain Hutchinson probes whose standard error it matches
            (0: no trace). The trace is deflated by the eigen solver's whole Lanczos basis
            (``_trace.krylov_trace``); with ``trace_ratios[block]`` (the previous measurement's variance
            ratio r) it takes ``ceil(n_probes · r)`` probes, at least ``MIN_PROBES`` and at most ``n_probes``,
            else ``n_probes``; where r >= 1 (deflation raised the variance) it takes ``n_probes`` plain
            Hutchinson probes. Count and form are fixed before probing, so the estimate stays unbiased.
        layers: module names whose weight block is also measured.
        whole: measure the whole-network Hessian (set False for blocks only).
        v0: block name -> start vectors (a previous result's ``eigenvectors``): a warm start.
        seed: seed of the random start and probes (a ``torch.Generator``: the global RNG is untouched;
            every rank must use the same seed under DDP).
        max_basis: Lanczos basis size (default 8 for k = 1).
        hvp_method: ``retained`` (default, fastest measured), ``double_backward`` or ``jvp``.
        reduce: mean over ranks (DDP), applied to every HVP.
        trace_ratios: block name -> a previous result's ``trace_ratios`` entry (see ``n_probes``).

    Raises:
        ValueError: a bad ``k``, ``tol``, ``max_iter``, ``n_probes``, ``hvp_method`` or layer name.
    """
    check_hvp_method(hvp_method)
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 0:
        raise ValueError(f"n_probes must be an integer >= 0, got {n_probes!r}")
    model = LossHarness(module, loss_fn)
    blocks: dict[str, list[str]] = {"": list(model.trainable)} if whole else {}
    for layer in resolve_layers(module, list(layers)) if layers else []:
        blocks[layer] = [layer_param(module, layer, model)]
    solver = _Solver(k, tol, max_iter, n_probes, seed, max_basis)
    metrics: dict[str, Tensor] = {}
    vectors: dict[str, list[Vec]] = {}
    ratios: dict[str, float] = {}
    for block, names in blocks.items():
        with hessian_operator(
            module, batch, names, method=hvp_method, loss_fn=loss_fn, reduce=reduce, _model=model
        ) as hvp:
            prefix = hessian_prefix(block)
            ratio = (trace_ratios or {}).get(block)
            probes = _trace_probes(n_probes, ratio)
            deflate = ratio is None or not ratio >= 1.0  # deflation raised the variance last time: plain Hutchinson
            values, vectors[block] = _measure_block(
                hvp, solver._replace(n_probes=probes), _warm_start(hvp.point, (v0 or {}).get(block)), deflate
            )
            metrics.update({f"{prefix}{name}": value for name, value in values.items()})
            if probes:
                ratios[block] = float(values["trace_variance_ratio"])
    return HessianResult(metrics, vectors, ratios)


def _trace_probes(n_probes: int, ratio: float | None) -> int:
    """Probes for the standard error of ``n_probes`` plain ones, given the variance ratio last measured."""
    if not n_probes or ratio is None or not math.isfinite(ratio):
        return n_probes
    return min(n_probes, max(MIN_PROBES, math.ceil(n_probes * max(ratio, 0.0))))


class _Solver(NamedTuple):
    """The eigen solver's and the trace estimator's settings (see :func:`hessian_spectrum`)."""

    k: int
    tol: float
    max_iter: int
    n_probes: int
    seed: int
    max_basis: int | None


def _warm_start(point: Vec, start: list[Vec] | None) -> list[Vec] | None:
    """``start`` when it has the parameters' names and shapes, else None (they changed: start cold)."""
    if start and all(set(v) == set(point) and all(v[n].shape == point[n].shape for n in point) for v in start):
        return start
    return None


def _measure_block(
    hvp: HessianOperator, solver: _Solver, start: list[Vec] | None, deflate: bool
) -> tuple[dict[str, Tensor], list[Vec]]:
    """The metrics of one block of H (names without the ``hessian/<block>/`` prefix) and its eigenvectors."""
    point = hvp.point
    # a CPU generator: the same seed gives the same start and probes on every device (CPU, any GPU)
    gen = torch.Generator().manual_seed(solver.seed)
    basis = solver.n_probes > 0  # the trace is deflated by the whole Lanczos basis
    eig = top_eigenvalues(
        hvp,
        point,
        solver.k,
        tol=solver.tol,
        max_iter=solver.max_iter,
        v0=start,
        generator=gen,
        max_basis=solver.max_basis,
        keep_basis=basis,
    )
    values = eig.eigenvalues.to(torch.float32)
    metrics = {"lambda_max": values[0]}
    for j in range(solver.k):
        metrics[f"eig_{j + 1}"] = values[j]
    metrics["iterations"] = torch.tensor(float(eig.iterations))
    metrics["converged"] = torch.tensor(float(eig.converged))
    if eig.basis is not None:
        trace = krylov_trace(hvp, point, eig.basis, solver.n_probes, deflate=deflate, generator=gen)
        metrics["trace"] = torch.tensor(trace.estimate, dtype=torch.float32)
        metrics["trace_se"] = torch.tensor(trace.standard_error, dtype=torch.float32)
        metrics["trace_probes"] = torch.tensor(float(trace.probes))
        metrics["trace_variance_ratio"] = torch.tensor(trace.variance_ratio, dtype=torch.float32)
    metrics["hvps"] = torch.tensor(float(hvp.calls))
    return metrics, eig.eigenvectors


def edge_of_stability(optimizer: Any) -> float | None:
    """The stability limit of λmax every parameter is updated with: 2/η for SGD, 2(1+β)/η for SGD with
    (heavy-ball) momentum β (Cohen et al. 2021); ``None`` where :func:`sharpness_limit` says why not."""
    return sharpness_limit(optimizer)[0]


def sharpness_limit(optimizer: Any) -> tuple[float | None, str]:
    """The edge-of-stability limit 2(1+β)/η every parameter is updated with, or ``None`` and why not.

    Defined for ``torch.optim.SGD`` with heavy-ball momentum β (β = 0: plain SGD). Several parameter
    groups are accepted when they give one limit; groups with different η or β are refused (one λmax of
    H has no single η to be compared with), as are Nesterov momentum, dampening and other optimizers.
    """
    opt = torch_optimizer(optimizer)
    name = type(opt).__name__
    if type(opt) is not torch.optim.SGD:
        return None, f"the ratio is defined for SGD with heavy-ball momentum, and the optimizer is {name}"
    limits = []
    for group in opt.param_groups:
        limit = _group_limit(group)
        if limit is None:
            return (
                None,
                "the ratio is defined for SGD with heavy-ball momentum and lr > 0; this SGD "
                f"has {_sgd_settings(group)}",
            )
        limits.append(limit)
    if max(limits) > min(limits) * (1 + 1e-12):
        settings = "; ".join(f"group {i}: {_sgd_settings(g)}" for i, g in enumerate(opt.param_groups))
        return (
            None,
            f"the parameter groups have different limits 2(1+momentum)/lr ({settings}), so no single eta applies to "
            "lambda_max",
        )
    return limits[0], ""


def _group_limit(group: dict[str, Any]) -> float | None:
    """2(1+β)/η of one SGD parameter group, or None where no such limit is defined."""
    lr, beta = float(group["lr"]), float(group.get("momentum", 0.0))
    if group.get("nesterov", False) or (beta and float(group.get("dampening", 0.0))) or not lr > 0:
        return None
    return 2.0 * (1.0 + beta) / lr


def _sgd_settings(group: dict[str, Any]) -> str:
    return (
        f"lr={group['lr']}, momentum={group.get('momentum', 0)}, dampening={group.get('dampening', 0)}, "
        f"nesterov={group.get('nesterov', False)}"
    )
