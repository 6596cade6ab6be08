"""How a measurement evaluates its members (ICS configurations, landscape step sizes): vmap or loop."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from torch import Tensor, cat, nn

from bnlightning.callbacks.functional._harness import LossHarness
from bnlightning.callbacks.functional._memory import default_budget, members_that_fit
from bnlightning.callbacks.functional._numerics import Reduce

if TYPE_CHECKING:
    from bnlightning.callbacks.functional.gradient import StepGradient

MODES: tuple[str, ...] = ("auto", "vmap", "loop")

#: What ``resolve_mode`` makes of a requested mode: the requested engine, or for ``auto`` either
#: ``prefix``/``loop`` (convolutions) or ``auto-vmap``: vmap in chunks sized from the memory budget,
#: which ``run_members`` may still turn into the loop (two members do not fit, dropout, training_step).
Engine = Literal["vmap", "loop", "prefix", "auto-vmap"]

log = logging.getLogger("bnlightning.callbacks")


def check_mode(mode: str, modes: Sequence[str] = MODES) -> None:
    """One clear error for a batching mode not in ``modes``."""
    if mode not in modes:
        raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(modes)}")


def check_chunk_size(chunk_size: int | None) -> None:
    """One clear error for a chunk size that is neither None nor an integer >= 1."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")


def check_memory_budget(memory_budget: int | None) -> None:
    """One clear error for a memory budget that is neither None nor a positive number of bytes."""
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1
    ):
        raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")


def resolve_mode(mode: str, model: LossHarness, modes: Sequence[str], chunk_size: int | None) -> Engine:
    """``auto`` becomes ``prefix`` (or ``loop``) for networks with convolutions, where vmap is a grouped
    convolution measured slower (bench/measure.py), else ``auto-vmap``: vmap in chunks sized from the
    memory budget, the loop when two members do not fit."""
    check_mode(mode, modes)
    check_chunk_size(chunk_size)
    if mode != "auto":
        return cast(Engine, mode)  # checked above: one of ``modes``, each an Engine but "auto"
    if model.has_conv():
        return "prefix" if "prefix" in modes else "loop"
    return "auto-vmap"


def chunks(n: int, size: int | None) -> list[range]:
    size = n if size is None else size
    return [range(i, min(i + size, n)) for i in range(0, n, max(size, 1))]


def reduce_together(reduce: Reduce | None, *groups: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """Every tensor of every group through ``reduce`` (a mean over ranks) in one call (one
    collective under DDP, none when every group is empty), as ``reduce_dict`` does for one mapping.
    Each group keeps its own keys: results of different kinds need no marker keys to share a call."""
    if reduce is None:
        return [dict(g) for g in groups]
    entries = [(i, n, t) for i, g in enumerate(groups) for n, t in g.items()]
    out: list[dict[str, Tensor]] = [{} for _ in groups]
    if not entries:
        return out
    flat = reduce(cat([t.reshape(-1) for _, _, t in entries]))
    start = 0
    for i, n, t in entries:
        out[i][n] = flat[start : start + t.numel()].view_as(t)
        start += t.numel()
    return out


_warned_fallback: set[str] = set()


def vmap_or_loop(mode: str, what: str, batched: Callable[[], Any], looped: Callable[[], Any]) -> Any:
    """Run ``batched``; in ``auto`` mode fall back to ``looped`` (one warning) if vmap fails."""
    if mode == "loop":
        return looped()
    if mode == "vmap":
        return batched()
    try:
        return batched()
    except Exception as err:
        if what not in _warned_fallback:
            _warned_fallback.add(what)
            warnings.warn(
                f"{what}: torch.func.vmap failed on this module ({type(err).__name__}: {err}); using the per-member "
                "loop instead.",
                stacklevel=3,
            )
        return looped()


def run_members(
    mode: Engine,
    what: str,
    model: LossHarness,
    gradient: StepGradient,
    *,
    weight_bytes: int,
    members: int,
    chunk_size: int | None,
    memory_budget: int | None,
    batched: Callable[[int | None], Any],
    looped: Callable[[], Any],
) -> Any:
    """Evaluate a measurement's members in the resolved ``mode``; ``batched(size)`` takes the chunk size.

    ``auto-vmap`` sizes chunks from ``memory_budget``: a member costs about three copies of the
    ``weight_bytes`` it stacks plus one pass's activations (``gradient.activation_bytes``); the loop
    when two do not fit, when the loss runs a dropout or when it is ``training_step``. The choice
    is said once (``tell_choice``).
    """
    if mode != "auto-vmap":
        return vmap_or_loop(mode, what, lambda: batched(chunk_size), looped)
    budget = default_budget(model) if memory_budget is None else memory_budget
    size = members_that_fit(budget, 3 * weight_bytes + gradient.activation_bytes, members)
    size = min(size, chunk_size) if size and chunk_size else size
    size = 0 if gradient.dropout or model.uses_training_step else size
    tell_choice(what, model.module, auto_choice(size, gradient.dropout, model.uses_training_step))
    return vmap_or_loop("auto", what, lambda: batched(size), looped) if size else looped()


_told: set[tuple[str, str, str]] = set()  # what tell_choice said already, once per process


def auto_choice(size: int, dropout: bool, training_step: bool) -> str:
    """What ``mode="auto"`` chose, in words, for ``tell_choice``."""
    if size:
        return f"vmap in chunks of {size}"
    why = (
        "the loss runs a dropout"
        if dropout
        else "the loss is training_step, which may update state"
        if training_step
        else "vmap members do not fit the memory budget"
    )
    return f"loop ({why})"


def tell_choice(what: str, module: nn.Module, choice: str) -> None:
    """Say once per function, model class and choice which batching ``mode="auto"`` chose."""
    key = (what, type(module).__name__, choice)
    if key not in _told:
        _told.add(key)
        log.info("%s(mode='auto') on %s: %s", what, type(module).__name__, choice)
