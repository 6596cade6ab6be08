"""``torch_optimizer``: the functional layer unwraps Lightning's optimizer wrapper by its public ``.optimizer``."""

from __future__ import annotations

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer

from bnlightning.callbacks.functional._optimizer import torch_optimizer


def _sgd() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)


def test_a_lightning_optimizer_is_unwrapped_and_a_torch_optimizer_is_itself() -> None:
    sgd = _sgd()
    wrapped = LightningOptimizer(sgd)
    assert isinstance(wrapped, torch.optim.SGD)  # why a type check cannot tell them apart
    assert torch_optimizer(wrapped) is sgd
    assert torch_optimizer(sgd) is sgd


def test_a_torch_optimizer_that_wraps_another_is_not_unwrapped() -> None:
    class Lookahead(torch.optim.Optimizer):  # a wrapper with its own step and state: measured as itself
        def __init__(self, inner: torch.optim.Optimizer) -> None:
            self.optimizer = inner
            super().__init__(inner.param_groups, {})

    outer = Lookahead(_sgd())
    assert torch_optimizer(outer) is outer
