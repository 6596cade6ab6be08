"""The prefix engine of ``internal_covariate_shift(mode="prefix")``: reuse the updated prefix.

Configuration i (PROTOCOL §1) has the parameters used before layer i at W^(t+1) and the rest at
W^t. In a network run through an ``nn.Sequential`` S, let child k of S hold layer i: the input x_k
that S's children 0..k-1 hand to child k depends only on parameters used before child k, so it is
the same in configuration i and in configuration ``last`` (the shifted layer used last) *if* every
updated parameter it depends on is used before layer i. One full pass of configuration ``last``
therefore gives G'_last and, cached (cloned, with the RNG state at that point), every x_k; then
G'_i needs only the rest of the loss with S started at child k on x_k (S's ``forward`` is replaced
for that one call; the code around S runs as usual, from the same RNG state).

It is used only where it provably gives the full pass's numbers: S called once per loss, its
children once each and in order, each with one tensor argument, distinct children; and x_k must
not depend, through autograd, on any updated parameter that is not used before layer i (checked on
the graph of the ``last`` pass, whose every updated parameter is a leaf). A layer for which a
condition fails gets a full pass, as in ``mode="loop"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnlightning.callbacks.functional._harness import LossHarness
from bnlightning.callbacks.functional._state import RngState


def sequential_cut(module: nn.Module, layers: Sequence[str]) -> tuple[nn.Sequential, dict[str, int]] | None:
    """The plain ``nn.Sequential`` whose direct children separate the most of ``layers``.

    Returns it and, for each of ``layers`` inside it, the index of the child holding it; ``None``
    when no ``nn.Sequential`` (with ``nn.Sequential.forward``, uncompiled, distinct children) holds
    any of ``layers``.
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


_warned: set[str] = set()


def prefix_gradients(
    model: LossHarness,
    batch: Any,
    rng: RngState,
    updated: Sequence[str],
    pos: Mapping[str, float],
    own: Mapping[str, str],
    shifted: Sequence[str],
    config: Callable[[str], dict[str, Tensor]],
    *,
    warn: bool,
) -> dict[str, Tensor]:
    """G'_i (gradient w.r.t. ``own[i]``) of each ``shifted`` layer, reusing the updated prefix.

    Args:
        updated: canonical names of the parameters a configuration may move.
        pos: parameter -> index of its first use.
        own: layer (module name) -> canonical name of its weight.
        shifted: the layers to compute (each has an updated parameter used before it).
        config: layer -> the substitutes of its configuration.
    """
    out: dict[str, Tensor] = {}
    if not shifted:
        return out
    last = max(shifted, key=lambda m: pos[own[m]])
    cut = sequential_cut(model.module, [m for m in shifted if m != last])
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

    # the full pass of configuration `last`, every updated parameter a leaf (for the dependency check)
    handles = []
    if seq is not None:
        handles.append(seq.register_forward_pre_hook(seq_hook, with_kwargs=True))
        handles += [c.register_forward_pre_hook(child_hook(k), with_kwargs=True) for k, c in enumerate(children)]
    try:
        rng.restore()
        tensors = {**model.values, **config(last), **model.fresh_buffers()}
        leaves = {p: tensors[p].detach().requires_grad_(True) for p in updated}
        tensors.update(leaves)
        loss = model.loss(tensors, batch)
    finally:
        for h in handles:
            h.remove()
    usable: set[str] = set()
    if seq is not None and not bad[0] and seq_calls[0] == 1 and seen == list(range(len(children))):
        param_of = {id(leaf): p for p, leaf in leaves.items()}
        visited: set[Any] = set()
        reached: set[int] = set()
        for k in needed:
            if k not in cache:
                continue
            reached |= _reached_leaves(cache[k][1], visited)  # everything x_0..x_k depend on
            latest = max((pos[param_of[i]] for i in reached if i in param_of), default=-1)
            usable.update(m for m, mk in child_of.items() if mk == k and latest < pos[own[m]])
    (g_last,) = torch.autograd.grad(loss, [leaves[own[last]]], allow_unused=True)
    out[last] = torch.zeros_like(leaves[own[last]]) if g_last is None else g_last
    del loss, leaves, tensors
    rest = [m for m in shifted if m != last]
    if warn and len(usable) < len(rest):
        key = type(model.module).__name__
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"internal_covariate_shift(mode='prefix'): {len(rest) - len(usable)} of {len(rest)} layers of {key} are not inside an "
                f"nn.Sequential whose earlier children provably give them their input; they get a full pass (as mode='loop').",
                stacklevel=3,
            )
    uses = {k: sum(1 for m in rest if m in usable and child_of[m] == k) for k in needed}
    for layer in sorted(rest, key=lambda m: pos[own[m]]):
        wn = own[layer]
        if layer not in usable:
            _, g, _ = model.gradient([wn], batch, rng, overrides=config(layer))
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
        (g_leaf,) = torch.autograd.grad(loss, [leaf], allow_unused=True)
        out[layer] = torch.zeros_like(leaf) if g_leaf is None else g_leaf
    return out
