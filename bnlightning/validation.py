"""Checks of the values a command line or config gives, made before anything trains.

jsonargparse checks types and each constructor checks its own arguments. What is left are
values whose valid range belongs to another library (a torch optimizer's ``lr``, Lightning's
``val_check_interval``, numpy's seed range), values no library refuses although they cannot
train (a NaN learning rate), and values that only make sense together with another object (a
callback's ``loss_method`` and the model). Without these checks they end in a traceback deep
in a training step, or in a run recorded as "diverged at step 1". Each failure here is one
:class:`~bnlightning.errors.RunError` line naming the value and what is accepted.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl

from bnlightning.errors import RunError

#: numpy's seed range, which ``lightning.seed_everything`` enforces.
SEED_MAX = 2**32 - 1
SEED_ACCEPTED = f"an integer from 0 to {SEED_MAX}, true (draw a seed) or false (no seeding)"
VAL_CHECK_ACCEPTED = (
    "a positive integer (every N training batches), a fraction of the epoch in (0.0, 1.0], or a duration 'DD:HH:MM:SS'"
)

# What jsonargparse's one-line report should say is accepted, for keys whose type alone does not say it.
_ACCEPTED = {"seed_everything": SEED_ACCEPTED}
_GOT_EXPECTED = re.compile(r"^(?P<key>[\w.]+): got (?P<value>.*); expected .*$")

# torch.optim's own lower bounds (SGD, Adam, AdamW, RMSprop, ...), plus: the value must be finite.
_NON_NEGATIVE = ("lr", "momentum", "weight_decay", "eps", "alpha", "lr_decay", "initial_accumulator_value")


def explain(line: str) -> str:
    """``line`` (a condensed jsonargparse error) with what is accepted, where the type does not say it.

    Example:
        >>> explain("seed_everything: got '1e+20'; expected an integer")
        "seed_everything: got '1e+20'; accepted: an integer from 0 to 4294967295, true (draw a seed) or false (no
        seeding)"
    """
    m = _GOT_EXPECTED.match(line)
    if m and m.group("key") in _ACCEPTED:
        return f"{m.group('key')}: got {m.group('value')}; accepted: {_ACCEPTED[m.group('key')]}"
    return line


def check_config(config: Any) -> None:
    """Check a parsed subcommand config (``seed_everything``, ``trainer``, the model's optimizer).

    Raises:
        RunError: one line naming the first bad value and what is accepted.
    """
    check_seed(config.get("seed_everything"))
    trainer = config.get("trainer")
    if trainer is not None:
        check_val_check_interval(trainer.get("val_check_interval"))
    init_args = _get(config.get("model"), "init_args")
    check_optimizer_args(_get(init_args, "optimizer"), "model.optimizer")


def check_seed(seed: Any) -> None:
    """``seed_everything`` must be a bool, None, or an integer numpy accepts (0 to 2**32 - 1)."""
    if seed is None or isinstance(seed, bool):
        return
    if not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise RunError(f"seed_everything: got {seed!r}; accepted: {SEED_ACCEPTED}")


def check_val_check_interval(value: Any) -> None:
    """``trainer.val_check_interval`` must be positive (Lightning divides by 0 and takes -1 for "an int")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # None, or a duration: Lightning parses and checks those itself
    if not value > 0 or (isinstance(value, float) and not (value <= 1 or value.is_integer())):
        raise RunError(f"trainer.val_check_interval: got {value!r}; accepted: {VAL_CHECK_ACCEPTED}")


def check_optimizer_args(optimizer: Any, key: str) -> None:
    """Every number among the optimizer's ``init_args`` finite, and torch's lower bounds met.

    torch checks ``lr < 0`` when the optimizer is built, inside ``trainer.fit``; it lets NaN
    through (``nan < 0`` is false), and the run then "diverges" at its first step.

    Args:
        optimizer: the config's optimizer entry (``class_path`` and ``init_args``), or anything else (ignored).
        key: how the config names it, for the message (``model.optimizer``).
    """
    init_args = _get(optimizer, "init_args")
    if init_args is None:
        return
    items = init_args.items() if isinstance(init_args, Mapping) else vars(init_args).items()
    for name, value in items:
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(_is_number(v) for v in values):
            continue
        if name == "betas":
            if not all(math.isfinite(v) and 0 <= v < 1 for v in values):
                raise RunError(f"{key}.{name}: got {value!r}; accepted: two numbers in [0, 1)")
        elif name in _NON_NEGATIVE and not all(math.isfinite(v) and v >= 0 for v in values):
            raise RunError(f"{key}.{name}: got {value!r}; accepted: a finite number >= 0")
        elif not all(math.isfinite(v) for v in values):
            raise RunError(f"{key}.{name}: got {value!r}; accepted: a finite number")


def check_objects(model: pl.LightningModule, callbacks: Iterable[pl.Callback]) -> None:
    """Checks that need the built objects: the optimizer builds on the model, callbacks' ``loss_method`` exists.

    Raises:
        RunError: one line naming the value and what is accepted.
    """
    check_optimizer_builds(model)
    check_loss_methods(model, callbacks)


def check_optimizer_builds(model: pl.LightningModule) -> None:
    """Build the model's optimizer once now, so torch's own checks (e.g. Nesterov needs momentum) fail before training.

    Only for modules that take their optimizer as a factory (``optimizer_factory``, as
    :class:`~bnlightning.models.base.BaseModule` does); building one allocates no state.
    """
    factory = getattr(model, "optimizer_factory", None)
    if not callable(factory):
        return
    try:
        optimizer = factory(model.parameters())
    except ValueError as err:
        raise RunError(f"model.optimizer: {err}") from err
    except Exception:  # e.g. an optimizer that needs the process group: built, and reported, in fit
        return
    del optimizer


def check_loss_methods(model: pl.LightningModule, callbacks: Iterable[pl.Callback]) -> None:
    """Each measurement callback's ``loss_method`` (when it has no ``loss_fn``) must be a method of ``model``.

    ``loss_method="loss"`` (the default) is left to the callback: without such a method it
    falls back to the module's ``training_step``.
    """
    for callback in callbacks:
        name = getattr(callback, "loss_method", None)
        if not isinstance(name, str) or getattr(callback, "loss_fn", None) is not None or name == "loss":
            continue
        if callable(getattr(model, name, None)):
            continue
        methods = batch_methods(model)
        accepted = ", ".join(methods) if methods else "none (it has no public method taking one argument)"
        raise RunError(
            f"{type(callback).__name__}.loss_method: got {name!r}; accepted: a method of {type(model).__name__} taking "
            f"one batch ({accepted}), or set loss_fn to 'package.module:function'"
        )


def batch_methods(model: pl.LightningModule) -> list[str]:
    """Public methods of ``model``'s class, beyond LightningModule's own, that take exactly one argument.

    Example:
        >>> from bnlightning.models import MLP
        >>> batch_methods(MLP(in_features=4, out_features=2, depth=1, width=3))
        ['loss']
    """
    lightning_names = set(dir(pl.LightningModule))
    names = []
    for name in dir(type(model)):
        if name.startswith("_") or name in lightning_names or not inspect.isfunction(getattr(type(model), name, None)):
            continue
        params = list(inspect.signature(getattr(type(model), name)).parameters.values())[1:]  # without self
        required = [
            p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(required) == 1:
            names.append(name)
    return names


def _get(obj: Any, key: str) -> Any:
    """``obj[key]`` for a dict or a jsonargparse ``Namespace``; None for anything else."""
    if isinstance(obj, Mapping):
        return obj.get(key)
    getter = getattr(obj, "get", None)
    return getter(key) if callable(getter) and hasattr(obj, "__dict__") else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
