"""The callbacks inside real Trainer runs on CPU: observer effect, precision, accumulation, DDP, errors, resume."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnlightning.callbacks import (
    ActivationStats,
    InternalCovariateShift,
    LossLandscape,
    internal_covariate_shift,
    sgd_update,
)
from tests.helpers.callbacks import Recorder, assert_same, batch_for, mlp, snapshot, vgg

TRAINER_KW: dict[str, Any] = dict(
    enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False, accelerator="cpu"
)


def loader(model: nn.Module, n: int = 48, batch_size: int = 8) -> DataLoader:
    x, y = batch_for(model, n=n, seed=3)
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def all_callbacks(n: int = 1) -> list[pl.Callback]:
    return [InternalCovariateShift(every_n_steps=n), LossLandscape(every_n_steps=n), ActivationStats(every_n_steps=n)]


MEASURED = ("ics", "landscape", "act")  # what the Recorder keeps


def train(model: pl.LightningModule, callbacks: list[Any], steps: int = 6, **kw: Any) -> pl.Trainer:
    torch.manual_seed(0)
    loggers = [c for c in callbacks if isinstance(c, Logger)]
    callbacks = [c for c in callbacks if not isinstance(c, Logger)]
    kw = {**TRAINER_KW, **kw}
    if loggers:
        kw.update(logger=loggers, log_every_n_steps=1)
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, **kw)
    trainer.fit(model, loader(model))
    return trainer


@pytest.mark.parametrize("norm", ["noisy_batch", "batch"])
def test_zero_observer_effect_bit_identical(norm: str) -> None:
    torch.manual_seed(0)
    base = mlp(norm)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    train(a, [])
    rec = Recorder(MEASURED)
    train(b, [*all_callbacks(1), rec])
    assert len(rec.logged) == 6 and any(k.startswith("ics/") for k in rec.logged[0])
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    for (na, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(ba, bb), na


def test_single_measurement_leaves_everything_equal() -> None:
    torch.manual_seed(0)
    model = mlp("noisy_batch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = batch_for(model)
    model.loss(batch).backward()
    opt.step()
    model.loss(batch).backward()
    trainer = pl.Trainer(max_steps=1, **TRAINER_KW)
    before = snapshot(model, opt)
    for cb in all_callbacks(1):
        cb.on_measurement_setup(trainer, model)  # layer resolution, as setup() does
        cb.on_train_start(trainer, model)  # a no-op now: ActivationStats hooks only its own pass
        out = cb.measure(trainer, model, batch, opt)  # deliberately without the guard
        assert out and all(v.dtype == torch.float32 for v in out.values())
        assert_same(before, snapshot(model, opt))
        cb.teardown(trainer, model, "fit")


def test_logged_values_match_the_function() -> None:
    torch.manual_seed(0)
    model = mlp("batch")
    seen: dict[str, Any] = {}

    class Peek(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 1:
                seen["batch"] = trainer_batch["b"]
                seen["ref"] = internal_covariate_shift(pl_module, trainer_batch["b"], sgd_update(0.05), mode="loop")

    trainer_batch: dict[str, Any] = {}

    class Stash(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            trainer_batch["b"] = batch

    rec = Recorder(MEASURED)
    model.optimizer_factory = lambda p: torch.optim.SGD(p, lr=0.05)
    train(model, [Stash(), InternalCovariateShift(every_n_steps=2, update_from="measured"), Peek(), rec], steps=4)
    assert sorted(rec.logged) == [1, 3]
    for k, v in seen["ref"].items():
        assert rec.logged[1][k] == pytest.approx(v.item(), rel=1e-4, abs=1e-6), k


def test_bf16_mixed_and_accumulation() -> None:
    torch.manual_seed(0)
    model = mlp("batch")
    rec = Recorder(MEASURED)
    cbs = all_callbacks(2)
    train(model, [*cbs, rec], steps=4, precision="bf16-mixed", accumulate_grad_batches=2)
    assert sorted(rec.logged) == [1, 3]
    values = rec.logged[3]
    assert {"ics/l2/net.fc2", "landscape/beta_eff", "act/net.act1/q50", "act/net.act1/saturated"} <= set(values)
    assert all(math.isfinite(v) for v in values.values())  # measured in float32
    assert all(cb.measurements == 2 for cb in cbs)


def test_vgg_trains_with_all_callbacks() -> None:
    torch.manual_seed(0)
    model = vgg("batch")
    rec = Recorder(MEASURED)
    train(
        model,
        [
            InternalCovariateShift(layers=["net.conv5", "net.conv7"], every_n_steps=2),
            LossLandscape(every_n_steps=2),
            ActivationStats(every_n_steps=2),
            rec,
        ],
        steps=2,
    )
    assert {"ics/cos/net.conv5", "ics/rel/net.conv7", "act/net.relu3/dead", "landscape/loss_max"} <= set(rec.logged[1])


class ManualModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = nn.Linear(16, 10)

    def loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.loss(batch))
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class AutoModule(ManualModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)


class NoLossModule(AutoModule):
    loss = None  # type: ignore[assignment]

    def training_step(self, batch, batch_idx):
        return None  # skips the step: no loss to measure either


def test_setup_errors() -> None:
    data = DataLoader(TensorDataset(torch.randn(16, 16), torch.randint(0, 10, (16,))), batch_size=8)
    for make in (InternalCovariateShift, LossLandscape, ActivationStats):
        with pytest.raises(MisconfigurationException, match="automatic optimization"):
            pl.Trainer(max_steps=1, callbacks=[make(every_n_steps=1)], **TRAINER_KW).fit(ManualModule(), data)
        with pytest.raises(
            AttributeError,
            match=(
                r"^AutoModule has no method 'objective'; "
                r"loss_method accepts a method of AutoModule that takes one batch: loss, training_step. "
                r"Or: Pass loss_fn="
            ),
        ):
            pl.Trainer(max_steps=1, callbacks=[make(every_n_steps=1, loss_method="objective")], **TRAINER_KW).fit(
                AutoModule(), data
            )
        none = (
            r"NoLossModule.training_step\(batch, 0\) returned NoneType; "
            r"the measurement needs a scalar loss tensor \(or a dict with 'loss'\)"
        )
        with pytest.raises(ValueError, match=rf"^\w+: no loss to measure on NoLossModule: {none}\. Pass loss_fn="):
            pl.Trainer(max_steps=1, callbacks=[make(every_n_steps=1)], **TRAINER_KW).fit(NoLossModule(), data)
    with pytest.raises(ValueError, match=r"unknown layer 'layer9'.*layer"):
        pl.Trainer(max_steps=1, callbacks=[InternalCovariateShift(layers=["layer9"])], **TRAINER_KW).fit(
            AutoModule(), data
        )
    with pytest.raises(ValueError, match="unknown layer"):
        pl.Trainer(max_steps=1, callbacks=[ActivationStats(layers=["nope"])], **TRAINER_KW).fit(AutoModule(), data)


@pytest.mark.parametrize(
    "make",
    [
        lambda: InternalCovariateShift(every_n_steps=0),
        lambda: InternalCovariateShift(update_from="next"),  # type: ignore[arg-type]
        lambda: InternalCovariateShift(mode="fast"),  # type: ignore[arg-type]
        lambda: InternalCovariateShift(layers=[]),
        lambda: LossLandscape(step_sizes=[1.0, 0.0]),
        lambda: LossLandscape(step_sizes=[-0.5]),
        lambda: LossLandscape(step_size_mode="rel"),  # type: ignore[arg-type]
        lambda: LossLandscape(chunk_size=0),
        lambda: ActivationStats(saturation_threshold=0),
        lambda: ActivationStats(every_n_steps=-3),
    ],
)
def test_constructor_validation(make) -> None:
    with pytest.raises(ValueError):
        make()


def test_foreign_module_defined_here() -> None:
    """A module that is not one of ours, with its loss under another name."""

    class Foreign(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU())
            self.head = nn.Linear(32, 10)

        def objective(self, batch):
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.body(x)), y)

        def training_step(self, batch, batch_idx):
            return self.objective(batch)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    model = Foreign()
    rec = Recorder(MEASURED)
    cbs = [
        InternalCovariateShift(every_n_steps=1, loss_method="objective"),
        LossLandscape(every_n_steps=1, loss_method="objective"),
        ActivationStats(every_n_steps=1, loss_method="objective"),
    ]
    data = DataLoader(TensorDataset(torch.randn(32, 16), torch.randint(0, 10, (32,))), batch_size=8)
    pl.Trainer(max_steps=2, callbacks=cbs, **{**TRAINER_KW, "logger": rec, "log_every_n_steps": 1}).fit(model, data)
    logged = rec.logged[1]
    assert {
        "ics/l2/body.0",
        "ics/cos/body.3",
        "ics/rel/head",
        "act/body.2/saturated",
        "act/body.4/dead",
        "landscape/grad_l2_max",
    } <= set(logged)
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
    )  # hooks removed after each pass


def test_state_dict_round_trip_and_checkpoint_resume(tmp_path) -> None:
    torch.manual_seed(0)
    model = mlp("batch")
    cb = LossLandscape(every_n_steps=2)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=4)
    kw = {**TRAINER_KW, "enable_checkpointing": True}
    pl.Trainer(max_steps=4, callbacks=[cb, ckpt], **kw).fit(model, loader(model))
    assert cb.measurements == 2 and cb.last_measured_step == 3
    clone = LossLandscape(every_n_steps=2)
    clone.load_state_dict(cb.state_dict())
    assert clone.state_dict() == cb.state_dict()
    resumed = LossLandscape(every_n_steps=2)
    pl.Trainer(max_steps=8, callbacks=[resumed], **TRAINER_KW).fit(
        mlp("batch"), loader(model), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert resumed.measurements == 4 and resumed.last_measured_step == 7


def test_compiled_module_needs_no_warning() -> None:
    """Measurements run compiled regions eagerly (the same function; tests/callbacks/test_loss.py)."""
    model = AutoModule()
    model.layer.compile()
    cb = LossLandscape(every_n_steps=1)
    trainer = pl.Trainer(max_steps=1, **TRAINER_KW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.setup(trainer, model, "fit")


def test_wandb_charts_are_built_from_history() -> None:
    import wandb

    cb = InternalCovariateShift(layers=["net.fc2", "net.fc3"])
    cb._layers = ["net.fc2", "net.fc3"]
    for step in (99, 199):
        for kind in ("l2", "cos", "rel"):
            for layer in cb._layers:
                cb.history.setdefault(f"ics/{kind}/{layer}", []).append((step, 0.5 if kind != "cos" else float("nan")))
    charts = cb.wandb_charts()
    assert set(charts) == {"charts/ics_l2", "charts/ics_cos", "charts/ics_rel"}
    assert all(isinstance(c, wandb.plot.CustomChart) for c in charts.values())
    land = LossLandscape()
    land.history = {"landscape/loss_min": [(9, 1.0)], "landscape/loss_max": [(9, 2.0)]}
    assert set(land.wandb_charts()) == {"charts/landscape_loss_band"}


def _logged_run(model: pl.LightningModule, callbacks: list[Any], steps: int = 4) -> dict[int, dict[str, float]]:
    """Every value the measurement callbacks hand to the loggers, by step."""
    rec = Recorder(MEASURED)
    train(model, [*callbacks, rec], steps=steps)
    return rec.logged


@pytest.mark.parametrize("make", [mlp, vgg])
def test_shared_gradient_gives_bit_identical_values(make, monkeypatch) -> None:
    import bnlightning.callbacks.coordinator as B

    torch.manual_seed(0)
    base = make("noisy_batch")
    passes: list[int] = []
    original = B.step_gradient
    monkeypatch.setattr(B, "step_gradient", lambda *a, **k: passes.append(1) or original(*a, **k))
    alone_ics = _logged_run(copy.deepcopy(base), [InternalCovariateShift(every_n_steps=2)])
    alone_land = _logged_run(copy.deepcopy(base), [LossLandscape(every_n_steps=2)])
    assert not passes  # measuring alone never goes through the coordinator
    both = _logged_run(copy.deepcopy(base), [InternalCovariateShift(every_n_steps=2), LossLandscape(every_n_steps=2)])
    assert len(passes) == 2  # one shared G per measured step (steps 1 and 3)
    assert sorted(both) == sorted(alone_ics) == [1, 3]
    for step in both:
        expected = {**alone_ics[step], **alone_land[step]}
        assert set(both[step]) == set(expected)
        for k, v in expected.items():
            assert both[step][k] == v or (math.isnan(v) and math.isnan(both[step][k])), k


def test_shared_gradient_is_dropped_each_step_and_not_computed_when_one_measures(monkeypatch) -> None:
    import bnlightning.callbacks.coordinator as B
    import bnlightning.callbacks.functional.ics as ics_fn

    torch.manual_seed(0)
    model = mlp("batch")
    shared: list[int] = []
    own: list[int] = []
    step = [-1]
    original, original_pass = B.step_gradient, ics_fn.gradient_pass
    ics, land = InternalCovariateShift(every_n_steps=2), LossLandscape(every_n_steps=3)

    class Check(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step[0] = trainer.global_step
            assert (
                ics.coordinator is None or not ics.coordinator.holds_gradient()
            )  # nothing survives into the next step

    monkeypatch.setattr(B, "step_gradient", lambda *a, **k: shared.append(step[0]) or original(*a, **k))
    monkeypatch.setattr(ics_fn, "gradient_pass", lambda *a, **k: own.append(1) or original_pass(*a, **k))
    train(model, [Check(), ics, land], steps=6)
    # ICS measures on steps 1, 3, 5; the landscape on 2, 5: only step 5 shares G.
    assert ics.coordinator is land.coordinator is not None
    assert shared == [5]
    assert len(own) == 2  # ICS computed G itself on steps 1 and 3 only
    assert not ics.coordinator.holds_gradient()


def test_shared_gradient_misses_when_state_changes_in_between(monkeypatch) -> None:
    import bnlightning.callbacks.functional.ics as ics_fn

    own: list[int] = []
    original_pass = ics_fn.gradient_pass
    monkeypatch.setattr(ics_fn, "gradient_pass", lambda *a, **k: own.append(1) or original_pass(*a, **k))

    class Meddle(pl.Callback):  # between the two: writes a weight in place (and undoes it), or draws a number
        # A weight write makes the shared G stale: ICS computes its own. A random draw does not: G comes
        # with the RNG state it was computed at, and ICS replays those draws for G'.
        def __init__(self, how: str) -> None:
            self.how = how

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self.how == "weight":
                with torch.no_grad():
                    pl_module.net.fc1.weight.add_(1.0)
                    pl_module.net.fc1.weight.sub_(1.0)
            elif self.how == "rng":
                torch.rand(1)

    for how, expected in (("none", 0), ("weight", 1), ("rng", 0)):
        own.clear()
        torch.manual_seed(0)
        train(
            mlp("batch"),
            [LossLandscape(every_n_steps=2), Meddle(how), InternalCovariateShift(every_n_steps=2)],
            steps=2,
        )
        assert len(own) == expected, how


def test_non_measured_steps_run_without_callback_hooks() -> None:
    torch.manual_seed(0)
    model = mlp("batch")
    hooked: list[int] = []

    class Look(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            hooked.append(sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pl_module.modules()))

    cbs = all_callbacks(2)
    train(model, [Look(), *cbs], steps=4)
    assert hooked == [0, 0, 0, 0] and cbs[2].measurements == 2
    key = cbs[0].state_key
    assert cbs[0].__dict__["_state_key_cache"] is key  # built once, then read from the cache
    cbs[0].every_n_steps = 3
    assert cbs[0].state_key != key and "3" in cbs[0].state_key
