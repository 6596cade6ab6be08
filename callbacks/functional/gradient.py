"""G: the first pass that ``internal_covariate_shift`` and ``loss_landscape`` both make, shareable."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from bnlightning.callbacks.functional._harness import LossHarness
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional._memory import saved_bytes
from bnlightning.callbacks.functional._numerics import Reduce, reduce_dict, to_float32


class StepGradient(NamedTuple):
    """The float32 gradient of the loss over every trainable parameter, averaged over ranks.

    Attributes:
        grads: canonical parameter name -> gradient (zeros for a trainable parameter the loss does not use).
        order: every parameter's canonical name in the order of its first use in that pass
            (parameters never used are absent).
        activation_bytes: bytes autograd saved for that pass (one pass's activations), which
            ``mode="auto"`` uses to size vmap chunks.
        dropout: whether the pass ran a dropout (``mode="auto"`` then avoids vmap, whose dropout
            masks differ from those of an unbatched pass).
    """

    grads: dict[str, Tensor]
    order: list[str]
    activation_bytes: int
    dropout: bool = False


def gradient_pass(
    model: LossHarness,
    names: list[str],
    batch: Any,
    rng: Any,
    reduce: Reduce | None,
    weights: dict[str, Tensor] | None = None,
) -> StepGradient:
    """``model``'s gradient over ``names`` with the forward order and activation size recorded."""
    (loss, grads, order), act = saved_bytes(
        lambda: model.gradient(names, batch, rng, overrides=weights, record_order=True)
    )
    return StepGradient(reduce_dict(grads, reduce), order, act, model.dropout)


def step_gradient(
    module: nn.Module,
    batch: Any,
    *,
    loss_fn: LossFn | None = None,
    weights: dict[str, Tensor] | None = None,
    reduce: Reduce | None = None,
) -> StepGradient:
    """G over every trainable parameter, computed exactly as ``internal_covariate_shift`` and
    ``loss_landscape`` compute their own first pass (float32 substitutes, cloned buffers, the RNG
    replayed from its state now and rewound afterwards). Pass it as ``gradient=`` to either, on the
    same module, batch, weights and RNG state, to skip that pass: the same numbers, one pass fewer.

    Args:
        module, batch, loss_fn: as in ``internal_covariate_shift``.
        weights: canonical name -> value to use instead of the module's current one.
        reduce: mean over ranks (DDP), applied to the gradient.
    """
    model = LossHarness(module, loss_fn)
    with model.session() as rng:
        return gradient_pass(model, model.trainable, to_float32(batch), rng, reduce, weights)


def check_gradient(model: LossHarness, gradient: StepGradient, names: list[str]) -> None:
    missing = [n for n in names if n not in gradient.grads]
    if missing:
        raise ValueError(
            f"gradient= lacks trainable parameter {missing[0]!r}; pass step_gradient(module, batch) of this module"
        )
