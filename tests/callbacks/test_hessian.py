"""HessianSpectrum and hessian_spectrum against the full Hessian of a tiny BN network in training mode."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from bnlightning.callbacks import HessianSpectrum
from bnlightning.callbacks.functional.hessian import edge_of_stability, hessian_spectrum
from tests.helpers.callbacks import Recorder


class Tiny(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3, 5),
            nn.BatchNorm1d(5),
            nn.Tanh(),
            nn.Linear(5, 4),
            nn.BatchNorm1d(4),
            nn.Tanh(),
            nn.Linear(4, 3),
        )
        self.optimizer = optimizer

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        if self.optimizer == "adagrad":  # no preconditioned stability limit defined: sharpness_ratio is NaN
            return torch.optim.Adagrad(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.5 if self.optimizer == "momentum" else 0.0)


def full_hessian(model: Tiny, batch: Any, names: list[str] | None = None) -> Tensor:
    """The Hessian over ``names`` (default all parameters), built entry by entry by torch.autograd.functional."""
    params = dict(model.named_parameters())
    names = names or list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    rng = torch.get_rng_state()

    def f(flat: Tensor) -> Tensor:
        torch.set_rng_state(rng)
        pieces = dict(zip(names, (p.view(s) for p, s in zip(flat.split(sizes), shapes))))
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        return _loss(model, {**params, **pieces, **buffers}, batch)

    flat = torch.cat([params[n].detach().flatten() for n in names])
    return torch.autograd.functional.hessian(f, flat)


def _loss(model: Tiny, tensors: dict[str, Tensor], batch: Any) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(
        functional_call(model.net, {k.removeprefix("net."): v for k, v in tensors.items()}, (x,)), y
    )


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_top_eigenvalues_and_trace_match_the_full_hessian() -> None:
    torch.manual_seed(0)
    model = Tiny().train()
    batch = _batch()
    H = full_hessian(model, batch)
    exact = torch.linalg.eigvalsh(H).flip(0)
    before = {n: b.clone() for n, b in model.named_buffers()}
    got = hessian_spectrum(model, batch, k=3, tol=1e-6, max_iter=300, n_probes=400, max_basis=30).metrics
    for j in range(3):
        assert got[f"hessian/eig_{j + 1}"].item() == pytest.approx(exact[j].item(), rel=1e-4), j
    assert got["hessian/lambda_max"] == got["hessian/eig_1"]
    assert abs(got["hessian/trace"].item() - H.trace().item()) <= 3 * got["hessian/trace_se"].item()
    assert exact[-1] < -0.1 * exact[0]  # indefinite: the algebraic order matters
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n  # BatchNorm in training mode, running statistics untouched


def test_layer_block_matches_the_block_of_the_full_hessian() -> None:
    torch.manual_seed(0)
    model = Tiny().train()
    batch = _batch()
    H = full_hessian(model, batch, ["net.3.weight"])
    got = hessian_spectrum(model, batch, k=1, tol=1e-6, max_iter=100, n_probes=0, layers=["net.3"], whole=False).metrics
    assert got["hessian/net.3/lambda_max"].item() == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-4)
    assert "hessian/lambda_max" not in got and "hessian/net.3/trace" not in got


def test_edge_of_stability_limits() -> None:
    p = [nn.Parameter(torch.zeros(1))]
    assert edge_of_stability(torch.optim.SGD(p, lr=0.1)) == pytest.approx(20.0)
    assert edge_of_stability(torch.optim.SGD(p, lr=0.1, momentum=0.9)) == pytest.approx(38.0)
    assert edge_of_stability(torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)) is None
    assert edge_of_stability(torch.optim.Adam(p, lr=0.1)) is None


def _train(model: Tiny, callbacks: list[Any], **kw: Any) -> Recorder:
    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randint(0, 3, (32,))
    rec = Recorder(("hessian",))
    pl.Trainer(
        max_steps=4,
        callbacks=callbacks,
        logger=rec,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    ).fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    return rec


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_callback_is_side_effect_free_and_logs_the_sharpness_ratio(optimizer: str) -> None:
    torch.manual_seed(0)
    base = Tiny(optimizer)
    plain, measured = copy.deepcopy(base), copy.deepcopy(base)
    _train(plain, [])
    rec = _train(measured, [HessianSpectrum(k=2, every_n_steps=2, n_probes=5, tol=1e-4)], precision="bf16-mixed")
    _train(plain2 := copy.deepcopy(base), [], precision="bf16-mixed")
    for (n, a), (_, b) in zip(plain2.state_dict().items(), measured.state_dict().items()):
        assert torch.equal(a, b), n
    assert sorted(rec.logged) == [1, 3]
    beta = 0.5 if optimizer == "momentum" else 0.0
    for values in rec.logged.values():
        assert values["hessian/sharpness_ratio"] == pytest.approx(
            values["hessian/lambda_max"] * 0.1 / (2 * (1 + beta)), rel=1e-6
        )
        assert values["hessian/eig_1"] >= values["hessian/eig_2"]
        assert math.isfinite(values["hessian/trace"]) and values["hessian/trace_se"] >= 0


def test_ratio_is_nan_with_a_warning_for_adagrad_and_arguments_are_checked() -> None:
    with pytest.warns(
        UserWarning, match="sharpness_ratio is logged as NaN: the ratio is defined for SGD .* the optimizer is Adagrad"
    ):
        rec = _train(Tiny("adagrad"), [HessianSpectrum(every_n_steps=4, n_probes=0)])
    assert math.isnan(rec.logged[3]["hessian/sharpness_ratio"]) and "hessian/trace" not in rec.logged[3]
    for bad in ({"k": 0}, {"tol": -1.0}, {"max_iter": 0}, {"n_probes": -2}, {"hvp_method": "fast"}, {"max_basis": 1}):
        with pytest.raises(ValueError):
            HessianSpectrum(**bad)  # type: ignore[arg-type]


def test_paper_scale_curvature_config_parses_and_starts(in_tmp: Any, fake_cifar10: Any) -> None:
    """configs/vgg.yaml + the curvature fragment on CIFAR-format files: it builds, trains and measures."""
    from bnlightning.cli import main
    from tests.helpers import CONFIGS, fake_cifar10_args

    cli = main(
        [
            "fit",
            "--config",
            str(CONFIGS / "vgg_bn.yaml"),
            "--config",
            str(CONFIGS / "experiments" / "measure_curvature.yaml"),
            "--trainer.max_steps",
            "2",
            "--trainer.callbacks.init_args.every_n_steps",
            "2",
            "--model.init_args.width",
            "0.125",
            *fake_cifar10_args(fake_cifar10),
            "--data.init_args.batch_size",
            "8",
            "--trainer.accelerator",
            "cpu",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, HessianSpectrum)]
    assert cli.trainer.global_step == 2 and cb.measurements == 1 and cb.k == 2


def test_jvp_hvp_trains_a_batchnorm_model_and_gives_the_retained_numbers() -> None:
    """Forward-over-reverse used to crash on BatchNorm in training mode (its running-stat update ran on a
    tensor captured by the transform); it must give the numbers of the default method."""
    kw = {"k": 2, "every_n_steps": 2, "n_probes": 3, "tol": 1e-5, "max_iter": 200}
    torch.manual_seed(0)
    base = Tiny()
    jvp = _train(copy.deepcopy(base), [HessianSpectrum(hvp_method="jvp", **kw)])
    retained = _train(copy.deepcopy(base), [HessianSpectrum(**kw)])
    assert sorted(jvp.logged) == sorted(retained.logged) == [1, 3]
    for step, values in retained.logged.items():
        for key in ("hessian/eig_1", "hessian/eig_2", "hessian/trace"):
            assert jvp.logged[step][key] == pytest.approx(values[key], rel=1e-4, abs=1e-6), (step, key)


@pytest.mark.parametrize("method", ["retained", "jvp"])
def test_hessian_operator_is_the_full_hessian_times_v_and_leaves_the_module_alone(method: str) -> None:
    from bnlightning.callbacks.functional.hessian import hessian_operator

    torch.manual_seed(0)
    model = Tiny().train()
    batch = _batch()
    names = [n for n, _ in model.named_parameters()]
    H = full_hessian(model, batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    with hessian_operator(model, batch, method=method) as hvp:
        assert list(hvp.point) == names
        for _ in range(2):
            v = {n: torch.randn(p.shape, generator=g) for n, p in hvp.point.items()}
            hv = hvp(v)
            got = torch.cat([hv[n].flatten() for n in names])
            want = H @ torch.cat([v[n].flatten() for n in names])
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        assert hvp.calls == 2
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k  # running statistics and weights untouched
    with pytest.raises(RuntimeError, match="after its `with hessian_operator"):
        hvp(v)


def test_trace_probes_follow_the_previous_variance_ratio() -> None:
    """``n_probes`` plain probes' standard error: ceil(n_probes · ratio) deflated probes, from 4 to n_probes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).train()
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))

    def loss_fn(module: nn.Module, b: Any) -> Tensor:
        return nn.functional.cross_entropy(module(b[0]), b[1])

    first = hessian_spectrum(net, batch, loss_fn=loss_fn)
    assert first.metrics["hessian/trace_probes"].item() == 20  # nothing known yet: n_probes
    ratio = first.metrics["hessian/trace_variance_ratio"].item()
    assert first.trace_ratios == {"": pytest.approx(ratio)} and 0 <= ratio < 1.5
    for given, probes in ((None, 20), (0.6, 12), (0.01, 4), (3.0, 20), (float("nan"), 20)):
        ratios = None if given is None else {"": given}
        got = hessian_spectrum(net, batch, loss_fn=loss_fn, trace_ratios=ratios).metrics
        assert got["hessian/trace_probes"].item() == probes, given
        assert got["hessian/hvps"].item() == got["hessian/iterations"].item() + probes
