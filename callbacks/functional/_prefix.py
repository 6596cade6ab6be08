"""The prefix engine of ``internal_covariate_shift(mode="prefix")``: reuse the updated prefix.

Configuration i (PROTOCOL §1) has the parameters used before layer i at W^(t+1) and the rest at
W^t. In a network run through an ``nn.Sequential`` S, let child k of S hold layer i: the input x_k
that S's children 0..k-1 hand to child k depends only on parameters used before child k, so it is
the same in configuration i and in configuration ``last`` (the shifted layer used last) *if* every
updated parameter it depends on is used before layer i. One full pass of configuration ``last``
therefore gives G'_last and, cached (cloned, with the RNG state at that point), every x_k; then
G'_i needs only the rest of the loss with S started at child k on x_k (S's ``forward`` is replaced
for that one call, see ``_started_at``; the code around S runs as usual, from the same RNG state).

It is used only where it provably gives the full pass's numbers: S called once per loss, its
children once each and in order, each with one tensor argument, distinct children; and x_k must
not depend, through autograd, on any updated parameter that is not used before layer i (checked on
the graph of the ``last`` pass, whose every updated parameter is a leaf). A layer for which a
condition fails gets a full pass, as in ``mode="loop"``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bnlightning.callbacks.functional._state import RngState

if TYPE_CHECKING:
    from bnlightning.callbacks.functional.ics import Configurations  # ics.py imports this module


def sequential_cut(module: nn.Module, layers: Sequence[str]) -> tuple[nn.Sequential, dict[str, int]] | None:
    """The plain ``nn.Sequential`` whose direct children separate the most of ``layers``.

    Returns it and, for each of ``layers`` inside it, the index of the child holding it; ``None``
    when no ``nn.Sequential`` (with ``nn.Sequential.forward``, uncompiled, distinct children) holds
    any of ``layers``.
    """
    best: tuple[int, nn.Sequential, dict[str, int]] | None = None
    for sname, seq in module.named_modules():
        if (
            type(seq).forward is not nn.Sequential.forward
            or "forward" in vars(seq)
            or getattr(seq, "_compiled_call_impl", None) is not None
        ):
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


def prefix_gradients(configs: Configurations, *, warn: bool) -> dict[str, Tensor]:
    """G'_i (the gradient w.r.t. layer i's weight) of each of ``configs.shifted``, reusing the updated prefix.

    ``warn``: say (once per model class) how many layers got a full pass because the prefix is not
    provably exact for them (``mode="prefix"`` asked for explicitly).
    """
    if not configs.shifted:
        return {}
    own, pos = configs.own, configs.pos
    last = max(configs.shifted, key=lambda m: pos[own[m]])
    rest = [m for m in configs.shifted if m != last]
    cut = sequential_cut(configs.model.module, rest)
    seq, child_of = cut if cut is not None else (None, {})
    recording = _Recording(set(child_of.values()))
    loss, leaves = _full_pass(configs, last, seq, recording)
    usable = (
        _usable(configs, child_of, recording, leaves) if seq is not None and recording.faithful(len(seq)) else set()
    )
    out = {last: _gradient(loss, leaves[own[last]])}
    del loss, leaves  # the full pass's graph: freed before the suffix passes
    if warn and len(usable) < len(rest):
        _warn_full_passes(configs.model.module, len(rest) - len(usable), len(rest))
    uses = Counter(child_of[m] for m in rest if m in usable)
    for layer in sorted(rest, key=lambda m: pos[own[m]]):
        if layer not in usable:
            _, g, _ = configs.model.gradient([own[layer]], configs.batch, configs.rng, overrides=configs.config(layer))
            out[layer] = g[own[layer]]
            continue
        assert seq is not None, "a usable layer lies inside S"
        k = child_of[layer]
        uses[k] -= 1
        x_k, rng_k = recording.take(k, last_use=uses[k] == 0)
        out[layer] = _suffix_gradient(configs, layer, seq, _Resume(list(seq)[k:], x_k, rng_k))
    return out


@dataclass
class _Recording:
    """What the full pass saw of S and its children (through forward pre-hooks).

    Attributes:
        wanted: the children whose input is cached (those holding a layer to compute).
        inputs: child k -> (x_k cloned, the ``grad_fn`` of the x_k the pass used, the RNG state
            when child k was called).
        seen: every child call, in order. calls: the calls of S. bad: a wanted child got something
            else than one tensor argument.
    """

    wanted: set[int]
    inputs: dict[int, tuple[Tensor, Any, RngState]] = field(default_factory=dict)
    seen: list[int] = field(default_factory=list)
    calls: int = 0
    bad: bool = False

    def attach(self, seq: nn.Sequential) -> list[RemovableHandle]:
        # prepend: x_k is recorded before the user's own pre-hooks on child k, which run again
        # (once) when the suffix pass calls child k on it.
        handles = [seq.register_forward_pre_hook(self._on_seq, with_kwargs=True, prepend=True)]
        return handles + [
            c.register_forward_pre_hook(partial(self._on_child, k), with_kwargs=True, prepend=True)
            for k, c in enumerate(seq)
        ]

    def _on_seq(self, _m: nn.Module, _args: Any, _kwargs: Any) -> None:
        self.calls += 1

    def _on_child(self, k: int, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.seen.append(k)
        if k in self.wanted and k not in self.inputs:
            if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
                self.bad = True
                return
            self.inputs[k] = (
                args[0].detach().clone(),
                args[0].grad_fn,
                RngState.capture(),
            )  # clone: in-place ops follow

    def faithful(self, n_children: int) -> bool:
        """S was called once, each child once and in order, each wanted child with one tensor."""
        return not self.bad and self.calls == 1 and self.seen == list(range(n_children))

    def take(self, k: int, *, last_use: bool) -> tuple[Tensor, RngState]:
        """Child k's cached input and RNG state for one suffix pass: a copy while later passes need it
        (a child may modify its input in place), the cached tensor itself (and dropped) at its last use."""
        x_k, _, rng_k = self.inputs[k]
        if last_use:
            del self.inputs[k]
            return x_k, rng_k
        return x_k.clone(), rng_k


def _full_pass(
    configs: Configurations, last: str, seq: nn.Sequential | None, recording: _Recording
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of configuration ``last`` with every updated Parameter a leaf (for the dependency
    check), S's children's inputs recorded; returns it and the leaves."""
    handles = recording.attach(seq) if seq is not None else []
    try:
        configs.rng.restore()
        tensors = {**configs.model.values, **configs.config(last), **configs.model.fresh_buffers()}
        leaves = {p: tensors[p].detach().requires_grad_(True) for p in configs.updated}
        tensors.update(leaves)
        return configs.model.loss(tensors, configs.batch), leaves
    finally:
        for h in handles:
            h.remove()


def _usable(
    configs: Configurations, child_of: dict[str, int], recording: _Recording, leaves: dict[str, Tensor]
) -> set[str]:
    """The layers whose cached input is provably their configuration's: x_k depends, through the full
    pass's graph, on no updated Parameter used at or after the layer (those differ between configurations)."""
    param_of = {id(leaf): p for p, leaf in leaves.items()}
    visited: set[Any] = set()
    reached: set[int] = set()
    usable: set[str] = set()
    for k in sorted(recording.wanted):
        if k not in recording.inputs:
            continue
        reached |= _reached_leaves(recording.inputs[k][1], visited)  # everything x_0..x_k depend on
        latest = max((configs.pos[param_of[i]] for i in reached if i in param_of), default=-1)
        usable.update(m for m, mk in child_of.items() if mk == k and latest < configs.pos[configs.own[m]])
    return usable


@dataclass
class _Resume:
    """S's forward for one suffix pass: children k.. (``tail``) on the cached x_k, from the RNG state
    the full pass had there (the same draws as children k.. made in it)."""

    tail: list[nn.Module]
    x: Tensor
    rng: RngState

    def __call__(self, *_args: Any, **_kwargs: Any) -> Tensor:
        self.rng.restore()
        x = self.x
        for child in self.tail:
            x = child(x)
        return x


@contextlib.contextmanager
def _started_at(seq: nn.Sequential, forward: _Resume) -> Iterator[None]:
    """S runs ``forward`` instead of its children 0..k-1 and on, for one block.

    This is the one write the prefix engine makes to the user's module: an instance ``forward``
    that shadows ``nn.Sequential.forward``, deleted on exit. Torch's hooks cannot do it: a forward
    pre-hook can replace a module's input but not skip its forward (children 0..k-1 would still
    run, the very cost this engine saves), and a forward hook runs after it. Putting another module
    in S's parent slot instead would also skip the hooks registered on S and could not replace a
    root S. With the instance ``forward``, S's own hooks and the code around S run as in the full
    pass. ``sequential_cut`` admits only an S without an instance ``forward`` of its own, and the
    measurement's session puts back every attribute a pass leaves on a module.
    """
    assert "forward" not in vars(seq), "sequential_cut admits no module with an instance forward"
    seq.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del seq.forward


def _suffix_gradient(configs: Configurations, layer: str, seq: nn.Sequential, forward: _Resume) -> Tensor:
    """G'_layer from a pass whose S starts at the child holding ``layer`` (its configuration elsewhere)."""
    wn = configs.own[layer]
    configs.rng.restore()
    tensors = {**configs.model.values, **configs.config(layer), **configs.model.fresh_buffers()}
    leaf = tensors[wn].detach().requires_grad_(True)
    tensors[wn] = leaf
    with _started_at(seq, forward):
        loss = configs.model.loss(tensors, configs.batch)
    return _gradient(loss, leaf)


def _gradient(loss: Tensor, leaf: Tensor) -> Tensor:
    (g,) = torch.autograd.grad(loss, [leaf], allow_unused=True)
    return torch.zeros_like(leaf) if g is None else g


def _warn_full_passes(module: nn.Module, n_full: int, n_rest: int) -> None:
    key = type(module).__name__
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"internal_covariate_shift(mode='prefix'): {n_full} of {n_rest} layers of {key} are not inside an "
            "nn.Sequential whose earlier children provably give them their input; they get a full pass (as "
            "mode='loop').",
            stacklevel=4,
        )
