"""The torch optimizer behind what a hook receives (pure torch: Lightning is recognised, not imported).

Lightning hands callbacks a ``LightningOptimizer``, a wrapper whose class imitates the wrapped
optimizer's (``isinstance(wrapper, torch.optim.SGD)`` holds) and whose public ``optimizer`` property
returns the torch optimizer itself. ``torch_optimizer`` unwraps it through that property.
"""

from __future__ import annotations

from typing import Any

__all__ = ["torch_optimizer"]


def _is_lightning_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` is Lightning's ``LightningOptimizer`` (recognised by its class, so that
    this layer needs no import of Lightning; a torch optimizer that merely has an ``optimizer``
    attribute, such as a Lookahead-style wrapper, is not unwrapped)."""
    return any(
        c.__name__ == "LightningOptimizer" and c.__module__.split(".")[0] in ("lightning", "pytorch_lightning")
        for c in type(optimizer).__mro__
    )


def torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer a ``LightningOptimizer`` wraps (its public ``.optimizer``), else ``optimizer`` itself.

    Example::

        torch_optimizer(trainer.optimizers[0])  # a torch.optim.Optimizer, wrapped or not
    """
    return optimizer.optimizer if _is_lightning_optimizer(optimizer) else optimizer
