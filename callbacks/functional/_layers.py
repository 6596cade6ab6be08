"""Layer selection: which submodules' weights are a measurement's "layers" (PROTOCOL §1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from bnlightning.callbacks.functional._harness import LossHarness

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
CONV_TYPES = WEIGHT_LAYER_TYPES[1:]


def weight_layer_names(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of the Conv/Linear submodules with a trainable weight, one per weight
    Parameter (a module registered under several names, or a weight tied into another layer, counts once,
    under its first name)."""
    out, seen = [], set()
    for n, m in module.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, WEIGHT_LAYER_TYPES) and isinstance(w, nn.Parameter) and w.requires_grad and id(w) not in seen:
            seen.add(id(w))
            out.append(n)
    return out


def resolve_layers(module: nn.Module, layers: Sequence[str] | None, what: str = "layer") -> list[str]:
    """Check module names against ``module``; ``None`` means every Conv/Linear layer.

    Raises:
        ValueError: for a name that is not a submodule with a trainable ``weight`` (the valid names are
            listed), or two names whose weight is one Parameter.
    """
    valid = weight_layer_names(module)
    if layers is None:
        if not valid:
            raise ValueError(f"{type(module).__name__} has no Conv/Linear layer; pass the {what} names explicitly")
        return valid
    modules = dict(module.named_modules(remove_duplicate=False))
    with_weight = [n for n, m in modules.items() if n and isinstance(getattr(m, "weight", None), nn.Parameter)]
    owner: dict[int, str] = {}
    for name in layers:
        m = modules.get(name)
        w = getattr(m, "weight", None) if m is not None else None
        if not isinstance(w, nn.Parameter) or not w.requires_grad:
            raise ValueError(
                f"unknown {what} {name!r}: not a submodule with a trainable weight. Valid "
                f"names: {', '.join(with_weight)}"
            )
        if id(w) in owner:
            raise ValueError(f"{what}s {owner[id(w)]!r} and {name!r} share one weight Parameter; name it once")
        owner[id(w)] = name
    return list(layers)


def layer_param(module: nn.Module, layer: str, harness: LossHarness) -> str:
    """Canonical parameter name of the ``weight`` of submodule ``layer``."""
    w = module.get_submodule(layer).weight
    for n, p in harness.params.items():
        if p is w:
            return n
    raise KeyError(layer)  # pragma: no cover - resolve_layers checked it
