"""mode="auto" sizes vmap from the memory budget (and says so once); the streaming loop gives the vmap numbers;
bad loss_fn paths and closure optimizers are one clear line."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from bnlightning.callbacks import (
    InternalCovariateShift,
    LossLandscape,
    internal_covariate_shift,
    loss_landscape,
    sgd_update,
)
from bnlightning.callbacks.functional import _batching
from bnlightning.callbacks.functional._harness import LossHarness
from tests.helpers.callbacks import batch_for, mlp


def _count_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = LossHarness.gradient
    monkeypatch.setattr(LossHarness, "gradient", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


def test_auto_uses_vmap_when_it_fits_and_the_loop_when_not(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = mlp("batch").train()
    batch = batch_for(model, n=16)
    calls = _count_passes(monkeypatch)
    _batching._told.clear()
    with caplog.at_level(logging.INFO, logger="bnlightning.callbacks"):
        roomy = internal_covariate_shift(model, batch, sgd_update(0.1), memory_budget=1 << 30)
        assert len(calls) == 1  # G's pass; every G' in one vmap call
        tight = internal_covariate_shift(model, batch, sgd_update(0.1), memory_budget=1)
        assert len(calls) == 1 + 1 + 3  # G, then one pass per layer that has a layer before it
        internal_covariate_shift(model, batch, sgd_update(0.1), memory_budget=1)
    said = [r.getMessage() for r in caplog.records if "internal_covariate_shift(mode='auto')" in r.getMessage()]
    assert said == [
        "internal_covariate_shift(mode='auto') on MLP: vmap in chunks of 4",
        "internal_covariate_shift(mode='auto') on MLP: loop (vmap members do not fit the memory budget)",
    ]  # each choice said once
    for k in roomy:
        assert torch.allclose(roomy[k], tight[k], rtol=1e-5, atol=1e-7), k


def test_landscape_streaming_loop_equals_vmap() -> None:
    torch.manual_seed(0)
    model = mlp("noisy_batch").train()
    batch = batch_for(model, n=16)
    steps = [0.05, 0.1, 0.2, 0.4]
    loop = loss_landscape(model, batch, steps, mode="loop")
    vmapped = loss_landscape(model, batch, steps, mode="vmap")
    for k in loop:
        assert torch.allclose(loop[k], vmapped[k], rtol=1e-5, atol=1e-7), k


def test_bad_loss_fn_is_one_line_at_construction() -> None:
    with pytest.raises(ValueError, match=r"^loss_fn 'no_such_package.losses:f' does not import \(ModuleNotFoundError"):
        LossLandscape(loss_fn="no_such_package.losses:f")
    with pytest.raises(ValueError, match=r"loss_fn 'math' is not an import path"):
        InternalCovariateShift(loss_fn="math")
    with pytest.raises(ValueError, match=r"loss_fn 'math:pi' is a float, not a callable"):
        InternalCovariateShift(loss_fn="math:pi")
    assert LossLandscape(loss_fn="tests.helpers.callbacks:mlp").loss_fn == "tests.helpers.callbacks:mlp"


def test_closure_optimizer_is_refused_in_one_line() -> None:
    class WithLBFGS(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    for cb in (InternalCovariateShift(every_n_steps=1), LossLandscape(every_n_steps=1)):
        trainer = pl.Trainer(
            max_steps=1,
            callbacks=[cb],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        with pytest.raises(MisconfigurationException, match="LBFGS re-evaluates the loss inside its step"):
            trainer.fit(WithLBFGS(), data)
