"""The loss a measurement differentiates, resolved once from what the module's signatures say.

``resolve_loss`` turns what the user gave into one ``ResolvedLoss``, a callable
``(module, batch) -> scalar tensor`` that every measurement function takes as its ``loss_fn``.
The rule, first that applies:

1. ``loss_fn`` given: ``loss_fn(module, batch)`` (a callable, or an import path
   ``"package.module:function"``);
2. ``loss_method`` given: ``module.<loss_method>(batch)``; ``"training_step"`` names the module's
   training step (called as in 4);
3. the module's ``loss`` *method*, when its signature takes one argument (the batch). An
   ``nn.Module`` attribute (``self.loss = nn.CrossEntropyLoss()``) is a loss of (predictions,
   targets), never of a batch, and is skipped; so is a method that needs two arguments;
4. a LightningModule's own ``training_step``, called with the arguments it accepts (as Lightning
   calls it): ``(batch, 0)``, or ``(batch)`` for ``training_step(self, batch)``; it may return the
   loss or a dict with ``"loss"``. Its ``self.log`` calls are silenced and its torchmetrics states
   restored while a measurement runs it (``LossHarness.session``).

Under rules 3 and 4 both can apply; ``loss_candidates`` returns them in that order and the
callbacks keep the first that gives, on the first training batch, a scalar that depends on the
trainable parameters (``check_loss`` in ``_harness.py``): Lightning's ``BoringModel.loss(preds,
labels=None)`` takes one argument but is no loss of a batch, so its ``training_step`` is measured.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

#: The user-facing loss: ``loss_fn(module, batch) -> scalar loss tensor``.
LossFn = Callable[[nn.Module, Any], Tensor]

_HOW = (
    "Pass loss_fn=(module, batch) -> scalar loss (a callable, or an import path 'package.module:function'), e.g. "
    "loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1])"
)


class ResolvedLoss:
    """A loss ready for a measurement: ``loss(module, batch)`` gives what the module's loss returns.

    Attributes:
        name: what is called, in words (``"LitModel.training_step(batch, 0)"``), for messages.
        uses_training_step: whether it runs the module's ``training_step`` (whose ``self.log`` calls
            are then silenced and whose torchmetrics states are restored; ``mode="auto"`` loops).
    """

    __slots__ = ("fn", "name", "uses_training_step")

    def __init__(self, fn: Callable[[nn.Module, Any], Any], name: str, uses_training_step: bool = False) -> None:
        self.fn, self.name, self.uses_training_step = fn, name, uses_training_step

    def __call__(self, module: nn.Module, batch: Any) -> Any:
        return self.fn(module, batch)

    def __repr__(self) -> str:
        return f"ResolvedLoss({self.name})"


def import_loss_fn(path: str) -> LossFn:
    """``"package.module:function"`` (or ``"package.module.function"``) imported as a loss function.

    Raises:
        ValueError: the path does not import or does not name a callable.
    """
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"loss_fn {path!r} is not an import path; expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"loss_fn {path!r} does not import ({type(err).__name__}: {err}); expected 'package.module:function'"
        ) from None
    if not callable(fn):
        raise ValueError(f"loss_fn {path!r} is a {type(fn).__name__}, not a callable (module, batch) -> loss")
    return fn


def check_loss_fn(loss_fn: LossFn | str | None) -> LossFn | None:
    """``loss_fn`` as a callable (an import path imported), checked early in one line.

    Raises:
        ValueError: a path that does not import, something not callable, or an ``nn.Module`` such as
            ``nn.CrossEntropyLoss()`` (a loss of predictions and targets, not of the module and a batch).
    """
    if isinstance(loss_fn, str):
        return import_loss_fn(loss_fn)
    if isinstance(loss_fn, nn.Module):
        raise ValueError(
            f"loss_fn is an nn.Module ({type(loss_fn).__name__}), a loss of (predictions, targets), not of (module, "
            f"batch). {_HOW}"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(
            "loss_fn must be a callable (module, batch) -> loss or an import path 'package.module:function', "
            f"got {loss_fn!r}"
        )
    return loss_fn


def check_loss_method(loss_method: str | None) -> str | None:
    """``None`` (the rule above) or a method name; one clear line otherwise."""
    if loss_method is not None and (not isinstance(loss_method, str) or not loss_method.isidentifier()):
        raise ValueError(
            "loss_method must be None (the module's loss(batch), else its training_step) or the name of a method of "
            f"the module, got {loss_method!r}"
        )
    return loss_method


# --- what a signature accepts ---------------------------------------------------------------
def accepts(fn: Callable[..., Any], n: int) -> bool:
    """Whether ``fn`` can be called with ``n`` positional arguments (and nothing else); ``True`` when
    its signature cannot be read (a builtin): the first-batch check decides then."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in positional)
    if any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in params):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return required <= n
    return required <= n <= len(positional)


def _lightning_module_class(module: nn.Module) -> type | None:
    """Lightning's ``LightningModule`` class when ``module`` is one, found in its class's MRO (this layer is
    pure torch and does not import Lightning), else ``None``."""
    return next(
        (
            c
            for c in type(module).__mro__
            if c.__name__ == "LightningModule" and c.__module__ == "lightning.pytorch.core.module"
        ),
        None,
    )


def _own_training_step(module: nn.Module) -> Callable[..., Any] | None:
    """The module's ``training_step`` when it is a LightningModule that defines one."""
    base = _lightning_module_class(module)
    if base is not None and type(module).training_step is not base.training_step:  # type: ignore[attr-defined]
        return module.training_step  # type: ignore[return-value]
    return None


def _training_step_loss(module: nn.Module) -> ResolvedLoss | None:
    step = _own_training_step(module)
    if step is None:
        return None
    cls = type(module).__name__
    if accepts(step, 2):

        def call(m: nn.Module, batch: Any) -> Any:
            return _the_loss(m.training_step(batch, 0))  # type: ignore[operator]

        return ResolvedLoss(call, f"{cls}.training_step(batch, 0)", uses_training_step=True)
    if accepts(step, 1):

        def call1(m: nn.Module, batch: Any) -> Any:
            return _the_loss(m.training_step(batch))  # type: ignore[operator]

        return ResolvedLoss(call1, f"{cls}.training_step(batch)", uses_training_step=True)
    return None


def _the_loss(out: Any) -> Any:
    """A training step's loss: the tensor, or the ``"loss"`` of a dict (anything else is left for the caller to
    refuse)."""
    return out.get("loss", out) if isinstance(out, Mapping) else out


def _method_loss(module: nn.Module, name: str) -> tuple[ResolvedLoss | None, str]:
    """``module.<name>(batch)`` when that is a method taking one batch, else ``None`` and why not."""
    cls = type(module).__name__
    attr = getattr(module, name, None)
    if attr is None:
        return None, f"{cls} has no method {name!r}"
    if isinstance(attr, nn.Module):
        return (
            None,
            f"{cls}.{name} is an nn.Module ({type(attr).__name__}), a loss of (predictions, targets), not of a batch",
        )
    if not callable(attr):
        return None, f"{cls}.{name} is a {type(attr).__name__}, not a method"
    if not accepts(attr, 1):
        return None, f"{cls}.{name}{_signature(attr)} does not take one batch"
    return ResolvedLoss(lambda m, batch: getattr(m, name)(batch), f"{cls}.{name}(batch)"), ""


def _signature(fn: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return "(...)"


def one_batch_methods(module: nn.Module) -> list[str]:
    """The module's own public methods that take one batch, and ``training_step`` if it defines one:
    the values ``loss_method`` accepts for this module."""
    framework = set(dir(_lightning_module_class(module) or nn.Module))
    names: list[str] = []
    for cls in type(module).__mro__:
        for name, value in vars(cls).items():
            if name.startswith("_") or name in framework or name in names or not callable(value):
                continue
            if _method_loss(module, name)[0] is not None:
                names.append(name)
    if _training_step_loss(module) is not None:
        names.append("training_step")
    return names


def loss_candidates(
    module: nn.Module, loss_fn: LossFn | str | None = None, loss_method: str | None = None
) -> list[ResolvedLoss]:
    """The losses the rule allows for ``module``, in order (one unless both rules 3 and 4 apply).

    Raises:
        ValueError: a ``loss_fn`` that is no loss of (module, batch) (see ``check_loss_fn``); a
            ``loss_method`` that names no method taking one batch (the accepted names are listed).
        AttributeError: ``loss_method`` names nothing on the module; or neither is given and the
            module has no ``loss(batch)`` method and no ``training_step``.
    """
    cls = type(module).__name__
    if isinstance(loss_fn, ResolvedLoss):
        return [loss_fn]
    fn = check_loss_fn(loss_fn)
    if fn is not None:
        label = loss_fn if isinstance(loss_fn, str) else getattr(fn, "__qualname__", type(fn).__name__)
        return [ResolvedLoss(fn, f"loss_fn {label}")]
    check_loss_method(loss_method)
    if loss_method == "training_step":
        step = _training_step_loss(module)
        if step is None:
            raise AttributeError(f"{cls} has no training_step of its own taking (batch) or (batch, batch_idx). {_HOW}")
        return [step]
    if loss_method is not None:
        found, why = _method_loss(module, loss_method)
        if found is None:
            error = AttributeError if getattr(module, loss_method, None) is None else ValueError
            accepted = ", ".join(one_batch_methods(module)) or "none"
            raise error(f"{why}; loss_method accepts a method of {cls} that takes one batch: {accepted}. Or: {_HOW}")
        return [found]
    found, why = _method_loss(module, "loss")
    step = _training_step_loss(module)
    out = [c for c in (found, step) if c is not None]
    if not out:
        raise AttributeError(f"{why} and no training_step to measure with. {_HOW}, or give {cls} a loss(batch) method")
    return out


def resolve_loss(
    module: nn.Module, loss_fn: LossFn | str | None = None, loss_method: str | None = None
) -> ResolvedLoss:
    """The loss a measurement of ``module`` differentiates, by the rule above (the first candidate).

    Pass the result as ``loss_fn=`` to any function of ``bnlightning.callbacks.functional``: it is
    not resolved again. The callbacks resolve once at setup and check the result on the first batch.

    Raises:
        ValueError, AttributeError: see ``loss_candidates``.

    Example::

        loss = resolve_loss(model)            # model.loss(batch), else model.training_step(batch, 0)
        internal_covariate_shift(model, batch, sgd_update(0.1), loss_fn=loss)
    """
    return loss_candidates(module, loss_fn, loss_method)[0]


def as_loss(module: nn.Module, loss_fn: LossFn | None) -> ResolvedLoss:
    """What a measurement function was given as ``loss_fn``, as a ``ResolvedLoss`` (``None``: the rule)."""
    if isinstance(loss_fn, ResolvedLoss):
        return loss_fn
    return resolve_loss(module, loss_fn)


def how_to_pass_loss_fn() -> str:
    """The sentence every loss error ends with."""
    return _HOW
