"""max_overhead: every callback measures at least once and, on a fake clock, keeps its measurement time within
its share of the training time; the log schedule; bad budgets and schedules are one line at construction."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bnlightning.callbacks.base as base_module
import bnlightning.callbacks.twostep as twostep_module
from bnlightning.callbacks import (
    ActivationStats,
    HessianSpectrum,
    InternalCovariateShift,
    LossLandscape,
    MeanShift,
    ResidualVariance,
)
from bnlightning.callbacks._budget import is_scheduled, log_steps
from bnlightning.callbacks.guard import observer_guard
from tests.helpers.callbacks import Recorder

ALL = (InternalCovariateShift, LossLandscape, ActivationStats, HessianSpectrum, MeanShift, ResidualVariance)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(x) + self.shortcut(x)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), Block(), nn.Linear(6, 3))

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class FakeClock:
    """Time advances only when told: one unit per training step, ``cost`` units per measurement."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Tick(pl.Callback):
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.clock.t += 1.0


def _fit(callbacks: list[Any], steps: int, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, cost: float) -> Recorder:
    @contextlib.contextmanager
    def costly_guard(*args: Any, **kwargs: Any) -> Iterator[None]:
        with observer_guard(*args, **kwargs):
            yield
        clock.t += cost  # every measurement takes `cost` units of the fake clock

    monkeypatch.setattr(base_module, "observer_guard", costly_guard)
    monkeypatch.setattr(twostep_module, "observer_guard", costly_guard)  # both phases of a two-step measurement
    for cb in callbacks:
        cb.clock = clock
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = DataLoader(
        TensorDataset(torch.randn(8 * steps, 4, generator=g), torch.randint(0, 3, (8 * steps,), generator=g)),
        batch_size=8,
    )
    rec = Recorder()
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[Tick(clock), *callbacks],
        logger=rec,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), data)
    return rec


def test_every_callback_measures_and_the_budget_holds_on_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    cbs = [cls(every_n_steps=1, max_overhead=0.1) for cls in ALL]
    cbs[3].n_probes = 2  # HessianSpectrum: a short measurement (the fake clock charges every one the same)
    # a log of (step, own spent, training time) just after each measurement, read from the shared ledger
    seen: list[tuple[str, int, float, float]] = []
    for cb in cbs:
        original = cb.record

        def record(trainer: Any, metrics: dict, step: int | None = None, _cb: Any = cb, _orig: Any = original) -> None:
            ledger = _cb.overhead_ledger
            seen.append(
                (
                    type(_cb).__name__,
                    trainer.global_step if step is None else step,
                    ledger.spent[id(_cb)],
                    ledger.training_time(),
                )
            )
            _orig(trainer, metrics, step)

        cb.record = record
    rec = _fit(cbs, 100, clock, monkeypatch, cost=0.5)
    share = 0.1 / len(ALL)  # equal shares of the one budget
    for cb in cbs:
        name = type(cb).__name__
        mine = [s for s in seen if s[0] == name]
        assert cb.measurements >= 1 and mine[0][1] == 0, name  # the first on the first step: its cost is unknown before
        for _, step, spent, train in mine[1:]:
            assert spent <= share * train + 1e-9, (name, step, spent, train)  # every later one within its share
        assert cb.measurements == len(mine) < 100
    total = sum(cb.overhead_ledger.spent[id(cb)] for cb in cbs)
    assert total <= 0.1 * 100  # together within the one budget over the run
    assert sum(cb.measurements for cb in cbs) > len(ALL)  # the budget bought more than the first measurements
    steps = sorted(s for s, v in rec.logged.items() if "hessian/cost_steps" in v)
    assert steps and steps[0] == 0
    later = [rec.logged[s]["hessian/cost_steps"] for s in steps[1:]]
    assert later and all(
        v == pytest.approx(0.5) for v in later
    )  # a measurement of 0.5 units = half a training step of 1 unit


def test_without_a_budget_nothing_changes_and_no_cost_is_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    cb = ActivationStats(every_n_steps=3)
    rec = _fit([cb], 9, clock, monkeypatch, cost=100.0)
    assert cb.measurements == 3 and sorted(rec.logged) == [2, 5, 8]
    assert not any("cost_steps" in k for v in rec.logged.values() for k in v)


def test_a_smaller_budget_is_kept_and_a_cheaper_callback_measures_more(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    big, small = ActivationStats(every_n_steps=1, max_overhead=0.2), MeanShift(every_n_steps=1, max_overhead=0.02)
    _fit([big, small], 100, clock, monkeypatch, cost=0.5)
    ledger = big.overhead_ledger
    assert ledger is small.overhead_ledger
    assert ledger.spent[id(big)] <= 0.1 * 100 and ledger.spent[id(small)] <= 0.02 * 100  # min(own, largest / n)
    assert big.measurements > small.measurements >= 1


def test_log_schedule() -> None:
    assert log_steps(130) == [1, 2, 3, 4, 6, 7, 8, 10, 13, 16, 20, 26, 32, 40, 51, 64, 80, 100, 126]
    proposed = [t + 1 for t in range(1000) if is_scheduled(t, 100, "log")]
    assert proposed == log_steps(1000)
    assert [t + 1 for t in range(300) if is_scheduled(t, 100, "fixed")] == [100, 200, 300]
    cb = HessianSpectrum(schedule="log")
    assert cb.is_measurement_step(0) and cb.is_measurement_step(9) and not cb.is_measurement_step(10)
    assert "schedule" in cb.state_key and "schedule" not in HessianSpectrum().state_key


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.5, -0.1, math.nan, math.inf, "0.1", True])
def test_bad_max_overhead_is_one_line_at_construction(cls: type, bad: Any) -> None:
    with pytest.raises(ValueError, match=r"^max_overhead must be None or a number in \(0, 1\).*got ") as err:
        cls(max_overhead=bad)
    assert "\n" not in str(err.value) and repr(bad) in str(err.value)


@pytest.mark.parametrize("cls", ALL)
def test_unknown_schedule_lists_the_accepted_ones(cls: type) -> None:
    with pytest.raises(ValueError, match=r"^unknown schedule 'cosine'; accepted: fixed, log$"):
        cls(schedule="cosine")
