"""W^(t+1) when it is not read off the real step: ``sgd_update`` and ``optimizer_update``.

The callbacks take W^(t+1) from the real optimizer step (they measure right after it, see
``InternalCovariateShift``), which is exact for every optimizer, clipping and precision. These
two are for the functional API, and for ``update_from="measured"``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from bnlightning.callbacks.functional._optimizer import torch_optimizer

UpdateFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Mapping[str, Tensor]]

#: Optimizers whose step is elementwise per parameter: stepping a one-parameter copy gives that
#: parameter's real next value (checked bit for bit in the tests).
ELEMENTWISE = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RAdam,
    torch.optim.NAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.Adadelta,
    torch.optim.ASGD,
    torch.optim.Rprop,
)


def sgd_update(lr: float, weight_decay: float = 0.0) -> UpdateFn:
    """The plain SGD step ``W - lr * (G + weight_decay * W)`` as an ``update`` for ``internal_covariate_shift``."""

    def update(weights: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: w - lr * (grads[n] + weight_decay * w if weight_decay else grads[n]) for n, w in weights.items()}

    return update


def check_optimizer(optimizer: object) -> None:
    """One clear error for an optimizer whose next weights cannot be computed per parameter.

    Raises:
        TypeError: a closure optimizer (LBFGS) or one that couples parameters.
    """
    opt = torch_optimizer(optimizer)
    if isinstance(opt, torch.optim.LBFGS):
        raise TypeError(
            "LBFGS re-evaluates the loss inside its step (a closure optimizer); W^(t+1) cannot be computed from one "
            f"gradient. Supported: {', '.join(c.__name__ for c in ELEMENTWISE)}"
        )
    if not isinstance(opt, ELEMENTWISE):
        raise TypeError(
            f"optimizer_update cannot step {type(opt).__name__} per parameter; "
            f"supported: {', '.join(c.__name__ for c in ELEMENTWISE)}. "
            "The callbacks' default (update_from='trainer') reads the real step and supports any optimizer."
        )


def optimizer_update(
    optimizer: torch.optim.Optimizer, module: nn.Module, weights: Mapping[str, Tensor], grads: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The values the optimizer's next step would give the parameters named in ``weights``.

    Each parameter is stepped alone by a one-parameter copy of the optimizer: same class, its
    group's hyper-parameters (``foreach``/``fused``/``decoupled_weight_decay`` included), and a copy
    of that parameter's state only, so memory is one parameter's worth at a time, not a copy of
    the optimizer. ``grads`` gives the gradient to step with (missing: the parameter's ``.grad``;
    with neither, the parameter keeps its value). The real optimizer and the module are not touched.

    Args:
        optimizer: a torch optimizer (or Lightning's wrapper) over ``module``'s parameters.
        module: the module whose canonical parameter names key ``weights`` and ``grads``.
        weights: name -> current value of the parameters whose update is wanted.
        grads: name -> gradient to step with.

    Raises:
        TypeError: an optimizer ``check_optimizer`` refuses.
    """
    check_optimizer(optimizer)
    opt = torch_optimizer(optimizer)
    accepted = set(inspect.signature(type(opt).__init__).parameters) - {"self", "params"}
    defaults = {k: v for k, v in opt.defaults.items() if k in accepted}
    name_of = {id(p): n for n, p in module.named_parameters()}
    out: dict[str, Tensor] = {}
    for group in opt.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            n = name_of.get(id(p))
            if n is None or n not in weights:
                continue
            g = grads.get(n, p.grad)
            if g is None:
                continue
            s = weights[n].detach().to(p.dtype).clone()
            s.grad = g.detach().to(p.dtype).clone()
            twin = type(opt)([{**hyper, "params": [s]}], **defaults)
            state = opt.state.get(p)
            if state:
                twin.state[s] = copy.deepcopy(state)
            twin.step()
            out[n] = s.detach()
    return {n: out.get(n, w) for n, w in weights.items()}
