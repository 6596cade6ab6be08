"""Stability gauges on the training batch (PROTOCOL §12), as pure functions.

- ``gradient_curvature``: gᵀHg/‖g‖² (Santurkar et al. Thm 4.2; "batch sharpness", Andreyev &
  Beneventano 2024) and, along the real update u = W^{t+1} − W^t, uᵀHu/‖u‖², the quadratic model's
  predicted loss change gᵀu + ½uᵀHu and the loss change the step really made.
- ``adaptive_preconditioner`` / ``preconditioned_sharpness``: λmax(P⁻¹H) for Adam, AdamW and RMSprop
  with P the diagonal the optimizer divides by (Cohen et al. 2022), and its stability threshold.
- ``activation_gradients``: ‖∂L/∂y‖ at chosen layers' outputs and, for BatchNorm, the observable
  terms of Santurkar et al.'s Thm 4.1 (γ, σ, the bound).
- ``effective_lr``: ‖W‖, η/‖W‖² and the angle between W^t and W^{t+1} (van Laarhoven 2017; Hoffer et
  al. 2018; Arora et al. 2019).

The measurement rules are those of every function here: float32 substitutes for parameters, cloned
buffers (BatchNorm in training mode, running statistics untouched), the same random draws in every
pass, the DDP mean of every gradient, loss and HVP before a norm or ratio is taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bnlightning.callbacks.functional._harness import LossHarness
from bnlightning.callbacks.functional._hvp import make_hvp
from bnlightning.callbacks.functional._lanczos import top_eigenvalues
from bnlightning.callbacks.functional._layers import WEIGHT_LAYER_TYPES, weight_layer_names
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional._numerics import Reduce, reduce_dict, to_float32
from bnlightning.callbacks.functional._optimizer import torch_optimizer
from bnlightning.callbacks.functional._vectors import CHUNK, dot
from bnlightning.callbacks.functional.activations import measurement_forward
from bnlightning.callbacks.functional.names import (
    HESSIAN_ACTUAL_CHANGE,
    HESSIAN_GRAD_CURVATURE,
    HESSIAN_PREDICTED_CHANGE,
    HESSIAN_UPDATE_CURVATURE,
    efflr_key,
    gradact_key,
)

if TYPE_CHECKING:
    from bnlightning.callbacks.functional._state import RngState

Vec = dict[str, Tensor]

__all__ = [
    "NORM_TYPES",
    "Preconditioner",
    "activation_gradients",
    "adaptive_preconditioner",
    "default_gradact_layers",
    "effective_lr",
    "gradient_curvature",
    "preconditioned_sharpness",
    "scale_invariant_layers",
]

#: Normalization layers (torch's own); modules of other classes whose name ends in "Norm" count too.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Σ over tensors of ⟨a, b⟩ in float64 arithmetic (small curvatures must not drown in rounding): ``_vectors.dot``,
    slice by slice, not whole float64 copies (1.7 training steps per product on ResNet-18)."""
    return torch.tensor(dot(a, b) if a else 0.0, dtype=torch.float64)


# --- gradient-direction and update curvature ------------------------------------------------
def gradient_curvature(
    module: nn.Module,
    batch: Any,
    *,
    weights: Mapping[str, Tensor] | None = None,
    next_weights: Mapping[str, Tensor] | None = None,
    hvp_method: str = "retained",
    loss_fn: LossFn | None = None,
    reduce: Reduce | None = None,
) -> dict[str, Tensor]:
    """Curvature of the training loss along the gradient and along the real update (PROTOCOL §12).

    At W^t (``weights``, default the module's current values), with g = ∇L(W^t) and H = ∇²L(W^t)
    over every trainable parameter:

    - ``hessian/grad_curvature`` = gᵀHg / ‖g‖² (one HVP);
    - with ``next_weights`` (W^{t+1}, e.g. the module's parameters right after the real optimizer
      step) and u = W^{t+1} − W^t: ``hessian/update_curvature`` = uᵀHu / ‖u‖²,
      ``hessian/predicted_change`` = gᵀu + ½uᵀHu and ``hessian/actual_change`` = L(W^{t+1}) − L(W^t)
      on the same batch and random draws (one more HVP and one forward).

    A zero gradient or update gives NaN for its curvature. Costs: one gradient pass, one HVP set-up
    (``make_hvp``), one or two HVPs, one forward.

    Args:
        module, batch, loss_fn: as in ``internal_covariate_shift``.
        weights: canonical parameter name -> W^t (others keep the module's value).
        next_weights: canonical parameter name -> W^{t+1}; a trainable parameter missing here did not move.
        hvp_method: ``retained``, ``double_backward`` or ``jvp`` (see ``_hvp.make_hvp``).
        reduce: mean over ranks (DDP), applied to g, every HVP and both losses.
    """
    model = LossHarness(module, loss_fn)
    names = model.trainable
    batch = to_float32(batch)
    at = {**model.values, **{n: w.detach().to(torch.float32) for n, w in (weights or {}).items()}}
    with model.session(second_order=True) as rng:
        loss0, g, _ = model.gradient(names, batch, rng, overrides=at)
        g = reduce_dict(g, reduce)
        hessian = _Quadratic(model, batch, rng, at, hvp_method, reduce)
        out = {HESSIAN_GRAD_CURVATURE: _ratio(hessian.form(g), _dot(g, g))}
        if next_weights is not None:
            out.update(_update_terms(hessian, g, loss0, next_weights))
    return out


class _Quadratic:
    """vᵀHv at W^t (``at``) on one batch: one HVP set-up (``make_hvp``), then one HVP per vector.

    Every pass replays the same random draws and runs on the same buffer clones; under DDP (``reduce``)
    each HVP is averaged over ranks before the product with v.
    """

    def __init__(
        self, model: LossHarness, batch: Any, rng: RngState, at: Vec, hvp_method: str, reduce: Reduce | None
    ) -> None:
        self.model, self.batch, self.rng, self.at, self.reduce = model, batch, rng, at, reduce
        self.buffers = model.fresh_buffers()
        self.hvp = make_hvp(self.loss_of, {n: at[n] for n in model.trainable}, hvp_method)  # type: ignore[arg-type]

    def loss_of(self, p: Vec) -> Tensor:
        """The loss with the trainable parameters ``p`` (the rest at ``at``)."""
        self.rng.restore()  # the same random draws in every pass
        return self.model.loss({**self.at, **self.buffers, **p}, self.batch)

    def form(self, v: Vec) -> Tensor:
        return _dot(v, reduce_dict(self.hvp(v), self.reduce))

    def loss_at(self, moved: Vec) -> Tensor:
        """The loss (no graph) with ``moved`` substituted, on fresh buffer clones."""
        with torch.no_grad():
            self.rng.restore()
            return self.model.loss({**self.at, **moved, **self.model.fresh_buffers()}, self.batch).detach()


def _update_terms(hessian: _Quadratic, g: Vec, loss0: Tensor, next_weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The curvature along the real update u = W^{t+1} − W^t, the quadratic model's predicted loss
    change and the loss change the step made (both losses averaged over ranks in one call)."""
    at, names = hessian.at, hessian.model.trainable
    u = {
        n: next_weights[n].detach().to(torch.float32) - at[n] if n in next_weights else torch.zeros_like(at[n])
        for n in names
    }
    uhu = hessian.form(u)
    out = {
        HESSIAN_UPDATE_CURVATURE: _ratio(uhu, _dot(u, u)),
        HESSIAN_PREDICTED_CHANGE: (_dot(g, u) + 0.5 * uhu).to(torch.float32),
    }
    loss1 = hessian.loss_at({n: at[n] + u[n] for n in names})
    losses = torch.stack([loss0.to(torch.float32), loss1.to(torch.float32)])
    losses = hessian.reduce(losses) if hessian.reduce is not None else losses
    out[HESSIAN_ACTUAL_CHANGE] = losses[1] - losses[0]
    return out


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return (num / den).to(torch.float32) if float(den) > 0 else torch.tensor(float("nan"))


# --- preconditioned sharpness ---------------------------------------------------------------
class Preconditioner(NamedTuple):
    """The diagonal an adaptive optimizer divides its step by, and the matching stability limit.

    Attributes:
        diagonal: canonical parameter name -> P = √v̂ + ε (elementwise), for every parameter the
            optimizer steps.
        threshold: the largest λmax(P⁻¹H) at which the optimizer's update is stable on the local
            quadratic: (2 + 2β₁)/(η(1 − β₁)) for Adam/AdamW (Cohen et al. 2022), 2(1+β)/η for RMSprop
            with heavy-ball momentum β (β = 0: 2/η).
        name: the optimizer class.
    """

    diagonal: dict[str, Tensor]
    threshold: float
    name: str


#: Optimizers whose update is −η · (momentum of g) / (√v̂ + ε), with where v lives in their state.
ADAPTIVE: dict[type[torch.optim.Optimizer], str] = {
    torch.optim.Adam: "exp_avg_sq",
    torch.optim.AdamW: "exp_avg_sq",
    torch.optim.RMSprop: "square_avg",
}


def adaptive_preconditioner(
    optimizer: Any, module: nn.Module, *, include_current_gradient: bool = True
) -> Preconditioner | None:
    """P = diag(√v̂ + ε) of the optimizer's step t, read from its own state (Cohen et al. 2022).

    Adam/AdamW: v̂ = v_t / (1 − β₂^t) with v_t = β₂ v_{t−1} + (1 − β₂) g_t² (``amsgrad``: the running
    maximum of v_t, as torch divides by it); the step is −η m̂_t / (√v̂_t + ε). RMSprop: v_t = α v_{t−1}
    + (1 − α) g_t² without bias correction (``centered``: v_t − ḡ_t²). With ``include_current_gradient``
    (the default; call it between backward and the optimizer step) g_t is each parameter's ``.grad``
    (with Adam's or RMSprop's L2 ``weight_decay`` added as their step adds it; AdamW's decoupled decay
    does not enter P), so P is the one step t is about to use; without it, the state as it stands
    (after the last step: call it right after a step). Gradient clipping that runs after the caller
    is not seen.

    Returns ``None`` for any other optimizer (SGD, LBFGS, a custom class without ``exp_avg_sq``),
    for parameter groups that disagree on the threshold's hyper-parameters, or before the state
    exists when ``include_current_gradient`` is False.
    """
    opt = torch_optimizer(optimizer)
    key = next((k for cls, k in ADAPTIVE.items() if type(opt) is cls), None)
    if key is None:
        return None
    name_of = {id(p): n for n, p in module.named_parameters()}
    diagonal: dict[str, Tensor] = {}
    thresholds = set()
    for group in opt.param_groups:
        lr = float(group["lr"])
        if isinstance(opt, torch.optim.RMSprop):
            thresholds.add(2.0 * (1.0 + float(group.get("momentum", 0.0))) / lr)
        else:
            b1 = float(group["betas"][0])
            thresholds.add((2.0 + 2.0 * b1) / (lr * (1.0 - b1)))
        for p in group["params"]:
            n = name_of.get(id(p))
            if n is None or (include_current_gradient and p.grad is None):
                continue
            v = _second_moment(opt, group, p, key, include_current_gradient)
            if v is None:
                return None
            diagonal[n] = v.sqrt().add(float(group["eps"])).to(torch.float32)
    if len(thresholds) != 1 or not diagonal:
        return None
    return Preconditioner(diagonal, thresholds.pop(), type(opt).__name__)


def _second_moment(
    opt: torch.optim.Optimizer, group: Mapping[str, Any], p: Tensor, key: str, with_grad: bool
) -> Tensor | None:
    """v̂ of step t for one parameter (see ``adaptive_preconditioner``), float64 for exactness."""
    state = opt.state.get(p, {})
    step = float(state["step"]) if "step" in state else 0.0
    v = state[key].detach().double() if key in state else torch.zeros_like(p, dtype=torch.float64)
    rms = isinstance(opt, torch.optim.RMSprop)
    beta2 = float(group["alpha"]) if rms else float(group["betas"][1])
    if with_grad and p.grad is not None:
        g = p.grad.detach().double()
        g = -g if group.get("maximize", False) else g
        decoupled = isinstance(opt, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        if group.get("weight_decay", 0.0) and not decoupled:
            g = g + float(group["weight_decay"]) * p.detach().double()
        v = beta2 * v + (1.0 - beta2) * g * g
        step += 1.0
        if rms and group.get("centered", False):
            mean = state["grad_avg"].detach().double() if "grad_avg" in state else torch.zeros_like(v)
            v = v - (beta2 * mean + (1.0 - beta2) * g) ** 2
        elif not rms and group.get("amsgrad", False) and "max_exp_avg_sq" in state:
            v = torch.maximum(state["max_exp_avg_sq"].detach().double(), v)
    elif step == 0:
        return None
    elif rms and group.get("centered", False):
        v = v - state["grad_avg"].detach().double() ** 2
    elif not rms and group.get("amsgrad", False):
        v = state["max_exp_avg_sq"].detach().double()
    return v if rms else v / (1.0 - beta2**step)


def preconditioned_sharpness(
    module: nn.Module,
    batch: Any,
    preconditioner: Mapping[str, Tensor],
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    v0: Vec | None = None,
    hvp_method: str = "retained",
    loss_fn: LossFn | None = None,
    reduce: Reduce | None = None,
) -> tuple[Tensor, Vec, int]:
    """λmax(P⁻¹H) of the training loss on ``batch``, as λmax of the symmetric P^{-1/2} H P^{-1/2}.

    H is over the parameters named in ``preconditioner`` (the ones the optimizer steps; the others
    held fixed), reached through HVPs; the eigen solver is ``_lanczos.top_eigenvalues`` (thick-restart
    Lanczos, algebraic order). Returns (λmax as float32, its eigenvector in the P^{-1/2}-scaled
    coordinates for a warm start, HVPs used).
    """
    model = LossHarness(module, loss_fn)
    names = [n for n in model.trainable if n in preconditioner]
    if not names:
        raise ValueError("preconditioner names none of the module's trainable parameters")
    scale = {n: preconditioner[n].detach().to(torch.float32).rsqrt() for n in names}
    batch = to_float32(batch)
    with model.session(second_order=True) as rng:
        buffers = model.fresh_buffers()

        def loss_of(p: Vec) -> Tensor:
            rng.restore()
            return model.loss({**model.values, **buffers, **p}, batch)

        point = {n: model.values[n] for n in names}
        hvp = make_hvp(loss_of, point, hvp_method)  # type: ignore[arg-type]

        def scaled(v: Vec) -> Vec:
            hv = hvp({n: scale[n] * v[n] for n in names})
            return {n: scale[n] * hv[n] for n in names}

        start = (
            v0
            if v0 is not None and set(v0) == set(names) and all(v0[n].shape == point[n].shape for n in names)
            else None
        )
        vec_reduce = (lambda v: reduce_dict(v, reduce)) if reduce is not None else None
        gen = torch.Generator().manual_seed(seed)
        eig = top_eigenvalues(scaled, point, 1, tol=tol, max_iter=max_iter, v0=start, generator=gen, reduce=vec_reduce)
    return eig.eigenvalues[0].to(torch.float32), eig.eigenvectors[0], eig.iterations


# --- activation gradients (Thm 4.1) ----------------------------------------------------------
def default_gradact_layers(module: nn.Module) -> list[str]:
    """Every normalization layer; in a network without one, every Conv/Linear layer but the last
    (the positions a normalization layer would follow)."""
    norms = [n for n, m in module.named_modules() if n and is_norm(m)]
    return norms or weight_layer_names(module)[:-1]


def activation_gradients(
    module: nn.Module,
    batch: Any,
    layers: Sequence[str],
    *,
    loss_fn: LossFn | None = None,
    reduce: Reduce | None = None,
) -> dict[str, Tensor]:
    """‖∂L/∂y‖₂ over the batch at each layer's output y, with Thm 4.1's terms for BatchNorm.

    Per name in ``layers`` (module names; the tensor read is the module's output on its last call):
    ``gradact/<layer>/norm``. For a BatchNorm layer in training mode, with x its input, ŷ the
    batch-standardised x, σ_j = √(Var_batch x_j + eps) and γ_j per channel j, also:
    ``gradact/<layer>/input_norm`` = ‖∂L/∂x‖, ``gradact/<layer>/gamma`` (mean |γ_j|),
    ``gradact/<layer>/sigma`` (mean σ_j) and ``gradact/<layer>/bound`` = the square root of
    Σ_j γ_j²/σ_j² (‖g_j‖² − ⟨1, g_j⟩²/m − ⟨g_j, ŷ_j⟩²/m), g_j = ∂L/∂y_j over the m values of
    channel j (batch × positions): Santurkar et al.'s Thm 4.1 right-hand side with ŷ_j of norm √m
    (their ⟨g, ŷ⟩²/√m is this term for a unit-normalised ŷ). It bounds ``input_norm`` from above,
    with equality when eps is negligible against the variance.

    Under DDP each rank's squared norms are averaged over ranks before the square root: the
    magnitude of a per-rank batch's activation gradient, independent of the world size.

    The module's outputs are read through hooks that live for this one pass; each output is handed
    on as a clone, so an in-place op after it (``ReLU(inplace=True)``) cannot rewrite what is read.
    """
    model = LossHarness(module, loss_fn)
    taps = _Taps({name: module.get_submodule(name) for name in layers})
    handles = taps.attach()
    try:
        with model.session() as rng:
            rng.restore()
            leaves = {
                n: model.values[n].detach().requires_grad_(True) for n in model.trainable
            }  # so activations carry a graph
            loss = model.loss({**model.values, **leaves, **model.fresh_buffers()}, to_float32(batch))
            wanted = [(name, k, t) for name in layers for k, t in taps.read[name].items()]
            grads = torch.autograd.grad(loss, [t for _, _, t in wanted], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    grad = {(name, k): torch.zeros_like(t) if g is None else g.detach() for (name, k, t), g in zip(wanted, grads)}
    return _gradact_metrics(layers, taps, grad, reduce)


class _Taps:
    """Forward hooks, for one pass, on the layers ``activation_gradients`` reads.

    ``read[layer]`` gets ``"y"``, the layer's output on its last call, and for a BatchNorm in
    training mode ``"x"``, its input. The module receives a clone of x (so ∂L/∂x is the gradient
    through BN only) and what follows receives a clone of y (what follows may work in place, e.g.
    ``ReLU(inplace=True)``; the tensor we differentiate by stays intact).
    """

    def __init__(self, mods: dict[str, nn.Module]) -> None:
        self.mods = mods
        self.read: dict[str, dict[str, Tensor]] = {name: {} for name in mods}

    def attach(self) -> list[RemovableHandle]:
        hooks = (
            (
                m.register_forward_pre_hook(partial(self._input, name)),
                m.register_forward_hook(partial(self._output, name)),
            )
            for name, m in self.mods.items()
        )
        return [h for pair in hooks for h in pair]

    def _input(self, name: str, m: nn.Module, args: tuple[Any, ...]) -> Any:
        if not _bn_in_training(m) or not args or not isinstance(args[0], Tensor):
            return None
        x = args[0].clone()
        self.read[name]["x"] = x
        return (x, *args[1:])

    def _output(self, name: str, m: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if not isinstance(out, Tensor):
            return None
        self.read[name]["y"] = out
        return out.clone()


def _gradact_metrics(
    layers: Sequence[str], taps: _Taps, grad: dict[tuple[str, str], Tensor], reduce: Reduce | None
) -> dict[str, Tensor]:
    """The metrics from ∂L/∂y (and ∂L/∂x): squared norms summed per rank, averaged over ranks in one
    call, then the square root of those that are norms."""
    sums: dict[str, Tensor] = {}
    for name in layers:
        if (name, "y") not in grad:
            raise ValueError(f"layer {name!r} returned no tensor in the loss's forward pass")
        sums[gradact_key(name, "norm")] = grad[name, "y"].double().pow(2).sum()
        if (name, "x") in grad:
            sums.update(
                _bn_terms(name, taps.mods[name], taps.read[name]["x"].detach(), grad[name, "y"], grad[name, "x"])
            )
    keys = list(sums)
    flat = torch.stack([sums[k] for k in keys]).to(torch.float32)
    flat = reduce(flat) if reduce is not None else flat
    return {k: (v.sqrt() if k.endswith(("norm", "bound")) else v) for k, v in zip(keys, flat)}


def _bn_in_training(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)


def _bn_terms(name: str, bn: nn.Module, x: Tensor, gy: Tensor, gx: Tensor) -> dict[str, Tensor]:
    """Thm 4.1's observable terms, per channel (dim 1), in float64; squared norms stay squared."""
    dims = [0, *range(2, x.dim())]
    x, gy = x.double(), gy.double()
    m = x.numel() // x.shape[1]
    sigma = (x.var(dims, correction=0) + float(bn.eps)).sqrt()  # type: ignore[arg-type]  # BatchNorm's eps is a float
    shape = [1, -1] + [1] * (x.dim() - 2)
    yhat = (x - x.mean(dims, keepdim=True)) / sigma.view(shape)
    weight = bn.weight
    gamma = weight.detach().double() if isinstance(weight, Tensor) else torch.ones_like(sigma)
    inner = gy.pow(2).sum(dims) - gy.sum(dims).pow(2) / m - (gy * yhat).sum(dims).pow(2) / m
    return {
        gradact_key(name, "input_norm"): gx.double().pow(2).sum(),
        gradact_key(name, "bound"): (gamma.pow(2) / sigma.pow(2) * inner).sum(),
        gradact_key(name, "gamma"): gamma.abs().mean(),
        gradact_key(name, "sigma"): sigma.mean(),
    }


# --- effective learning rate ----------------------------------------------------------------
def scale_invariant_layers(module: nn.Module, batch: Any, *, loss_fn: LossFn | None = None) -> list[str]:
    """Conv/Linear layers (module names) whose output is the input of a normalization layer.

    Read off one side-effect-free forward (``measurement_forward``): a layer counts when the tensor
    it returns is the very tensor a normalization module (``NORM_TYPES``, or a class named ``*Norm``)
    receives. Such a weight is scale invariant when the norm is BatchNorm in training mode.
    """
    outputs: dict[int, str] = {}
    found: list[str] = []

    def out_hook(name: str) -> Callable[..., None]:
        return lambda m, args, out: outputs.__setitem__(id(out), name) if isinstance(out, Tensor) else None

    def norm_hook(m: nn.Module, args: tuple[Any, ...]) -> None:
        name = outputs.get(id(args[0])) if args else None
        if name is not None and name not in found:
            found.append(name)

    handles = []
    for name, m in module.named_modules():
        if isinstance(m, WEIGHT_LAYER_TYPES) and isinstance(getattr(m, "weight", None), nn.Parameter):
            handles.append(m.register_forward_hook(out_hook(name)))
        elif name and is_norm(m):
            handles.append(m.register_forward_pre_hook(norm_hook))
    try:
        measurement_forward(module, batch, loss_fn=loss_fn)
    finally:
        for h in handles:
            h.remove()
    return found


def effective_lr(
    before: Mapping[str, Tensor], after: Mapping[str, Tensor], lrs: Mapping[str, float]
) -> dict[str, Tensor]:
    """‖W‖₂, η/‖W‖² and the angle ∠(W^t, W^{t+1}) per layer (PROTOCOL §12).

    Args:
        before: layer name -> W^t. after: layer name -> W^{t+1}. lrs: layer name -> η of its group.

    Returns:
        ``efflr/<layer>/norm`` (‖W^t‖), ``efflr/<layer>/lr`` (η/‖W^t‖²), ``efflr/<layer>/angle``
        (radians): arccos(⟨a, b⟩/(‖a‖‖b‖)), computed as 2·atan2(‖â − b̂‖, ‖â + b̂‖), the same angle
        without arccos's loss of digits near 0.
    """
    out: dict[str, Tensor] = {}
    for name, w in before.items():
        a, b = w.detach().reshape(-1), after[name].detach().reshape(-1)
        na, nb = math.sqrt(dot({name: a}, {name: a})), math.sqrt(dot({name: b}, {name: b}))
        out[efflr_key(name, "norm")] = torch.tensor(na, dtype=torch.float32)
        out[efflr_key(name, "lr")] = torch.tensor(lrs[name] / na**2 if na > 0 else float("nan"), dtype=torch.float32)
        angle = 2.0 * math.atan2(*_unit_distances(a, b, na, nb)) if na > 0 and nb > 0 else float("nan")
        out[efflr_key(name, "angle")] = torch.tensor(angle, dtype=torch.float32)
    return out


def _unit_distances(a: Tensor, b: Tensor, na: float, nb: float) -> tuple[float, float]:
    """‖â − b̂‖ and ‖â + b̂‖ (â = a/‖a‖) in float64, slice by slice: the float64 copies of a whole layer's weights
    cost about 2 training steps per measurement on ResNet-18."""
    minus = torch.zeros((), dtype=torch.float64, device=a.device)
    plus = torch.zeros((), dtype=torch.float64, device=a.device)
    for s in range(0, a.numel(), CHUNK):
        u, v = a[s : s + CHUNK].double() / na, b[s : s + CHUNK].double() / nb
        minus += (u - v).pow(2).sum()
        plus += (u + v).pow(2).sum()
    return math.sqrt(float(minus)), math.sqrt(float(plus))


def group_lrs(optimizer: Any, module: nn.Module, layers: Sequence[str]) -> dict[str, float]:
    """η of the parameter group holding each layer's weight (NaN when no group holds it)."""
    opt = torch_optimizer(optimizer)
    lr_of = {id(p): float(g["lr"]) for g in opt.param_groups for p in g["params"]}
    return {name: lr_of.get(id(module.get_submodule(name).weight), math.nan) for name in layers}
