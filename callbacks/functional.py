"""Pure measurement functions (PROTOCOL §1–3); the Callback classes are thin shells over them.

Every function here:

- calls the module's loss through ``torch.func.functional_call``, so the module's own
  parameters and buffers are never written: parameters are passed as float32 copies and
  buffers as clones (a train-mode BatchNorm updates the clone, not the module);
- runs in float32, outside autocast, with TF32 off, whatever precision training uses;
- differentiates with ``torch.autograd.grad`` / ``torch.func.grad`` (never ``.backward()``),
  so no ``.grad`` is touched;
- replays the torch RNG state before every pass, so every pass draws the same random
  numbers: noisy BatchNorm's noise and dropout masks are identical between G and G'
  (and between the landscape's step sizes), and the RNG is rewound afterwards;
- leaves normalization layers in whatever mode the module is in (training mode during
  training, as PROTOCOL §1 asks).

The module contract: ``getattr(module, loss_method)(batch)`` returns the scalar training
objective on ``batch`` computed with the module's current parameters (through its
submodules, so ``functional_call`` can substitute them). Nothing else is required.

Batched evaluation: the k ICS configurations (or the grid of step sizes) are evaluated
either with ``torch.func.vmap`` over stacked parameters (``mode="vmap"``; random draws
made with ``randomness="same"``, BatchNorm buffers stacked per member) or one after
another (``mode="loop"``). ``mode="auto"`` uses vmap unless the measured model contains
convolutions (where vmap becomes a grouped convolution, measured slower on CPU in
``bench/measure.py``), and falls back to the loop, with one warning, when vmap fails on
an unusual module. ``chunk_size`` bounds how many members are evaluated at once.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from bnlightning.callbacks.guard import RngState

__all__ = [
    "ACTIVATION_KINDS",
    "WEIGHT_LAYER_TYPES",
    "activation_stats",
    "check_chunk_size",
    "check_mode",
    "exact_float32",
    "internal_covariate_shift",
    "loss_landscape",
    "measurement_forward",
    "optimizer_update",
    "resolve_layers",
    "sgd_update",
    "StepGradient",
    "step_gradient",
    "weight_layer_names",
]

Mode = Literal["auto", "vmap", "loop"]
MODES: tuple[str, ...] = ("auto", "vmap", "loop")
IcsMode = Literal["auto", "vmap", "loop", "prefix"]
ICS_MODES: tuple[str, ...] = (*MODES, "prefix")

#: Modules whose ``weight`` is a "layer" by default (PROTOCOL §1): every Conv and Linear.
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_CONV_TYPES = WEIGHT_LAYER_TYPES[1:]

#: How ``activation_stats`` reads an activation module's input: ``saturating`` units
#: (tanh/sigmoid family) get a saturated share, ``relu`` units a dead share.
ACTIVATION_KINDS: dict[type[nn.Module], str] = {
    nn.Sigmoid: "saturating",
    nn.Tanh: "saturating",
    nn.Hardtanh: "saturating",
    nn.Hardsigmoid: "saturating",
    nn.Softsign: "saturating",
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.LeakyReLU: "none",
    nn.PReLU: "none",
    nn.ELU: "none",
    nn.SELU: "none",
    nn.CELU: "none",
    nn.GELU: "none",
    nn.SiLU: "none",
    nn.Mish: "none",
    nn.Softplus: "none",
}

UpdateFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Mapping[str, Tensor]]


# --- numerics ------------------------------------------------------------------------
@contextlib.contextmanager
def exact_float32(device_type: str = "cpu") -> Iterator[None]:
    """Autocast off (for ``device_type`` and CPU), TF32 off, gradients on; restored after."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
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


def _to_float32(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.float() if t.is_floating_point() else t)


def _device_type(module: nn.Module) -> str:
    p = next(module.parameters(), None)
    return p.device.type if p is not None else "cpu"


# --- calling the module's loss with substituted tensors --------------------------------
class _LossCall(nn.Module):
    """Exposes ``module.<loss_method>(batch)`` as ``forward`` so ``functional_call`` can run it."""

    def __init__(self, module: nn.Module, loss_method: str) -> None:
        super().__init__()
        self.m = module
        self.loss_method = loss_method

    def forward(self, batch: Any) -> Tensor:
        return getattr(self.m, self.loss_method)(batch)


def check_loss_method(module: nn.Module, loss_method: str) -> None:
    """Raise a clear error when ``module`` does not offer ``loss_method(batch)``."""
    if not callable(getattr(module, loss_method, None)):
        raise AttributeError(
            f"{type(module).__name__} has no method {loss_method!r}. The measurement callbacks need the module to define "
            f"`{loss_method}(batch) -> Tensor`: the scalar training loss on `batch` computed with the module's current "
            f"parameters. Add such a method, or pass `loss_method=` the name of one it has."
        )


class _Model:
    """A module's tensors as float32 copies, and a loss callable taking substitutes."""

    def __init__(self, module: nn.Module, loss_method: str) -> None:
        check_loss_method(module, loss_method)
        self.module = module
        self.call = _LossCall(module, loss_method)
        self.params = {n: p for n, p in module.named_parameters()}
        self.values = {n: p.detach().to(torch.float32) for n, p in self.params.items()}
        self.trainable = [n for n, p in self.params.items() if p.requires_grad]
        self.buffers = {n: b for n, b in module.named_buffers()}

    def fresh_buffers(self, n: int | None = None) -> dict[str, Tensor]:
        """Clones of the buffers (float ones in float32); stacked ``n`` times for vmap."""
        out = {}
        for name, b in self.buffers.items():
            b = b.detach()
            b = b.to(torch.float32) if b.is_floating_point() else b
            out[name] = b.clone() if n is None else torch.stack([b] * n)
        return out

    def loss(self, tensors: Mapping[str, Tensor], batch: Any) -> Tensor:
        out = functional_call(self.call, {f"m.{k}": v for k, v in tensors.items()}, (batch,), strict=False)
        if not isinstance(out, Tensor) or out.numel() != 1:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{self.call.loss_method}(batch) must return a scalar tensor, got {shape}")
        return out.reshape(())

    def gradient(self, names: Sequence[str], batch: Any, rng: RngState, overrides: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and its gradient w.r.t. ``names`` at the current values (with ``overrides``)."""
        rng.restore()
        tensors = {**self.values, **(overrides or {}), **self.fresh_buffers()}
        leaves = {n: tensors[n].detach().requires_grad_(True) for n in names}
        tensors.update(leaves)
        loss = self.loss(tensors, batch)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return loss.detach(), {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}

    def has_conv(self) -> bool:
        return any(isinstance(m, _CONV_TYPES) for m in self.module.modules())


def check_mode(mode: str, modes: Sequence[str] = MODES) -> None:
    """One clear error for a batching mode not in ``modes``."""
    if mode not in modes:
        raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(modes)}")


def _resolve_mode(mode: str, model: _Model, modes: Sequence[str] = MODES) -> str:
    check_mode(mode, modes)
    if mode == "auto":
        if not model.has_conv():
            return "vmap"
        return "prefix" if "prefix" in modes else "loop"
    return mode


_warned_fallback: set[str] = set()


def _vmap_or_loop(mode: str, what: str, batched: Callable[[], Any], looped: Callable[[], Any]) -> Any:
    """Run ``batched``; in ``auto`` mode fall back to ``looped`` (one warning) if vmap fails."""
    if mode == "loop":
        return looped()
    if mode == "vmap":
        return batched()
    try:
        return batched()
    except Exception as err:  # noqa: BLE001 - any vmap limitation: the loop computes the same numbers
        if what not in _warned_fallback:
            _warned_fallback.add(what)
            warnings.warn(f"{what}: torch.func.vmap failed on this module ({type(err).__name__}: {err}); using the per-member loop instead.", stacklevel=3)
        return looped()


def _chunks(n: int, size: int | None) -> list[range]:
    size = n if size is None else size
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def check_chunk_size(chunk_size: int | None) -> None:
    """One clear error for a chunk size that is neither None nor >= 1."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")


# --- layer selection -----------------------------------------------------------------
def weight_layer_names(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of every Conv/Linear submodule with a trainable weight."""
    return [n for n, m in module.named_modules() if isinstance(m, WEIGHT_LAYER_TYPES) and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.requires_grad]


def resolve_layers(module: nn.Module, layers: Sequence[str] | None, what: str = "layer") -> list[str]:
    """Check module names against ``module``; ``None`` means every Conv/Linear layer.

    Raises:
        ValueError: for a name that is not a submodule with a trainable ``weight``, listing the valid names.
    """
    valid = weight_layer_names(module)
    if layers is None:
        if not valid:
            raise ValueError(f"{type(module).__name__} has no Conv/Linear layer; pass the {what} names explicitly")
        return valid
    modules = dict(module.named_modules())
    with_weight = [n for n, m in modules.items() if n and isinstance(getattr(m, "weight", None), nn.Parameter)]
    for name in layers:
        m = modules.get(name)
        if m is None or not isinstance(getattr(m, "weight", None), nn.Parameter) or not m.weight.requires_grad:
            raise ValueError(f"unknown {what} {name!r}: not a submodule with a trainable weight. Valid names: {', '.join(with_weight)}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"duplicate {what} names in {list(layers)}")
    return list(layers)


@contextlib.contextmanager
def _forward_order(model: _Model, names: Sequence[str]) -> Iterator[list[str]]:
    """Records, during the passes run inside it, ``names`` in the order their modules first run.

    The list yielded is filled in place; after the block, names that never ran are
    appended last (nothing depends on them).
    """
    modules = dict(model.module.named_modules())
    seen: list[str] = []
    handles = [modules[n].register_forward_pre_hook(lambda _m, _i, n=n: seen.append(n) if n not in seen else None) for n in names]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
    seen.extend(n for n in names if n not in seen)


def _weight_modules(module: nn.Module) -> list[str]:
    """Every submodule (name relative to ``module``) whose ``weight`` is a parameter: a superset of
    the layers ``internal_covariate_shift`` may update or measure."""
    return [n for n, m in module.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)]


class StepGradient(NamedTuple):
    """The float32 gradient of ``loss_method(batch)`` over every trainable parameter, at the current
    parameters, with the RNG state of the moment it was taken (see ``step_gradient``).

    Attributes:
        grads: parameter name -> gradient (zeros for a trainable parameter the loss does not use).
        order: names of the submodules with a ``weight`` parameter that ran during that pass, in
            the order they first ran (the forward order ``internal_covariate_shift`` needs).
    """

    grads: dict[str, Tensor]
    order: list[str]


def step_gradient(module: nn.Module, batch: Any, *, loss_method: str = "loss") -> StepGradient:
    """G: the first pass that both ``internal_covariate_shift`` and ``loss_landscape`` make.

    Computed exactly as each of them computes its own ``G``/``g`` (float32 copies of the
    parameters, cloned buffers, float32 batch, ``exact_float32``, the RNG replayed from its
    state now and rewound afterwards); the forward pre-hooks that record ``order`` only
    append names, so they change no number. Pass the result as ``gradient=`` to either
    function, on the same module, batch and state, to skip that pass; nothing is changed.
    """
    model = _Model(module, loss_method)
    rng = RngState.capture()
    try:
        with exact_float32(_device_type(module)):
            with _forward_order(model, _weight_modules(module)) as order:
                _, G = model.gradient(model.trainable, _to_float32(batch), rng)
                ran = list(order)  # before the block appends the modules that never ran
            return StepGradient(G, ran)
    finally:
        rng.restore()


def _check_gradient(model: _Model, gradient: StepGradient) -> None:
    missing = [n for n in model.trainable if n not in gradient.grads]
    if missing:
        raise ValueError(f"gradient= lacks trainable parameter {missing[0]!r}; pass step_gradient(module, batch) of this module")


# --- optimizer updates ---------------------------------------------------------------
def sgd_update(lr: float, weight_decay: float = 0.0) -> UpdateFn:
    """The plain SGD step ``W - lr * (G + weight_decay * W)`` as an ``update`` for ``internal_covariate_shift``."""

    def update(weights: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: w - lr * (grads[n] + weight_decay * w if weight_decay else grads[n]) for n, w in weights.items()}

    return update


def _is_plain_sgd(opt: torch.optim.Optimizer) -> bool:
    return type(opt) is torch.optim.SGD and all(g.get("momentum", 0) == 0 and not g.get("maximize", False) for g in opt.param_groups)


def optimizer_update(
    optimizer: torch.optim.Optimizer, module: nn.Module, weights: Mapping[str, Tensor], grads: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The values the optimizer's next step would give the parameters named in ``weights``.

    For plain SGD (no momentum) this is ``W - lr * (G + weight_decay * W)`` with each
    parameter's group hyper-parameters. For any other optimizer, a *shadow* optimizer of
    the same class and hyper-parameters is built over float32 clones of every parameter
    it holds, given a deep copy of the real optimizer's state and ``grads`` (missing
    names: the parameter's current ``.grad``; parameters with neither are not stepped),
    and stepped once; the real optimizer, its state and the module are not touched.
    Stepping all its parameters keeps optimizers that couple parameters (LARS-style
    trust ratios) right. Optimizers whose ``step`` needs a closure (LBFGS) are refused.

    Args:
        optimizer: a torch optimizer (or Lightning's wrapper) over ``module``'s parameters.
        module: the module whose parameter names key ``weights`` and ``grads``.
        weights: name -> current value of the parameters whose update is wanted.
        grads: name -> gradient to step with.
    """
    opt = getattr(optimizer, "_optimizer", optimizer)
    params = dict(module.named_parameters())
    name_of = {id(p): n for n, p in params.items()}
    if _is_plain_sgd(opt):
        out = {}
        for group in opt.param_groups:
            lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
            for p in group["params"]:
                n = name_of.get(id(p))
                if n in weights and n in grads:
                    w, g = weights[n], grads[n]
                    out[n] = w.add(g.add(w, alpha=wd) if wd else g, alpha=-lr)
        return {n: out.get(n, w) for n, w in weights.items()}
    shadow: dict[str, Tensor] = {}
    groups = []
    for group in opt.param_groups:
        members = []
        for p in group["params"]:
            n = name_of.get(id(p))
            if n is None:
                continue
            g = grads.get(n, p.grad)
            s = (weights[n] if n in weights else p).detach().to(torch.float32).clone()
            if g is not None:
                s.grad = g.detach().to(torch.float32).clone()
            state = copy.deepcopy(opt.state.get(p, {}))
            shadow[n] = s
            members.append((s, state))
        groups.append(({k: v for k, v in group.items() if k != "params"}, members))
    try:
        twin = type(opt)([{**hyper, "params": [s for s, _ in members]} for hyper, members in groups if members], **opt.defaults)
    except Exception as err:  # noqa: BLE001
        raise TypeError(f"cannot build a shadow copy of {type(opt).__name__} to compute W^(t+1) ({err}); pass update= a function instead") from err
    for _, members in groups:
        for s, state in members:
            if state:
                twin.state[s] = {k: (v.to(torch.float32) if isinstance(v, Tensor) and v.is_floating_point() and k != "step" else v) for k, v in state.items()}
    try:
        twin.step()
    except TypeError as err:
        raise TypeError(f"{type(opt).__name__}.step needs a closure; pass update= a function instead") from err
    return {n: shadow[n].detach() if n in shadow else w for n, w in weights.items()}


# --- §1 internal covariate shift ------------------------------------------------------
def _ics_metrics(layer: str, g: Tensor, g2: Tensor) -> dict[str, Tensor]:
    g, g2 = g.flatten(), g2.flatten()
    l2 = torch.linalg.vector_norm(g - g2)
    norm_g = torch.linalg.vector_norm(g)
    cos = torch.dot(g, g2) / (norm_g * torch.linalg.vector_norm(g2))
    return {f"ics/l2/{layer}": l2, f"ics/cos/{layer}": cos, f"ics/rel/{layer}": l2 / norm_g}


def _sequential_cut(module: nn.Module, layers: Sequence[str]) -> tuple[nn.Sequential, dict[str, int]] | None:
    """The plain ``nn.Sequential`` whose direct children separate the most of ``layers``.

    Returns it and, for each of ``layers`` inside it, the index of the child holding it;
    ``None`` when no ``nn.Sequential`` (with ``nn.Sequential.forward``, uncompiled,
    distinct children) holds any of ``layers``.
    """
    best: tuple[int, nn.Sequential, dict[str, int]] | None = None
    for sname, seq in module.named_modules():
        if type(seq).forward is not nn.Sequential.forward or "forward" in vars(seq) or getattr(seq, "_compiled_call_impl", None) is not None:
            continue
        children = list(seq._modules.items())
        if any(c is None for _, c in children) or len({id(c) for _, c in children}) != len(children):
            continue
        prefix = f"{sname}." if sname else ""
        child_of: dict[str, int] = {}
        for layer in layers:
            for k, (cname, _) in enumerate(children):
                full = prefix + cname
                if layer == full or layer.startswith(full + "."):
                    child_of[layer] = k
                    break
        score = len(set(child_of.values()))
        if score and (best is None or score > best[0]):
            best = (score, seq, child_of)
    return None if best is None else best[1:]


def _reached_leaves(fn: Any, visited: set[Any]) -> set[int]:
    """``id``s of the autograd leaves reachable from ``fn`` through nodes not yet in ``visited``."""
    out: set[int] = set()
    stack = [fn] if fn is not None else []
    while stack:
        f = stack.pop()
        if f in visited:
            continue
        visited.add(f)
        var = getattr(f, "variable", None)
        if isinstance(var, Tensor):
            out.add(id(var))
        stack.extend(nf for nf, _ in f.next_functions if nf is not None)
    return out


_warned_prefix: set[str] = set()


def _prefix_suffix(
    model: _Model,
    batch: Any,
    rng: RngState,
    order: Sequence[str],
    pos: Mapping[str, int],
    wname: Mapping[str, str],
    shifted: Sequence[str],
    config: Callable[[str | None], dict[str, Tensor]],
    *,
    warn: bool,
) -> dict[str, Tensor]:
    """G'_i of each ``shifted`` layer, reusing the updated prefix of a sequential network.

    Configuration i (PROTOCOL §1) has the layers before i at W^(t+1) and layer i and later
    ones at W^t. In a network run through an ``nn.Sequential`` S, let child k of S hold
    layer i: the input x_k that S's children 0..k-1 hand to child k does not depend on
    layer i or any later layer, so it is the same in configuration i and in
    configuration ``last`` (the shifted layer that runs last), whose earlier layers are
    updated too. One full pass of configuration ``last`` therefore gives G'_last and,
    cached (cloned, with the RNG state at that point), every x_k; then G'_i needs only
    the rest of the loss with S started at child k on x_k (S's ``forward`` is replaced
    for that one call; the code around S runs as usual, from the same RNG state).

    It is used only where it provably gives the full pass's numbers: S called once per
    loss, its children once each and in order, each with one tensor argument; and x_k
    must not depend, through autograd, on the weight of layer i or any layer after it
    (checked on the graph of the ``last`` pass, whose every layer weight is a leaf).
    Any layer for which a condition fails gets a full pass (``Model.gradient``), as in
    ``mode="loop"``.
    """
    out: dict[str, Tensor] = {}
    if not shifted:
        return out
    last = max(shifted, key=pos.__getitem__)
    cut = _sequential_cut(model.module, [m for m in shifted if m != last])
    seq, child_of = cut if cut is not None else (None, {})
    children = list(seq) if seq is not None else []
    needed = sorted(set(child_of.values()))
    cache: dict[int, tuple[Tensor, Any, RngState]] = {}
    seen: list[int] = []
    seq_calls = [0]
    bad = [False]

    def seq_hook(_m: nn.Module, _args: Any, _kwargs: Any) -> None:
        seq_calls[0] += 1

    def child_hook(k: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.append(k)
            if k in child_of.values() and k not in cache:
                if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
                    bad[0] = True
                    return
                cache[k] = (args[0].detach().clone(), args[0].grad_fn, RngState.capture())  # clone: in-place ops follow

        return hook

    # the full pass of configuration `last`, every layer weight a leaf (for the dependency check)
    handles = []
    if seq is not None:
        handles.append(seq.register_forward_pre_hook(seq_hook, with_kwargs=True))
        handles += [c.register_forward_pre_hook(child_hook(k), with_kwargs=True) for k, c in enumerate(children)]
    try:
        rng.restore()
        tensors = {**model.values, **config(last), **model.fresh_buffers()}
        leaves = {wname[u]: tensors[wname[u]].detach().requires_grad_(True) for u in order}
        tensors.update(leaves)
        loss = model.loss(tensors, batch)
    finally:
        for h in handles:
            h.remove()
    usable: set[str] = set()
    if seq is not None and not bad[0] and seq_calls[0] == 1 and seen == list(range(len(children))):
        layer_of = {id(leaves[wname[u]]): u for u in order}
        visited: set[Any] = set()
        reached: set[int] = set()
        for k in needed:
            if k not in cache:
                continue
            reached |= _reached_leaves(cache[k][1], visited)  # everything x_0..x_k depend on
            deps = [pos[layer_of[i]] for i in reached if i in layer_of]
            first = max(deps, default=-1)
            usable.update(m for m, mk in child_of.items() if mk == k and first < pos[m])
    (g_last,) = torch.autograd.grad(loss, [leaves[wname[last]]], allow_unused=True)
    out[last] = torch.zeros_like(leaves[wname[last]]) if g_last is None else g_last
    del loss, leaves, tensors
    rest = [m for m in shifted if m != last]
    if warn and len(usable) < len(rest):
        key = type(model.module).__name__
        if key not in _warned_prefix:
            _warned_prefix.add(key)
            warnings.warn(
                f"internal_covariate_shift(mode='prefix'): {len(rest) - len(usable)} of {len(rest)} layers of {key} are not inside an "
                f"nn.Sequential whose earlier children provably give them their input; they get a full pass (as mode='loop').",
                stacklevel=3,
            )
    uses = {k: sum(1 for m in rest if m in usable and child_of[m] == k) for k in needed}
    for layer in sorted(rest, key=pos.__getitem__):
        wn = wname[layer]
        if layer not in usable:
            _, g = model.gradient([wn], batch, rng, overrides=config(layer))
            out[layer] = g[wn]
            continue
        k = child_of[layer]
        x_k, _, rng_k = cache[k]
        uses[k] -= 1
        if uses[k]:
            x_k = x_k.clone()  # a child may modify its input in place
        else:
            del cache[k]
        tail = children[k:]

        def forward(*_args: Any, _x: Tensor = x_k, _rng: RngState = rng_k, _tail: list[nn.Module] = tail, **_kwargs: Any) -> Tensor:
            _rng.restore()  # the draws children k.. made in the full pass
            x = _x
            for c in _tail:
                x = c(x)
            return x

        rng.restore()
        tensors = {**model.values, **config(layer), **model.fresh_buffers()}
        leaf = tensors[wn].detach().requires_grad_(True)
        tensors[wn] = leaf
        seq.forward = forward  # type: ignore[union-attr, method-assign]
        try:
            loss = model.loss(tensors, batch)
        finally:
            del seq.forward  # type: ignore[union-attr]
        (g,) = torch.autograd.grad(loss, [leaf], allow_unused=True)
        out[layer] = torch.zeros_like(leaf) if g is None else g
    return out


def internal_covariate_shift(
    module: nn.Module,
    batch: Any,
    update: torch.optim.Optimizer | UpdateFn,
    layers: Sequence[str] | None = None,
    *,
    loss_method: str = "loss",
    step_grads: Mapping[str, Tensor] | None = None,
    mode: IcsMode = "auto",
    chunk_size: int | None = None,
    gradient: StepGradient | None = None,
) -> dict[str, Tensor]:
    """Internal covariate shift (PROTOCOL §1, the paper's Definition 2.1) of each layer.

    ``G_i`` is the gradient w.r.t. layer i's weight at the current parameters;
    ``G'_i`` the same gradient after the update ``W^(t+1)`` is applied to the weights of
    the layers that run *before* layer i only (the order is that of a forward pass).
    "Layers" that get updated are every Conv/Linear weight plus the measured ones;
    everything else (biases, norm gamma/beta, layer i and later) keeps its current value.
    Same batch, same random draws (noise, dropout), modules in their current mode, buffers
    (BatchNorm running statistics) untouched.

    Args:
        module: any module with ``loss_method(batch)``; names are relative to it.
        batch: the batch both gradients are taken on.
        update: the torch optimizer whose next step gives ``W^(t+1)`` (see
            ``optimizer_update``), or a function ``(weights, grads) -> new weights`` such
            as ``sgd_update(lr)``.
        layers: module names to measure (default: every Conv/Linear layer).
        loss_method: the module's method returning the scalar loss on a batch.
        step_grads: name -> gradient the update uses (e.g. the trainer's accumulated
            ``.grad``); default: the measured float32 gradient ``G``.
        mode: ``vmap``, ``loop``, ``prefix`` or ``auto`` (see the module docstring):
            ``prefix`` reuses the inputs that the updated layers give each configuration
            (see ``_prefix_suffix``) and falls back to ``loop`` where that is not provably
            exact; ``auto`` is ``prefix`` for networks with convolutions, else ``vmap``.
        chunk_size: at most this many configurations per vmap call (bounds memory).
        gradient: ``step_gradient(module, batch, loss_method=...)`` taken on this module, batch
            and RNG state; it is used as ``G`` (and its forward order) instead of recomputing it
            -- the same numbers, one pass fewer (``LossLandscape`` shares it on the same step).

    Returns:
        ``{"ics/l2/<layer>": ||G-G'||_2, "ics/cos/<layer>": cos(G, G'), "ics/rel/<layer>": ||G-G'||_2/||G||_2}``,
        0-dim float32 tensors (NaN when a gradient is NaN or zero).
    """
    check_chunk_size(chunk_size)
    measured = resolve_layers(module, layers)
    model = _Model(module, loss_method)
    requested, mode = mode, _resolve_mode(mode, model, ICS_MODES)
    batch = _to_float32(batch)
    rng = RngState.capture()
    try:
        with exact_float32(_device_type(module)):
            updated = list(dict.fromkeys(weight_layer_names(module) + measured))
            if gradient is None:
                with _forward_order(model, updated) as order:  # recorded during G's own forward pass
                    _, G = model.gradient(model.trainable, batch, rng)
            else:  # the same pass, made once by step_gradient; its order filtered to `updated`
                _check_gradient(model, gradient)
                G = {n: gradient.grads[n] for n in model.trainable}
                wanted, ran = set(updated), set(gradient.order)
                order = [n for n in gradient.order if n in wanted] + [n for n in updated if n not in ran]
            wname = {n: f"{n}.weight" if n else "weight" for n in order}
            pos = {n: i for i, n in enumerate(order)}
            weights = {wname[n]: model.values[wname[n]] for n in order}
            grads_for_step = {**G, **(step_grads or {})}
            if isinstance(update, torch.optim.Optimizer) or hasattr(update, "_optimizer"):
                new = optimizer_update(update, module, weights, {n: grads_for_step[n] for n in grads_for_step if n in model.params})
            else:
                new = update(weights, {n: grads_for_step[n] for n in weights})
            new = {n: new[n].detach().to(torch.float32) for n in weights}
            measured = sorted(measured, key=pos.__getitem__)

            def config(layer: str | None) -> dict[str, Tensor]:
                # None is the unshifted configuration W^t (gives G on the same code path as G')
                return {wname[u]: (new if layer is not None and pos[u] < pos[layer] else weights)[wname[u]] for u in order}

            def looped() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
                out = {}
                for layer in measured:
                    if not any(pos[u] < pos[layer] for u in order):
                        out[layer] = G[wname[layer]]  # nothing runs before it: G' is G exactly
                        continue
                    _, g = model.gradient([wname[layer]], batch, rng, overrides=config(layer))
                    out[layer] = g[wname[layer]]
                return {layer: G[wname[layer]] for layer in measured}, out

            rest = dict(model.values)

            def batched() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
                # Member None (W^t) rides along in the first chunk, so that G and G' share one
                # computation path and their difference carries no batched-vs-unbatched rounding.
                # Layers with nothing before them are not members: their G' is G exactly.
                shifted = [m for m in measured if any(pos[u] < pos[m] for u in order)]
                members_all: list[str | None] = [None] + shifted if shifted else []
                base, out = {}, {}
                for chunk in _chunks(len(members_all), chunk_size):
                    members = [members_all[i] for i in chunk]
                    targets = shifted if None in members else [m for m in members if m is not None]
                    last = max(pos[m] for m in targets)
                    batched_w = [wname[u] for u in order if pos[u] <= last]  # later weights are shared
                    configs = [config(m) for m in members]
                    stacked = {w: torch.stack([c[w] for c in configs]) for w in batched_w}
                    want = {wname[m] for m in targets}
                    diff = {w: v for w, v in stacked.items() if w in want}
                    fixed = {w: v for w, v in stacked.items() if w not in want}

                    def f(ws: dict[str, Tensor], fixed_ws: dict[str, Tensor], bufs: dict[str, Tensor]) -> Tensor:
                        return model.loss({**rest, **fixed_ws, **ws, **bufs}, batch)

                    rng.restore()
                    gs = vmap(grad(f), in_dims=(0, 0, 0), randomness="same")(diff, fixed, model.fresh_buffers(len(members)))
                    for j, m in enumerate(members):
                        if m is None:
                            base = {layer: gs[wname[layer]][j] for layer in shifted}
                        else:
                            out[m] = gs[wname[m]][j]
                for layer in measured:
                    if layer not in out:
                        base[layer] = out[layer] = G[wname[layer]]
                return base, out

            def prefixed() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
                shifted = [m for m in measured if any(pos[u] < pos[m] for u in order)]
                out = _prefix_suffix(model, batch, rng, order, pos, wname, shifted, config, warn=requested == "prefix")
                for layer in measured:
                    out.setdefault(layer, G[wname[layer]])
                return {layer: G[wname[layer]] for layer in measured}, out

            if mode == "prefix":
                G1, G2 = prefixed()
            else:
                G1, G2 = _vmap_or_loop(mode, "internal_covariate_shift", batched, looped)
            result: dict[str, Tensor] = {}
            for layer in measured:
                result.update(_ics_metrics(layer, G1[layer], G2[layer]))
            return result
    finally:
        rng.restore()


# --- §2 loss landscape ----------------------------------------------------------------
def loss_landscape(
    module: nn.Module,
    batch: Any,
    step_sizes: Sequence[float],
    *,
    loss_method: str = "loss",
    param_scale: Mapping[str, float] | None = None,
    mode: Mode = "auto",
    chunk_size: int | None = None,
    gradient: StepGradient | None = None,
) -> dict[str, Tensor]:
    """Loss and gradient along the descent direction (PROTOCOL §2, the paper's Fig. 4).

    With ``g = grad L(w)`` over every trainable parameter, evaluates the loss and the
    gradient at ``w - s * g`` for each ``s`` in ``step_sizes`` (same batch, same random
    draws, modules in their current mode, buffers untouched).

    Args:
        module: any module with ``loss_method(batch)``.
        batch: the batch.
        step_sizes: positive step sizes ``s`` (absolute).
        loss_method: the module's method returning the scalar loss on a batch.
        param_scale: optional name -> multiplier of ``s`` for that parameter (per-group
            learning rates); the displacement is then ``s * scale_p * g_p``.
        mode, chunk_size: as in ``internal_covariate_shift`` (members are step sizes).
        gradient: ``step_gradient(module, batch, loss_method=...)`` taken on this module, batch
            and RNG state, used as ``g`` instead of recomputing it (same numbers, one pass fewer).

    Returns:
        ``landscape/loss_min``, ``landscape/loss_max`` (over the grid),
        ``landscape/grad_l2_max`` = max_s ||g - g_s||_2 and ``landscape/beta_eff`` =
        max_s ||g - g_s||_2 / ||displacement_s||_2, as 0-dim float32 tensors (NaN propagates).
    """
    steps = [float(s) for s in step_sizes]
    if not steps:
        raise ValueError("step_sizes must not be empty")
    bad = [s for s in steps if not s > 0 or math.isinf(s)]
    if bad:
        raise ValueError(f"step sizes must be positive and finite, got {bad[0]} in {steps}")
    check_chunk_size(chunk_size)
    model = _Model(module, loss_method)
    mode = _resolve_mode(mode, model)
    batch = _to_float32(batch)
    scale = dict(param_scale or {})
    rng = RngState.capture()
    try:
        with exact_float32(_device_type(module)):
            names = model.trainable
            if gradient is None:
                _, g = model.gradient(names, batch, rng)
            else:
                _check_gradient(model, gradient)
                g = {n: gradient.grads[n] for n in names}
            direction = {n: g[n] * scale.get(n, 1.0) for n in names}
            disp_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in direction.values()]))

            def point(s: float) -> dict[str, Tensor]:
                return {n: model.values[n] - s * direction[n] for n in names}

            def looped() -> tuple[Tensor, Tensor]:
                losses, grads = [], []
                for s in steps:
                    loss_s, g_s = model.gradient(names, batch, rng, overrides=point(s))
                    losses.append(loss_s)
                    grads.append(torch.stack([(g[n] - g_s[n]).pow(2).sum() for n in names]).sum().sqrt())
                return torch.stack(losses), torch.stack(grads)

            def batched() -> tuple[Tensor, Tensor]:
                rest = {k: v for k, v in model.values.items() if k not in names}
                losses, diffs = [], []
                for chunk in _chunks(len(steps), chunk_size):
                    stacked = {n: torch.stack([model.values[n] - steps[i] * direction[n] for i in chunk]) for n in names}

                    def f(ws: dict[str, Tensor], bufs: dict[str, Tensor]) -> Tensor:
                        return model.loss({**rest, **ws, **bufs}, batch)

                    rng.restore()
                    gs, ls = vmap(grad_and_value(f), in_dims=(0, 0), randomness="same")(stacked, model.fresh_buffers(len(chunk)))
                    losses.append(ls)
                    diffs.append(torch.stack([(g[n] - gs[n]).pow(2).flatten(1).sum(1) for n in names]).sum(0).sqrt())
                return torch.cat(losses), torch.cat(diffs)

            losses, diffs = _vmap_or_loop(mode, "loss_landscape", batched, looped)
            ratios = diffs / (torch.tensor(steps, dtype=torch.float32, device=diffs.device) * disp_norm.to(diffs.device))
            return {
                "landscape/loss_min": _nanmin(losses),
                "landscape/loss_max": _nanmax(losses),
                "landscape/grad_l2_max": _nanmax(diffs),
                "landscape/beta_eff": _nanmax(ratios),
            }
    finally:
        rng.restore()


def _nanmax(t: Tensor) -> Tensor:
    """Max that returns NaN if any entry is NaN (a diverged point must show, not hide)."""
    return t.max()


def _nanmin(t: Tensor) -> Tensor:
    return t.min()


# --- §3 activation statistics ---------------------------------------------------------
def _quantiles(x: Tensor, qs: Sequence[float]) -> Tensor:
    """Linear-interpolation quantiles of all of ``x`` (as ``torch.quantile``, without its size limit).

    A full sort is kept on purpose: measured on this project's CPU (1 thread, 1M entries),
    ``torch.quantile`` takes ~29 ms, six ``torch.kthvalue`` calls (the two order statistics
    around each of three ranks) ~75 ms, and an exact sample-bracket selection 20-40 ms
    depending on ties -- no reliable gain for the exactness risk.
    """
    flat = x.detach().flatten().to(torch.float32)
    q = torch.tensor(list(qs), dtype=torch.float32, device=flat.device)
    if flat.numel() <= 2**24:
        return torch.quantile(flat, q)
    s = flat.sort().values
    pos = q * (s.numel() - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def activation_stats(
    x: Tensor,
    kind: Literal["saturating", "relu", "none"] = "none",
    *,
    saturation_threshold: float = 2.0,
    quantiles: Sequence[float] = (0.15, 0.5, 0.85),
) -> dict[str, Tensor]:
    """Distribution summary of a batch of pre-activations (PROTOCOL §3).

    Args:
        x: pre-activations, batch first: (N, features) or (N, C, H, W).
        kind: ``saturating`` adds ``saturated`` (share of entries with
            ``|x| > saturation_threshold``); ``relu`` adds ``dead`` (share of units that are
            never positive on the whole batch; a unit is one entry of ``x[0]``, i.e. a
            feature, or a (channel, row, column) position for images); ``none`` adds neither.
        saturation_threshold: the ``|x|`` above which a tanh/sigmoid unit counts as saturated.
        quantiles: quantile levels; keys are ``q<round(100*level)>``.

    Returns:
        ``{"q15", "q50", "q85", "mean", "std" (population, correction 0), ["saturated" | "dead"]}``
        as 0-dim float32 tensors.
    """
    if kind not in ("saturating", "relu", "none"):
        raise ValueError(f"unknown kind {kind!r}; accepted: saturating, relu, none")
    x = x.detach().to(torch.float32)
    out = {f"q{round(100 * q)}": v for q, v in zip(quantiles, _quantiles(x, quantiles))}
    out["mean"] = x.mean()
    out["std"] = x.std(correction=0)
    if kind == "saturating":
        out["saturated"] = (x.abs() > saturation_threshold).float().mean()
    elif kind == "relu":
        out["dead"] = (~(x > 0).flatten(1).any(0)).float().mean()
    return out


def activation_kind(module: nn.Module) -> str:
    """``saturating``/``relu``/``none`` for an activation module; ``None``-like ``""`` for other modules."""
    for cls, kind in ACTIVATION_KINDS.items():
        if type(module) is cls:
            return kind
    return ""


def measurement_forward(module: nn.Module, batch: Any, *, loss_method: str = "loss") -> Tensor:
    """One float32, no-grad pass of ``loss_method(batch)`` that changes nothing.

    Parameters are float32 copies, buffers clones, the RNG is rewound afterwards, and it
    runs outside autocast with TF32 off. Forward hooks on the module's submodules fire,
    which is how ``ActivationStats`` reads pre-activations. Returns the loss.
    """
    model = _Model(module, loss_method)
    rng = RngState.capture()
    try:
        with exact_float32(_device_type(module)), torch.no_grad():
            return model.loss({**model.values, **model.fresh_buffers()}, _to_float32(batch))
    finally:
        rng.restore()
