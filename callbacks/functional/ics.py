"""Internal covariate shift (PROTOCOL §1, the paper's Definition 2.1) as a pure function."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from bnlightning.callbacks.functional._batching import chunks, resolve_mode, run_members
from bnlightning.callbacks.functional._harness import LossHarness
from bnlightning.callbacks.functional._layers import layer_param, resolve_layers, weight_layer_names
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional._numerics import Reduce, float32, reduce_dict, to_float32
from bnlightning.callbacks.functional._prefix import prefix_gradients
from bnlightning.callbacks.functional._updates import UpdateFn, optimizer_update
from bnlightning.callbacks.functional.gradient import StepGradient, check_gradient, gradient_pass

IcsMode = Literal["auto", "vmap", "loop", "prefix"]
ICS_MODES: tuple[str, ...] = ("auto", "vmap", "loop", "prefix")


def _metrics(layer: str, g: Tensor, g2: Tensor) -> dict[str, Tensor]:
    g, g2 = g.flatten(), g2.flatten()
    l2 = torch.linalg.vector_norm(g - g2)
    norm_g = torch.linalg.vector_norm(g)
    cos = torch.dot(g, g2) / (norm_g * torch.linalg.vector_norm(g2))
    return {f"ics/l2/{layer}": l2, f"ics/cos/{layer}": cos, f"ics/rel/{layer}": l2 / norm_g}


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

    ``G_i`` is the gradient w.r.t. layer i's weight Parameter at W^t; ``G'_i`` the same gradient
    with every updated Parameter whose *first use* in the forward pass comes before layer i's
    first use replaced by its value W^(t+1). Updated Parameters are the weights of every
    Conv/Linear layer plus the measured ones; everything else (biases, norm gamma/beta, layer i
    itself, later layers) keeps its W^t value. A Parameter used in several places (weight tying,
    a block registered under several names) is one unit: it is at W^t or at W^(t+1) everywhere, and
    its gradient is the sum over its uses. Same batch, same random draws, modules in their current
    mode, buffers (BatchNorm running statistics) untouched.

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
        loss_fn: ``(module, batch) -> scalar loss``, or ``resolve_loss(module, ...)``'s result; default
            (``None``): the module's ``loss(batch)`` method, else a LightningModule's ``training_step``
            (see ``resolve_loss``).
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
        raise ValueError("internal_covariate_shift needs update= (an optimizer or update function) or next_weights= (W^(t+1))")
    measured = resolve_layers(module, layers)
    model = LossHarness(module, loss_fn)
    if weights is not None:
        model.values.update({n: float32(w) for n, w in weights.items()})
    requested = mode
    engine = resolve_mode(mode, model, ICS_MODES, chunk_size)
    own = {layer: layer_param(module, layer, model) for layer in measured}
    updated = list(dict.fromkeys([layer_param(module, m, model) for m in weight_layer_names(module)] + [own[m] for m in measured]))
    batch = to_float32(batch)
    with model.session() as rng:
        need_all = next_weights is None and step_grads is None
        names = [n for n in model.trainable if n in updated] if need_all else [own[m] for m in measured]
        if gradient is None:
            gradient = gradient_pass(model, names, batch, rng, reduce)
        check_gradient(model, gradient, names)
        G, order = gradient.grads, gradient.order
        pos: dict[str, float] = {n: float(i) for i, n in enumerate(order)}
        for n in model.params:
            pos.setdefault(n, math.inf)  # never used: before nothing
        if next_weights is not None:
            new = {p: float32(next_weights[p]) for p in updated}
        else:
            grads_for_step = {**{n: G[n] for n in updated if n in G}, **(step_grads or {})}
            current = {p: model.values[p] for p in updated}
            if isinstance(update, torch.optim.Optimizer):  # a LightningOptimizer is one too
                new = optimizer_update(update, module, current, grads_for_step)
            else:
                assert update is not None, "checked above: update or next_weights is given"
                new = dict(update(current, {p: grads_for_step[p] for p in current}))
            new = {p: float32(new[p]) for p in updated}

        def before(p: str, layer: str) -> bool:
            return p != own[layer] and pos[p] < pos[own[layer]]

        def config(layer: str | None) -> dict[str, Tensor]:
            # None is the unshifted configuration W^t (gives G on the same code path as G')
            return {p: new[p] if layer is not None and before(p, layer) else model.values[p] for p in updated}

        shifted = [m for m in sorted(measured, key=lambda m: pos[own[m]]) if any(before(p, m) for p in updated)]

        def looped() -> dict[str, Tensor]:
            out = {}
            for layer in shifted:
                _, g, _ = model.gradient([own[layer]], batch, rng, overrides=config(layer))
                out[layer] = g[own[layer]]
            return out

        rest = dict(model.values)

        def batched(size: int | None) -> dict[str, Tensor]:
            # Member None (W^t) rides along in the first chunk, so that G and G' share one computation
            # path and their difference carries no batched-vs-unbatched rounding (its G replaces G).
            members_all: list[str | None] = [None, *shifted] if shifted else []
            out: dict[str, Tensor] = {}
            for chunk in chunks(len(members_all), size):
                members = [members_all[i] for i in chunk]
                targets = shifted if None in members else [m for m in members if m is not None]
                last = max(pos[own[m]] for m in targets)
                batched_w = [p for p in updated if pos[p] <= last]  # later parameters are the same in every member
                configs = [config(m) for m in members]
                stacked = {p: torch.stack([c[p] for c in configs]) for p in batched_w}
                want = {own[m] for m in targets}
                diff = {p: v for p, v in stacked.items() if p in want}
                fixed = {p: v for p, v in stacked.items() if p not in want}

                def f(ws: dict[str, Tensor], fixed_ws: dict[str, Tensor], bufs: dict[str, Tensor]) -> Tensor:
                    return model.loss({**rest, **fixed_ws, **ws, **bufs}, batch)

                rng.restore()
                gs = vmap(grad(f), in_dims=(0, 0, 0), randomness="same")(diff, fixed, model.fresh_buffers(len(members)))
                for j, m in enumerate(members):
                    if m is None:
                        out.update({f"__base__{layer}": gs[own[layer]][j] for layer in shifted})
                    else:
                        out[m] = gs[own[m]][j]
            return out

        if engine == "prefix":
            G2 = prefix_gradients(model, batch, rng, updated, pos, own, shifted, config, warn=requested == "prefix")
        else:
            G2 = run_members(
                engine,
                "internal_covariate_shift",
                model,
                gradient,
                weight_bytes=sum(model.values[p].numel() * 4 for p in updated),
                members=len(shifted) + 1,
                chunk_size=chunk_size,
                memory_budget=memory_budget,
                batched=batched,
                looped=looped,
            )
        G2 = reduce_dict(G2, reduce)
        result: dict[str, Tensor] = {}
        for layer in measured:
            g = G2.get(f"__base__{layer}", G[own[layer]])
            result.update(_metrics(layer, g, G2.get(layer, g)))  # nothing used before it: G' is G exactly
        return result
