"""HessianSpectrum says what it measures: k against each block's size at setup, the sharpness ratio's
η with several parameter groups (one shared limit, or refused), why a ratio is NaN, accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlightning.callbacks import HessianSpectrum
from bnlightning.callbacks.hessian import sharpness_limit
from tests.callbacks.test_hessian import Tiny, _train


def test_sharpness_limit_per_parameter_group() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    assert sharpness_limit(torch.optim.SGD([a, b], lr=0.1, momentum=0.9)) == (pytest.approx(38.0), "")
    # Groups that differ only in what the limit does not depend on (weight decay) share it.
    shared = torch.optim.SGD([{"params": [a], "weight_decay": 5e-4}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    assert sharpness_limit(shared) == (pytest.approx(20.0), "")
    limit, why = sharpness_limit(torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.1))
    assert limit is None and "different limits" in why and "group 1: lr=0.01" in why
    limit, why = sharpness_limit(torch.optim.SGD([a], lr=0.1, momentum=0.9, nesterov=True))
    assert limit is None and "nesterov=True" in why and "the optimizer is SGD" not in why
    limit, why = sharpness_limit(torch.optim.Adam([a], lr=0.1))
    assert limit is None and why.endswith("the optimizer is Adam")


class TwoRates(Tiny):
    """Layer-wise learning rates: the first layer at 0.1, the rest at 0.02."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        first = list(self.net[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return torch.optim.SGD([{"params": first, "lr": 0.1}, {"params": rest, "lr": 0.02}])


def test_ratio_with_different_rates_per_group_is_nan_with_one_clear_warning() -> None:
    with pytest.warns(
        UserWarning, match=r"sharpness_ratio is logged as NaN: the parameter groups have different limits"
    ) as caught:
        rec = _train(TwoRates(), [HessianSpectrum(every_n_steps=2, n_probes=0)])
    assert sum("sharpness_ratio" in str(w.message) for w in caught) == 1  # once, not per measurement
    assert sorted(rec.logged) == [1, 3]
    for values in rec.logged.values():
        assert math.isnan(values["hessian/sharpness_ratio"]) and math.isfinite(values["hessian/lambda_max"])


@pytest.mark.parametrize(
    ("k", "layers", "what"),
    [
        (13, ["net.6"], "1 to 12 \\(the weight of layer 'net.6' has 12 entries\\)"),
        (200, None, "1 to 77 \\(Tiny has 77 trainable parameters\\)"),
    ],
)
def test_k_larger_than_a_block_fails_at_setup(k: int, layers: list[str] | None, what: str) -> None:
    # every_n_steps far beyond max_steps: only a setup-time check can raise.
    cb = HessianSpectrum(k=k, max_iter=max(k, 100), layers=layers, every_n_steps=1000, n_probes=0)
    with pytest.raises(ValueError, match=f"HessianSpectrum k: got {k}; accepted: an integer from {what}"):
        _train(Tiny(), [cb])


def test_accumulation_says_the_last_micro_batch_is_measured(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        rec = _train(Tiny(), [HessianSpectrum(every_n_steps=2, n_probes=0)], accumulate_grad_batches=2)
    said = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("HessianSpectrum: ")
    ]  # not the loss line
    assert len(said) == 1 and "last micro-batch" in said[0] and "accumulate_grad_batches=2" in said[0]
    assert sorted(rec.logged) == [1, 3]
