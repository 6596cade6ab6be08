"""The stability gauges (PROTOCOL §12) against plain references: the explicit Hessian of a tiny BN
network in training mode, the explicit P⁻¹H, activation gradients read with ``retain_grad``, the
angle between two weight copies stepped by the real optimizer; and zero observer effect in a Trainer."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bnlightning.callbacks import (
    ActivationGradients,
    EffectiveLearningRate,
    GradientCurvature,
    HessianSpectrum,
    SpectralDensity,
    activation_gradients,
    adaptive_preconditioner,
    effective_lr,
    gradient_curvature,
    preconditioned_sharpness,
    spectral_density,
)
from bnlightning.callbacks.functional.gauges import scale_invariant_layers
from bnlightning.callbacks.functional.sld import density
from tests.callbacks.test_hessian import Tiny, _batch, full_hessian
from tests.helpers import TRAINER_KW
from tests.helpers.callbacks import Recorder, mlp


def flat(tensors: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([tensors[n].detach().flatten() for n in names]).double()


def full_gradient(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """Loss and gradient by ``.backward()`` on a deep copy (buffers of the copy move; the model's do not)."""
    twin = copy.deepcopy(model)
    loss = twin.loss(batch)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in twin.parameters()]).double()


# --- gradient-direction and update curvature ----------------------------------------------------
def test_gradient_and_update_curvature_match_the_explicit_hessian() -> None:
    torch.manual_seed(0)
    model, batch = Tiny().train(), _batch()
    names = [n for n, _ in model.named_parameters()]
    H = full_hessian(model, batch).double()
    loss0, g = full_gradient(model, batch)
    u = {n: 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
    after = {n: p.detach() + u[n] for n, p in model.named_parameters()}
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(after[n])
    loss1 = twin.loss(batch).detach()
    uf = flat(u, names)
    got = gradient_curvature(model, batch, next_weights=after)
    assert got["hessian/grad_curvature"].item() == pytest.approx((g @ H @ g / (g @ g)).item(), rel=1e-4)
    assert got["hessian/update_curvature"].item() == pytest.approx((uf @ H @ uf / (uf @ uf)).item(), rel=1e-4)
    assert got["hessian/predicted_change"].item() == pytest.approx((g @ uf + 0.5 * uf @ H @ uf).item(), rel=1e-4)
    assert got["hessian/actual_change"].item() == pytest.approx((loss1 - loss0).item(), rel=1e-4, abs=1e-7)


def test_callback_uses_the_real_step_and_logs_ratios_for_sgd() -> None:
    torch.manual_seed(0)
    model = Tiny("momentum")
    snaps = Snapshots()
    rec = _train(model, [GradientCurvature(every_n_steps=2), snaps], prefixes=("hessian",))
    assert sorted(rec.logged) == [1, 3]
    for step, values in rec.logged.items():
        before, after, batch = snaps.before[step], snaps.after[step], snaps.batch[step]
        at = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in at.named_parameters():
                p.copy_(before[n])
        names = list(before)
        H = full_hessian(at, batch).double()
        u = flat(after, names) - flat(before, names)
        assert values["hessian/update_curvature"] == pytest.approx((u @ H @ u / (u @ u)).item(), rel=1e-3)
        assert values["hessian/grad_curvature_ratio"] == pytest.approx(
            values["hessian/grad_curvature"] * 0.1 / (2 * 1.5), rel=1e-6
        )
        loss0, g = full_gradient(at, batch)
        with torch.no_grad():
            for n, p in at.named_parameters():
                p.copy_(after[n])
        assert values["hessian/predicted_change"] == pytest.approx((g @ u + 0.5 * u @ H @ u).item(), rel=1e-3)
        assert values["hessian/actual_change"] == pytest.approx(
            (at.loss(batch).detach() - loss0).item(), rel=1e-3, abs=1e-6
        )


# --- preconditioned sharpness -------------------------------------------------------------------
def stepped_twin(opt: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, list[Tensor]]:
    """The real optimizer stepped on a deep copy (the copy's parameters get the gradients deepcopy drops)."""
    twin = copy.deepcopy(opt)
    params = [p for g in twin.param_groups for p in g["params"]]
    for p, q in zip(params, [p for g in opt.param_groups for p in g["params"]]):
        p.grad = q.grad.clone()
    twin.step()
    return twin, params


def _stepped(make: Any, steps: int = 3) -> tuple[Tiny, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Tiny().train()
    opt = make(model.parameters())
    for i in range(steps):
        opt.zero_grad()
        model.loss(_batch()).backward()
        if i < steps - 1:
            opt.step()
    return model, opt


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_l2_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True, weight_decay=0.01),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_preconditioner_is_the_one_the_real_step_divides_by(name: str) -> None:
    model, opt = _stepped(OPTIMIZERS[name])
    pre = adaptive_preconditioner(opt, model)
    assert pre is not None and pre.name == type(opt).__name__
    twin_opt, twin_params = stepped_twin(
        opt
    )  # the real optimizer, stepped on a copy: the state it leaves is P's source
    group = twin_opt.param_groups[0]
    for (n, _), p in zip(model.named_parameters(), twin_params):
        s = twin_opt.state[p]
        if name == "rmsprop":
            expect = (s["square_avg"] - s["grad_avg"] ** 2).sqrt() + group["eps"]
        else:
            v = s["max_exp_avg_sq"] if group["amsgrad"] else s["exp_avg_sq"]
            expect = (v / (1 - group["betas"][1] ** float(s["step"]))).sqrt() + group["eps"]
        torch.testing.assert_close(pre.diagonal[n], expect, rtol=1e-5, atol=1e-9)
    b1 = group.get("betas", (0.0,))[0]
    expect_threshold = 2 * 1.5 / group["lr"] if name == "rmsprop" else (2 + 2 * b1) / (group["lr"] * (1 - b1))
    assert pre.threshold == pytest.approx(expect_threshold)


def test_preconditioned_sharpness_matches_the_explicit_p_inverse_h() -> None:
    model, opt = _stepped(OPTIMIZERS["adam"])
    P = flat(adaptive_preconditioner(opt, model).diagonal, [n for n, _ in model.named_parameters()])
    H = full_hessian(model, _batch()).double()
    exact = torch.linalg.eigvals(H / P.view(-1, 1)).real.max()  # P⁻¹H, not symmetrised
    lam, _, _ = preconditioned_sharpness(
        model, _batch(), adaptive_preconditioner(opt, model).diagonal, tol=1e-4, max_iter=200
    )
    assert lam.item() == pytest.approx(exact.item(), rel=1e-3)


def test_no_preconditioner_for_other_optimizers() -> None:
    p = [nn.Parameter(torch.zeros(2))]
    p[0].grad = torch.ones(2)
    model = nn.Linear(1, 1)
    for opt in (torch.optim.SGD(p, lr=0.1), torch.optim.Adagrad(p), torch.optim.LBFGS(p)):
        assert adaptive_preconditioner(opt, model) is None


def test_hessian_spectrum_logs_the_preconditioned_ratio_for_adam_and_warns_once_otherwise() -> None:
    rec = _train(Tiny("adam"), [HessianSpectrum(every_n_steps=2, n_probes=0, tol=1e-5)], prefixes=("hessian",))
    for values in rec.logged.values():
        assert values["hessian/sharpness_ratio"] == pytest.approx(
            values["hessian/precond_lambda_max"] * 1e-2 * 0.1 / 3.8, rel=1e-5
        )
    with pytest.warns(UserWarning, match="sharpness_ratio is logged as NaN: .*the optimizer is Adagrad") as record:
        rec = _train(Tiny("adagrad"), [HessianSpectrum(every_n_steps=1, n_probes=0)], prefixes=("hessian",))
    assert sum("sharpness_ratio" in str(w.message) for w in record) == 1
    assert all(math.isnan(v["hessian/sharpness_ratio"]) for v in rec.logged.values())


# --- activation gradients (Thm 4.1) --------------------------------------------------------------
class ConvBN(pl.LightningModule):
    """Conv -> BN -> ReLU(inplace) twice, then a linear head: an in-place op right after the read."""

    def __init__(self, norm: bool = True) -> None:
        super().__init__()
        bn = (lambda c: nn.BatchNorm2d(c)) if norm else (lambda c: nn.Identity())
        self.net = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            bn(3),
            nn.ReLU(inplace=True),
            nn.Conv2d(3, 4, 3, padding=1),
            bn(4),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 3),
        )

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


def naive_activation_gradients(model: nn.Module, batch: Any, positions: list[int]) -> dict[int, tuple[Tensor, Tensor]]:
    """Layer by layer on a copy (in-place ReLUs swapped for plain ones): ∂L/∂(input) and ∂L/∂(output) of each
    position."""
    twin = copy.deepcopy(model)
    x, y = batch
    seen: dict[int, tuple[Tensor, Tensor]] = {}
    h = x
    for i, layer in enumerate(twin.net):
        if isinstance(layer, nn.ReLU):
            layer = nn.ReLU()
        if i in positions:
            h = h.detach().requires_grad_(True) if i == 0 else h
            h.retain_grad()
            out = layer(h)
            out.retain_grad()
            seen[i] = (h, out)
            h = out
        else:
            h = layer(h)
    nn.functional.cross_entropy(h, y).backward()
    return {i: (a.grad, b.grad) for i, (a, b) in seen.items()}


def bound_by_hand(bn: nn.BatchNorm2d, x: Tensor, gy: Tensor) -> float:
    """Σ_j γ_j²/σ_j² (‖g_j‖² − ⟨1,g_j⟩²/m − ⟨g_j,ŷ_j⟩²/m), channel by channel."""
    total = 0.0
    for j in range(x.shape[1]):
        xj, gj = x[:, j].flatten().double(), gy[:, j].flatten().double()
        m = xj.numel()
        sigma = math.sqrt(xj.var(correction=0).item() + bn.eps)
        yhat = (xj - xj.mean()) / sigma
        total += bn.weight[j].item() ** 2 / sigma**2 * (gj.dot(gj) - gj.sum() ** 2 / m - gj.dot(yhat) ** 2 / m).item()
    return math.sqrt(total)


def test_activation_gradients_match_retain_grad_and_the_bound_holds() -> None:
    torch.manual_seed(0)
    model = ConvBN().train()
    with torch.no_grad():
        model.net[1].weight.uniform_(0.5, 2.0)
    batch = (torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,)))
    ref = naive_activation_gradients(model, batch, [1, 4])
    got = activation_gradients(model, batch, ["net.1", "net.4"])
    for i in (1, 4):
        gx, gy = ref[i]
        assert got[f"gradact/net.{i}/norm"].item() == pytest.approx(gy.norm().item(), rel=1e-5)
        assert got[f"gradact/net.{i}/input_norm"].item() == pytest.approx(gx.norm().item(), rel=1e-5)
        x = copy.deepcopy(model).net[:i](batch[0]).detach()
        assert got[f"gradact/net.{i}/bound"].item() == pytest.approx(bound_by_hand(model.net[i], x, gy), rel=1e-5)
        assert got[f"gradact/net.{i}/bound"].item() >= got[f"gradact/net.{i}/input_norm"].item() * (1 - 1e-6)
        assert got[f"gradact/net.{i}/bound"].item() == pytest.approx(gx.norm().item(), rel=1e-2)  # equality up to eps
        assert got[f"gradact/net.{i}/sigma"].item() == pytest.approx(
            (x.var((0, 2, 3), correction=0) + 1e-5).sqrt().mean().item(), rel=1e-5
        )
        assert got[f"gradact/net.{i}/gamma"].item() == pytest.approx(model.net[i].weight.abs().mean().item(), rel=1e-6)


def test_activation_gradients_without_normalization_at_the_same_positions() -> None:
    torch.manual_seed(0)
    model = ConvBN(norm=False)
    batch = (torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,)))
    ref = naive_activation_gradients(model, batch, [0, 3])
    got = activation_gradients(model, batch, ["net.0", "net.3"])
    assert set(got) == {"gradact/net.0/norm", "gradact/net.3/norm"}
    for i in (0, 3):
        assert got[f"gradact/net.{i}/norm"].item() == pytest.approx(ref[i][1].norm().item(), rel=1e-5)


# --- effective learning rate ---------------------------------------------------------------------
def test_scale_invariant_layers_are_the_ones_feeding_a_norm() -> None:
    assert scale_invariant_layers(Tiny(), _batch()) == ["net.0", "net.3"]
    assert scale_invariant_layers(ConvBN(norm=False), (torch.randn(2, 2, 5, 5), torch.zeros(2, dtype=torch.long))) == []


def test_angle_from_two_weight_copies_stepped_by_the_real_optimizer() -> None:
    model, opt = _stepped(OPTIMIZERS["adamw"])
    w0 = model.net[0].weight.detach().clone()
    w1 = stepped_twin(opt)[1][0].detach()
    cos = (w0.double().flatten() @ w1.double().flatten()) / (w0.double().norm() * w1.double().norm())
    got = effective_lr({"net.0": w0}, {"net.0": w1}, {"net.0": 1e-2})
    assert got["efflr/net.0/angle"].item() == pytest.approx(math.acos(cos.item()), rel=1e-5)
    assert got["efflr/net.0/norm"].item() == pytest.approx(w0.norm().item(), rel=1e-6)
    assert got["efflr/net.0/lr"].item() == pytest.approx(1e-2 / w0.double().norm().item() ** 2, rel=1e-6)
    same = effective_lr({"a": w0}, {"a": 3.0 * w0}, {"a": 0.1})
    assert same["efflr/a/angle"].item() == pytest.approx(0.0, abs=1e-6)  # scale changes, direction does not


def test_effective_lr_callback_reads_the_real_step() -> None:
    snaps = Snapshots()
    rec = _train(Tiny("momentum"), [EffectiveLearningRate(every_n_steps=2), snaps], prefixes=("efflr",))
    assert sorted(rec.logged) == [1, 3] and {k.split("/")[1] for k in rec.logged[1]} == {"net.0", "net.3"}
    for step, values in rec.logged.items():
        a, b = (
            snaps.before[step]["net.3.weight"].double().flatten(),
            snaps.after[step]["net.3.weight"].double().flatten(),
        )
        assert values["efflr/net.3/angle"] == pytest.approx(math.acos((a @ b / (a.norm() * b.norm())).item()), rel=1e-4)
        assert values["efflr/net.3/lr"] == pytest.approx(0.1 / (a @ a).item(), rel=1e-5)


# --- spectral density ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "running"])
def test_slq_moments_are_the_gauss_quadrature_of_the_explicit_hessian(mode: str) -> None:
    torch.manual_seed(0)
    model, batch = Tiny(), _batch()
    with torch.no_grad():  # running statistics that differ from the batch's
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm1d) and mode == "running":
            m.eval()
    H = full_hessian(ref, batch).double()
    steps = 4
    res = spectral_density(model, batch, lanczos_steps=steps, n_starts=2, norm_mode=mode, seed=3)
    assert res.hvps == 2 * steps and res.nodes.shape == (2, steps)
    gen = torch.Generator().manual_seed(3)
    for start in range(2):
        # the start: one flat draw over the parameters in their order (``_vectors.Layout.gaussian``)
        v = torch.randn(sum(p.numel() for p in model.parameters()), generator=gen).double()
        v = v / v.norm()
        for power in range(2 * steps):  # Gauss quadrature with m nodes is exact up to degree 2m - 1
            exact = v @ torch.linalg.matrix_power(H, power) @ v
            got = (res.weights[start] * res.nodes[start] ** power).sum()
            assert got.item() == pytest.approx(exact.item(), rel=1e-3, abs=1e-6 * float(H.abs().max()) ** power), (
                start,
                power,
            )
    grid = torch.linspace(-20, 20, 4001)
    assert torch.trapezoid(density(res.nodes, res.weights, grid, 0.5), grid).item() == pytest.approx(1.0, rel=1e-3)


def test_slq_extreme_ritz_values_reach_the_extreme_eigenvalues() -> None:
    model, batch = Tiny(), _batch()
    exact = torch.linalg.eigvalsh(full_hessian(model, batch).double())
    res = spectral_density(model, batch, lanczos_steps=25, n_starts=1)
    assert res.nodes.max().item() == pytest.approx(exact.max().item(), rel=1e-3)
    assert res.nodes.min().item() == pytest.approx(exact.min().item(), rel=1e-2)


# --- in the Trainer: zero observer effect, arguments ---------------------------------------------
class Snapshots(pl.Callback):
    """W^t, the batch and W^{t+1} of every step, read plainly around the real optimizer step."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, Tensor]] = {}
        self.after: dict[int, dict[str, Tensor]] = {}
        self.batch: dict[int, Any] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batch[trainer.global_step] = [t.clone() for t in batch]
        self.before[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.after[trainer.global_step - 1] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _train(
    model: pl.LightningModule, callbacks: list[Any], prefixes: tuple[str, ...] | None = None, steps: int = 4, **kw: Any
) -> Recorder:
    torch.manual_seed(0)
    x, y = batch_data(model)
    rec = Recorder(prefixes)
    pl.Trainer(max_steps=steps, callbacks=callbacks, logger=rec, **TRAINER_KW, **kw).fit(
        model, DataLoader(TensorDataset(x, y), batch_size=8)
    )
    return rec


def batch_data(model: nn.Module) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    if isinstance(model, Tiny):
        return torch.randn(32, 3, generator=g), torch.randint(0, 3, (32,), generator=g)
    return torch.randn(32, 16, generator=g), torch.randint(0, 10, (32,), generator=g)


def all_gauges() -> list[pl.Callback]:
    return [
        GradientCurvature(every_n_steps=1),
        ActivationGradients(every_n_steps=1),
        EffectiveLearningRate(every_n_steps=1),
        SpectralDensity(every_n_steps=2, lanczos_steps=3, n_starts=1),
        HessianSpectrum(every_n_steps=2, n_probes=0, max_iter=10),
    ]


@pytest.mark.parametrize(("norm", "optimizer"), [("noisy_batch", "sgd"), ("batch", "adamw")])
def test_zero_observer_effect_bit_identical(norm: str, optimizer: str) -> None:
    torch.manual_seed(0)
    base = mlp(norm)
    if optimizer == "adamw":
        base.optimizer_factory = lambda p: torch.optim.AdamW(p, lr=1e-2)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    _train(a, [])
    rec = _train(b, all_gauges(), prefixes=("hessian", "gradact", "efflr", "sld"))
    assert len(rec.logged) == 4 and any(k.startswith("sld/running/") for k in rec.logged[1])
    nan_for_adamw = ("hessian/grad_curvature_ratio", "hessian/update_curvature_ratio")  # defined for SGD only
    assert all(
        math.isfinite(v)
        for values in rec.logged.values()
        for k, v in values.items()
        if optimizer == "sgd" or k not in nan_for_adamw
    )
    assert optimizer == "sgd" or math.isfinite(rec.logged[1]["hessian/precond_lambda_max"])
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: GradientCurvature(hvp_method="fast"), "hvp_method"),
        (lambda: ActivationGradients(layers=[]), "layers"),
        (lambda: EffectiveLearningRate(layers="net.0"), "layers"),
        (lambda: SpectralDensity(lanczos_steps=1), "lanczos_steps"),
        (lambda: SpectralDensity(n_starts=0), "n_starts"),
        (lambda: SpectralDensity(norm_modes=["eval"]), "norm_modes"),
    ],
)
def test_bad_arguments_are_one_line(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_unknown_layer_is_named_at_setup() -> None:
    with pytest.raises(ValueError, match="net.nope"):
        _train(Tiny(), [ActivationGradients(layers=["net.nope"])], steps=1)


DDP_SCRIPT = """
import json, os, sys
import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset
from bnlightning.callbacks import EffectiveLearningRate, GradientCurvature, HessianSpectrum, SpectralDensity
from bnlightning.models import MLP

class Recorder(Logger):
    name, version = "memory", 0
    def __init__(self):
        super().__init__()
        self.logged = {}
    def log_hyperparams(self, *a, **k):
        pass
    def log_metrics(self, metrics, step=None):
        ours = {k: float(v) for k, v in metrics.items() if k.split("/")[0] in ("hessian", "efflr", "sld")}
        if ours:
            self.logged.setdefault(str(step), {}).update(ours)

if __name__ == "__main__":
    out, world = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = MLP(in_features=16, out_features=10, depth=2, width=16, activation="tanh", norm="none")
    model.optimizer_factory = lambda p: torch.optim.AdamW(p, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    rank, n = int(os.environ.get("LOCAL_RANK", 0)), 8 // world
    shard = torch.cat([torch.arange(8 * k + rank * n, 8 * k + (rank + 1) * n) for k in range(2)])
    cbs = [
        GradientCurvature(every_n_steps=2), EffectiveLearningRate(every_n_steps=2, layers=["net.fc1", "net.fc2"]),
        HessianSpectrum(every_n_steps=2, n_probes=0, tol=1e-5),
        SpectralDensity(every_n_steps=2, lanczos_steps=4, n_starts=1, norm_modes=["train"]),
    ]
    rec = Recorder()
    kw = dict(strategy="ddp", devices=world) if world > 1 else dict(devices=1)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", callbacks=cbs, logger=rec, log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         use_distributed_sampler=False, **kw)
    trainer.fit(model, DataLoader(TensorDataset(x[shard], y[shard]), batch_size=n))
    with open(os.path.join(out, f"w{world}-rank{trainer.global_rank}.json"), "w") as f:
        json.dump(rec.logged, f)
    if torch.distributed.is_initialized():  # Lightning destroys only NCCL groups; gloo's can abort the exit
        torch.distributed.destroy_process_group()
"""


def test_ddp_two_processes_log_the_global_batch_gauges(tmp_path: Any) -> None:
    """Without BN, the mean over 2 ranks of shard gradients, losses and HVPs is the full batch's: the same numbers as 1
    process."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_gauges.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    logged = {}
    for world in (2, 1):
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path), str(world)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        logged[world] = json.loads((tmp_path / f"w{world}-rank0.json").read_text())
    assert json.loads((tmp_path / "w2-rank1.json").read_text()) == {}  # only rank zero logs
    one, two = logged[1]["1"], logged[2]["1"]
    assert set(one) == set(two) and "hessian/precond_lambda_max" in one and "sld/train/node_3" in one
    for k, w in one.items():
        if math.isnan(w):
            assert math.isnan(two[k]), k
            continue
        tol = (
            1e-3
            if k.startswith(("sld/", "hessian/precond", "hessian/sharpness", "hessian/lambda", "hessian/eig"))
            else 1e-4
        )
        assert abs(two[k] - w) <= tol * abs(w) + 1e-6, f"{k}: 2 ranks {two[k]:.8g}, 1 process {w:.8g}"


def test_torchvision_resnet_trains_identically_and_the_gauges_find_its_layers() -> None:
    """A model nobody here wrote: torchvision's ResNet-18 (in-place ReLUs after BN, a downsample branch),
    loss read from its own ``training_step`` (a logged loss and a torchmetrics accuracy), AdamW."""
    import torchvision

    from tests.helpers.zoo import Classifier

    def build() -> Classifier:
        torch.manual_seed(0)
        return Classifier(torchvision.models.resnet18(num_classes=10), lambda p: torch.optim.AdamW(p, lr=1e-3))

    def fit(model: Classifier, callbacks: list[Any]) -> Recorder:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        rec = Recorder(("hessian", "gradact", "efflr", "sld"))
        torch.manual_seed(0)
        pl.Trainer(max_steps=2, callbacks=callbacks, logger=rec, **TRAINER_KW).fit(
            model, DataLoader(TensorDataset(x, y), batch_size=4)
        )
        return rec

    plain, measured = build(), build()
    fit(plain, [])
    gauges = [
        GradientCurvature(every_n_steps=2),
        ActivationGradients(every_n_steps=2),
        EffectiveLearningRate(every_n_steps=2),
        SpectralDensity(every_n_steps=2, lanczos_steps=2, n_starts=1),
    ]
    rec = fit(measured, gauges)
    for (n, a), (_, b) in zip(plain.state_dict().items(), measured.state_dict().items()):
        assert torch.equal(a, b), n
    logged = rec.logged[1]
    bns = [n for n, m in measured.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(f"gradact/{n}/bound" in logged for n in bns) and len(bns) == 20
    assert {"efflr/net.conv1/angle", "efflr/net.layer2.0.downsample.0/angle"} <= set(logged)  # every conv feeds a BN
    assert "efflr/net.fc/angle" not in logged
    assert all(math.isfinite(v) for k, v in logged.items() if not k.endswith("curvature_ratio"))  # those: SGD only
