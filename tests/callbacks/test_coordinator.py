"""The trainer's MeasurementCoordinator (G once per step), the two-step shape, and state keys from constructor
arguments."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

import bnlightning.callbacks.coordinator as coordinator_module
import bnlightning.callbacks.functional.ics as ics_fn
import bnlightning.callbacks.functional.landscape as landscape_fn
from bnlightning.callbacks import ActivationStats, HessianSpectrum, InternalCovariateShift, LossLandscape
from bnlightning.callbacks.coordinator import MeasurementCoordinator
from bnlightning.callbacks.twostep import MeasuredStep, TwoStepMeasurement
from tests.callbacks.test_trainer import MEASURED, train
from tests.helpers.callbacks import Recorder, mlp


def some_loss(module: torch.nn.Module, batch: Any) -> Tensor:
    return module.loss(batch)


# --- state_key ---------------------------------------------------------------------------------
def test_state_key_changes_with_every_constructor_argument() -> None:
    assert HessianSpectrum(k=2).state_key != HessianSpectrum(k=3).state_key
    assert HessianSpectrum(tol=1e-2).state_key != HessianSpectrum().state_key  # not only a hand-picked few
    assert HessianSpectrum(k=1, every_n_steps=100).state_key == HessianSpectrum().state_key == "HessianSpectrum{}"
    cb = HessianSpectrum(k=2)
    key = cb.state_key
    cb.k = 3  # reassigned after construction: the key follows
    assert cb.state_key != key and "'k': 3" in cb.state_key
    cb.k = 1
    assert cb.state_key == HessianSpectrum().state_key


def test_state_key_is_the_same_in_every_process() -> None:
    cb = LossLandscape(step_sizes=[1.0, 2.0], loss_fn=some_loss)
    assert f"'loss_fn': '{__name__}:some_loss'" in cb.state_key  # by import path, not by address
    assert copy.deepcopy(cb).state_key == cb.state_key == pickle.loads(pickle.dumps(cb)).state_key
    assert LossLandscape(loss_fn=f"{__name__}:some_loss").state_key != LossLandscape().state_key


def test_callbacks_of_one_type_with_different_arguments_train_together() -> None:
    a, b = LossLandscape(every_n_steps=2), LossLandscape(every_n_steps=2, loss_fn=some_loss)
    train(mlp("batch"), [a, b], steps=2)  # Lightning refuses two stateful callbacks with one state key
    assert a.measurements == b.measurements == 1


# --- the coordinator ---------------------------------------------------------------------------
@pytest.fixture
def gradient_passes(monkeypatch) -> list[str]:
    """Every pass that computes G: the coordinator's, and each function's own first pass."""
    passes: list[str] = []
    for module, name in (
        (coordinator_module, "step_gradient"),
        (ics_fn, "gradient_pass"),
        (landscape_fn, "gradient_pass"),
    ):
        original = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _o=original, _n=module.__name__, **k: passes.append(_n) or _o(*a, **k)
        )
    return passes


@pytest.mark.parametrize("update_from", ["trainer", "measured"])
@pytest.mark.parametrize("ics_first", [True, False])
def test_two_callbacks_needing_g_on_one_step_compute_it_once(
    gradient_passes: list[str], update_from: str, ics_first: bool
) -> None:
    ics, land = InternalCovariateShift(every_n_steps=2, update_from=update_from), LossLandscape(every_n_steps=2)
    trainer = train(mlp("noisy_batch"), [ics, land] if ics_first else [land, ics], steps=4)
    assert ics.measurements == land.measurements == 2  # steps 1 and 3
    assert gradient_passes == [coordinator_module.__name__] * 2  # one G per measured step, nobody else's
    coordinator = MeasurementCoordinator.of(trainer)
    assert coordinator.gradient_passes == 2 and ics.coordinator is land.coordinator is coordinator
    assert [type(cb) for cb in coordinator.callbacks] == [type(cb) for cb in trainer.callbacks if cb in (ics, land)]


def test_one_callback_alone_registers_and_computes_its_own_g(gradient_passes: list[str]) -> None:
    ics = InternalCovariateShift(every_n_steps=2)
    trainer = train(mlp("batch"), [ics, ActivationStats(every_n_steps=2)], steps=4)
    coordinator = MeasurementCoordinator.of(trainer)
    assert ics.coordinator is coordinator and ics in coordinator.callbacks
    assert coordinator.gradient_passes == 0 and gradient_passes == [ics_fn.__name__] * 2


def test_callbacks_with_different_losses_do_not_share_g(gradient_passes: list[str]) -> None:
    trainer = train(
        mlp("batch"),
        [InternalCovariateShift(every_n_steps=2, loss_fn=some_loss), LossLandscape(every_n_steps=2)],
        steps=2,
    )
    assert MeasurementCoordinator.of(trainer).gradient_passes == 0
    assert sorted(gradient_passes) == [ics_fn.__name__, landscape_fn.__name__]


def test_each_trainer_has_its_own_coordinator() -> None:
    a, b = pl.Trainer(logger=False), pl.Trainer(logger=False)
    assert MeasurementCoordinator.of(a) is MeasurementCoordinator.of(a) is not MeasurementCoordinator.of(b)


def test_a_random_draw_between_two_callbacks_does_not_change_what_they_measure() -> None:
    class Draw(pl.Callback):  # someone else's callback, between ours, drawing a random number on the measured step
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 1:
                torch.rand(1)

    logged = []
    for extra in ([], [Draw()]):
        torch.manual_seed(0)
        rec = Recorder(MEASURED)
        train(
            mlp("noisy_batch"),
            [LossLandscape(every_n_steps=2), *extra, InternalCovariateShift(every_n_steps=2), rec],
            steps=2,
        )
        logged.append(rec.logged[1])
    assert logged[0] == logged[1] and any(k.startswith("ics/") for k in logged[0])


# --- the two-step shape --------------------------------------------------------------------------
class StepLength(TwoStepMeasurement):
    """A user's own two-step measurement: ||W^(t+1) - W^t|| over every trainable parameter."""

    metric_prefix = "steplen"

    def before_step(self, step: MeasuredStep) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in step.module.named_parameters() if p.requires_grad}

    def after_step(self, step: MeasuredStep) -> dict[str, Tensor]:
        moved = [(p.detach() - step.kept[n]).pow(2).sum() for n, p in step.module.named_parameters() if n in step.kept]
        return {"steplen/norm": torch.stack(moved).sum().sqrt()}


def test_a_two_step_measurement_sees_the_step_the_trainer_took() -> None:
    lr = 0.05
    model = mlp("batch")
    model.optimizer_factory = lambda p: torch.optim.SGD(p, lr=lr)
    expected: dict[int, float] = {}

    class Reference(pl.Callback):  # plain SGD: the step is lr * grad
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            expected[trainer.global_step] = lr * torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()

    rec = Recorder(("steplen",))
    cb = StepLength(every_n_steps=2)
    train(model, [Reference(), cb, rec], steps=4)
    assert sorted(rec.logged) == [1, 3] and cb.measurements == 2
    for step, values in rec.logged.items():
        assert values["steplen/norm"] == pytest.approx(expected[step], rel=1e-5)
