"""Activation statistics (PROTOCOL §3) and the one side-effect-free forward pass that reads them."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from bnlightning.callbacks.functional._harness import LossHarness
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional._numerics import to_float32

#: How ``activation_stats`` reads an activation module's input: ``saturating`` units
#: (tanh/sigmoid family) get a saturated share, ``relu`` units a dead share, ``other`` activations neither.
ACTIVATION_KINDS: dict[type[nn.Module], str] = {
    nn.Sigmoid: "saturating",
    nn.Tanh: "saturating",
    nn.Hardtanh: "saturating",
    nn.Hardsigmoid: "saturating",
    nn.Softsign: "saturating",
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.LeakyReLU: "other",
    nn.PReLU: "other",
    nn.ELU: "other",
    nn.SELU: "other",
    nn.CELU: "other",
    nn.GELU: "other",
    nn.SiLU: "other",
    nn.Mish: "other",
    nn.Softplus: "other",
}


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
    kind: Literal["saturating", "relu", "other"] = "other",
    *,
    saturation_threshold: float = 2.0,
    quantiles: Sequence[float] = (0.15, 0.5, 0.85),
) -> dict[str, Tensor]:
    """Distribution summary of a batch of pre-activations (PROTOCOL §3).

    Args:
        x: pre-activations, batch first: (N, features) or (N, C, H, W).
        kind: ``saturating`` adds ``saturated`` (share of entries with
            ``|x| > saturation_threshold``); ``relu`` adds ``dead`` (share of units that are
            never positive on the whole batch; a unit is one entry of ``x[0]``, i.e. a feature, or a (channel, row,
            column) position for images); ``other`` (and ``none``, its name before) adds neither.
        saturation_threshold: the ``|x|`` above which a tanh/sigmoid unit counts as saturated.
        quantiles: quantile levels; keys are ``q<round(100*level)>``.

    Returns:
        ``{"q15", "q50", "q85", "mean", "std" (population, correction 0), ["saturated" | "dead"]}``
        as 0-dim float32 tensors.
    """
    if kind not in ("saturating", "relu", "other", "none"):
        raise ValueError(f"unknown kind {kind!r}; accepted: saturating, relu, other")
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
    """``saturating``, ``relu`` or ``other`` (an activation with no kind-specific statistic) for an
    activation module; ``""`` for a module that is not an activation."""
    for cls, kind in ACTIVATION_KINDS.items():
        if type(module) is cls:
            return kind
    return ""


def measurement_forward(module: nn.Module, batch: Any, *, loss_fn: LossFn | None = None) -> Tensor:
    """One float32, no-grad pass of the loss that changes nothing.

    Parameters are float32 substitutes, buffers clones, the RNG is rewound afterwards, and it runs
    outside autocast with TF32 off. Forward hooks on the module's submodules fire, which is how
    ``ActivationStats`` reads pre-activations. Returns the loss.
    """
    model = LossHarness(module, loss_fn)
    with model.session(), torch.no_grad():
        return model.loss({**model.values, **model.fresh_buffers()}, to_float32(batch))


Tap = tuple[nn.Module, Literal["input", "output"]]
#: A tap's name: a module name, or any hashable key a caller needs (a (block, "branch") pair).
K = TypeVar("K", bound=Hashable)
Read = Callable[[Any, Tensor], Any]


def _clone(name: object, x: Tensor) -> Tensor:
    return x.detach().clone()


def capture_forward(
    module: nn.Module,
    batch: Any,
    taps: Mapping[K, Tap],
    *,
    read: Read = _clone,
    loss_fn: LossFn | None = None,
) -> dict[K, Any]:
    """Run ``measurement_forward`` once and return what each tap saw: name -> ``read(name, x)`` of the
    (first positional) input or the output ``x`` of its module, from the module's last call in that
    pass (tensors only).

    ``read`` runs *inside* the hook, at the moment the tensor is produced: what it keeps must not be a
    view of ``x``, because a later in-place operation (``nn.ReLU(inplace=True)`` after a norm,
    ``out += identity`` after a residual branch) rewrites ``x`` before the pass ends. The default
    keeps a copy; a callback that needs only a few statistics computes them in ``read`` and keeps
    no activation at all. The hooks exist only for this one pass, so training's own forwards never
    run through them. This is how ``ActivationStats``, ``MeanShift`` and ``ResidualVariance`` read
    their tensors.
    """
    captured: dict[K, Any] = {}

    def hook(name: K, read_input: bool) -> Any:
        def take(_m: nn.Module, args: tuple[Any, ...], output: Any = None) -> None:
            x = (args[0] if args else None) if read_input else output
            if isinstance(x, Tensor):
                captured[name] = read(name, x.detach())

        return (lambda m, args: take(m, args)) if read_input else take

    handles = [
        m.register_forward_pre_hook(hook(name, True))
        if where == "input"
        else m.register_forward_hook(hook(name, False))
        for name, (m, where) in taps.items()
    ]
    try:
        measurement_forward(module, batch, loss_fn=loss_fn)
    finally:
        for h in handles:
            h.remove()
    return captured
