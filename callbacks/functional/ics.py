"""Internal covariate shift (PROTOCOL §1, the paper's Definition 2.1) as a pure function.

``G_i`` is the gradient w.r.t. layer i's weight Parameter at W^t; ``G'_i`` the same gradient with
every updated Parameter whose *first use* in the forward pass comes before layer i's first use
replaced by its value W^(t+1): one *configuration* per measured layer. Updated Parameters are the
weights of every Conv/Linear layer plus the measured ones; everything else (biases, norm gamma/beta,
layer i itself, later layers) keeps its W^t value. A Parameter used in several places (weight tying,
a block registered under several names) is one unit: it is at W^t or at W^(t+1) everywhere, and its
gradient is the sum over its uses. Same batch, same random draws, modules in their current mode,
buffers (BatchNorm running statistics) untouched.

Three engines compute the G' of every configuration: the loop (one pass each), vmap (configurations
batched with ``torch.func.vmap``) and the prefix engine (``_prefix.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from bnlightning.callbacks.functional._batching import Engine, chunks, reduce_together, resolve_mode, run_members
from bnlightning.callbacks.functional._harness import LossHarness
from bnlightning.callbacks.functional._layers import layer_param, resolve_layers, weight_layer_names
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional._numerics import Reduce, float32, to_float32
from bnlightning.callbacks.functional._prefix import prefix_gradients
from bnlightning.callbacks.functional._updates import UpdateFn, optimizer_update
from bnlightning.callbacks.functional.gradient import StepGradient, check_gradient, gradient_pass
from bnlightning.callbacks.functional.names import ics_key

if TYPE_CHECKING:
    from bnlightning.callbacks.functional._state import RngState

IcsMode = Literal["auto", "vmap", "loop", "prefix"]
ICS_MODES: tuple[str, ...] = ("auto", "vmap", "loop", "prefix")


def _metrics(layer: str, g: Tensor, g2: Tensor) -> dict[str, Tensor]:
    g, g2 = g.flatten(), g2.flatten()
    l2 = torch.linalg.vector_norm(g - g2)
    norm_g = torch.linalg.vector_norm(g)
    cos = torch.dot(g, g2) / (norm_g * torch.linalg.vector_norm(g2))
    return {ics_key("l2", layer): l2, ics_key("cos", layer): cos, ics_key("rel", layer): l2 / norm_g}


def internal_covariate_shift(
    module: nn.Module,
    batch: Any,
    update: torch.optim.Optimizer | UpdateFn | None = None,
    layers: Sequence[str] | None = None,
    *,
    next_weights: Mapping[str, Tensor] | None = None,
    weights: Mapping[str, Tensor] | None = None,
    loss_fn: LossFn | None = None,
    step_grads: Mapping[str, Tensor] | None = None,
    mode: IcsMode = "auto",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    gradient: StepGradient | None = None,
    reduce: Reduce | None = None,
) -> dict[str, Tensor]:
    """Internal covariate shift of each layer: how much its gradient changes when earlier layers step.

    G_i, G'_i and the updated Parameters are those of the module docstring (PROTOCOL §1): G'_i has
    every updated Parameter first used before layer i at W^(t+1), everything else at W^t.

    Args:
        module: any module; names are relative to it.
        batch: the batch both gradients are taken on.
        update: how to get W^(t+1) when ``next_weights`` is not given: a torch optimizer (one step of a
            one-parameter copy per parameter, see ``optimizer_update``) or ``(weights, grads) -> new``
            such as ``sgd_update(lr)``.
        layers: module names to measure (default: every Conv/Linear layer).
        next_weights: canonical parameter name -> W^(t+1), e.g. the weights right after the real
            optimizer step (what the callback passes: exact for any optimizer, clipping, precision).
        weights: canonical name -> W^t when the module does not hold it any more (after the step).
        loss_fn: ``(module, batch) -> scalar loss`` or ``resolve_loss(module, ...)``'s result; ``None``:
            the module's ``loss(batch)`` method, else a LightningModule's ``training_step`` (``resolve_loss``).
        step_grads: name -> gradient ``update`` uses (default: the measured float32 ``G``).
        mode: ``loop`` (one pass per layer), ``vmap`` (configurations batched with ``torch.func.vmap``),
            ``prefix`` (one pass through the updated prefix, then each layer's suffix; a full pass where
            that is not provably exact) or ``auto``: ``prefix`` for networks with convolutions, else
            ``vmap`` in chunks that fit ``memory_budget``, else ``loop``.
        chunk_size: at most this many configurations per vmap call.
        memory_budget: bytes ``auto`` may use for batched members (default: half the free CUDA memory;
            on CPU twice the parameters' float32 size, at least 256 MiB).
        gradient: ``step_gradient(...)`` of this module, batch, weights and RNG state: used as ``G``.
        reduce: mean over ranks (DDP): applied to G and G' before any norm.

    Returns:
        ``{"ics/l2/<layer>": ||G-G'||_2, "ics/cos/<layer>": cos(G, G'), "ics/rel/<layer>": ||G-G'||_2/||G||_2}``,
        0-dim float32 tensors (NaN when a gradient is NaN or zero).

    Raises:
        ValueError: an unknown layer, a bad mode or chunk size, neither ``update`` nor ``next_weights``.
    """
    if update is None and next_weights is None:
        raise ValueError(
            "internal_covariate_shift needs update= (an optimizer or update function) or next_weights= (W^(t+1))"
        )
    measured = resolve_layers(module, layers)
    model = LossHarness(module, loss_fn)
    if weights is not None:
        model.values.update({n: float32(w) for n, w in weights.items()})
    engine = resolve_mode(mode, model, ICS_MODES, chunk_size)
    own = {layer: layer_param(module, layer, model) for layer in measured}
    updated = list(
        dict.fromkeys([layer_param(module, m, model) for m in weight_layer_names(module)] + list(own.values()))
    )
    batch = to_float32(batch)
    with model.session() as rng:
        # G over every updated Parameter where the update is computed from it, else over the measured weights only
        names = (
            [n for n in model.trainable if n in updated]
            if next_weights is None and step_grads is None
            else list(own.values())
        )
        if gradient is None:
            gradient = gradient_pass(model, names, batch, rng, reduce)
        check_gradient(model, gradient, names)
        new = _next_weights(model, updated, gradient.grads, update, next_weights, step_grads)
        configs = Configurations(model, batch, rng, updated, own, _first_uses(model, gradient.order), new)
        found = _shifted_gradients(configs, engine, gradient, chunk_size, memory_budget, warn=mode == "prefix")
        return _metrics_of(configs, gradient.grads, found, reduce)


class ShiftedGradients(NamedTuple):
    """What an engine computes.

    Attributes:
        shifted: measured layer -> G'_i, for every layer of ``Configurations.shifted``.
        base: measured layer -> G_i computed beside the G' (the batched engine: G and G' then share
            one computation path, so their difference carries no batched-vs-unbatched rounding);
            empty where the first pass's G serves.
    """

    shifted: dict[str, Tensor]
    base: dict[str, Tensor]


@dataclass
class Configurations:
    """The configurations of one measurement (see the module docstring) and what every pass needs.

    Attributes:
        model: the module as the measurement sees it. batch: the float32 batch. rng: the RNG state
            every pass replays (the same random draws in every configuration).
        updated: canonical names of the Parameters a configuration may move.
        own: measured layer -> canonical name of its weight (in the order the layers were asked for).
        pos: canonical name -> index of its first use in the forward pass (inf: never used).
        new: canonical name -> W^(t+1), for every updated Parameter.
        shifted: the measured layers with an updated Parameter used before them, in forward order;
            for the others G' is G exactly and no pass is made.
    """

    model: LossHarness
    batch: Any
    rng: RngState
    updated: list[str]
    own: dict[str, str]
    pos: dict[str, float]
    new: dict[str, Tensor]
    shifted: list[str] = field(init=False)

    def __post_init__(self) -> None:
        in_order = sorted(self.own, key=lambda m: self.pos[self.own[m]])  # stable: tied layers keep their order
        self.shifted = [m for m in in_order if any(self.before(p, m) for p in self.updated)]

    def before(self, p: str, layer: str) -> bool:
        """Whether Parameter ``p`` is at W^(t+1) in ``layer``'s configuration."""
        return p != self.own[layer] and self.pos[p] < self.pos[self.own[layer]]

    def config(self, layer: str | None) -> dict[str, Tensor]:
        """``layer``'s configuration: a value for every updated Parameter. ``None`` is the unshifted
        configuration W^t, which gives G on the same code path as G'."""
        return {
            p: self.new[p] if layer is not None and self.before(p, layer) else self.model.values[p]
            for p in self.updated
        }

    def loss(self, ws: dict[str, Tensor], fixed: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
        """The loss with ``ws`` (differentiated), ``fixed`` and ``buffers`` substituted: vmap's member function."""
        return self.model.loss({**self.model.values, **fixed, **ws, **buffers}, self.batch)


def _metrics_of(
    configs: Configurations, G: Mapping[str, Tensor], found: ShiftedGradients, reduce: Reduce | None
) -> dict[str, Tensor]:
    """Every measured layer's metrics from G and G', both averaged over ranks first (in one call)."""
    shifted, base = reduce_together(reduce, found.shifted, found.base)
    result: dict[str, Tensor] = {}
    for layer, wn in configs.own.items():
        g = base.get(layer, G[wn])
        result.update(_metrics(layer, g, shifted.get(layer, g)))  # nothing used before it: G' is G exactly
    return result


def _first_uses(model: LossHarness, order: Sequence[str]) -> dict[str, float]:
    pos: dict[str, float] = {n: float(i) for i, n in enumerate(order)}
    for n in model.params:
        pos.setdefault(n, math.inf)  # never used: before nothing
    return pos


def _next_weights(
    model: LossHarness,
    updated: list[str],
    G: Mapping[str, Tensor],
    update: torch.optim.Optimizer | UpdateFn | None,
    next_weights: Mapping[str, Tensor] | None,
    step_grads: Mapping[str, Tensor] | None,
) -> dict[str, Tensor]:
    """W^(t+1) of every updated Parameter, float32: ``next_weights`` where given, else one step of
    ``update`` from W^t on G (``step_grads`` replacing G where given)."""
    if next_weights is not None:
        return {p: float32(next_weights[p]) for p in updated}
    grads_for_step = {**{n: G[n] for n in updated if n in G}, **(step_grads or {})}
    current = {p: model.values[p] for p in updated}
    if isinstance(update, torch.optim.Optimizer):  # a LightningOptimizer is one too
        new = optimizer_update(update, model.module, current, grads_for_step)
    else:
        assert update is not None, "internal_covariate_shift checks that update or next_weights is given"
        new = dict(update(current, {p: grads_for_step[p] for p in current}))
    return {p: float32(new[p]) for p in updated}


def _shifted_gradients(
    configs: Configurations,
    engine: Engine,
    gradient: StepGradient,
    chunk_size: int | None,
    memory_budget: int | None,
    *,
    warn: bool,
) -> ShiftedGradients:
    """G' of every shifted layer by the prefix engine, the loop or vmap; the loop's and vmap's members
    are W^t (for G) and each shifted layer's configuration."""
    if engine == "prefix":
        return ShiftedGradients(prefix_gradients(configs, warn=warn), {})
    return run_members(
        engine,
        "internal_covariate_shift",
        configs.model,
        gradient,
        weight_bytes=sum(configs.model.values[p].numel() * 4 for p in configs.updated),
        members=len(configs.shifted) + 1,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        batched=partial(_batched, configs),
        looped=partial(_looped, configs),
    )


def _looped(configs: Configurations) -> ShiftedGradients:
    """One gradient pass per shifted layer, over that layer's weight only."""
    out = {}
    for layer in configs.shifted:
        wn = configs.own[layer]
        _, g, _ = configs.model.gradient([wn], configs.batch, configs.rng, overrides=configs.config(layer))
        out[layer] = g[wn]
    return ShiftedGradients(out, {})


def _batched(configs: Configurations, size: int | None) -> ShiftedGradients:
    """The members through vmap, ``size`` at a time. Member ``None`` (W^t) rides along in the first
    chunk, so that G and G' share one computation path (its G replaces the first pass's G)."""
    members = [None, *configs.shifted] if configs.shifted else []
    found = ShiftedGradients({}, {})
    for chunk in chunks(len(members), size):
        in_chunk = [members[i] for i in chunk]
        gs = _vmapped(configs, in_chunk)
        for j, m in enumerate(in_chunk):
            if m is None:
                found.base.update({layer: gs[configs.own[layer]][j] for layer in configs.shifted})
            else:
                found.shifted[m] = gs[configs.own[m]][j]
    return found


def _vmapped(configs: Configurations, members: list[str | None]) -> dict[str, Tensor]:
    """One vmap call over ``members``: the gradient w.r.t. the weights of the layers they measure, stacked."""
    targets = configs.shifted if None in members else [m for m in members if m is not None]
    last = max(configs.pos[configs.own[m]] for m in targets)
    batched_w = [p for p in configs.updated if configs.pos[p] <= last]  # later parameters are the same in every member
    values = [configs.config(m) for m in members]
    stacked = {p: torch.stack([v[p] for v in values]) for p in batched_w}
    want = {configs.own[m] for m in targets}
    diff = {p: v for p, v in stacked.items() if p in want}
    fixed = {p: v for p, v in stacked.items() if p not in want}
    configs.rng.restore()
    return vmap(grad(configs.loss), in_dims=(0, 0, 0), randomness="same")(
        diff, fixed, configs.model.fresh_buffers(len(members))
    )
