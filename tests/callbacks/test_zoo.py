"""The callbacks on models nobody here wrote, with common optimizers and trainer settings.

Per case (Lightning's demo Transformer with and without tied weights, torchvision ResNet-18 and
MobileNetV3-small, a block registered three times, Lightning's demo LSTM) and per optimizer
setting (SGD momentum with norm clipping, Adam with value clipping, AdamW with bf16-mixed and
norm clipping):

- every logged ICS and landscape value equals a plain reference computed here from model copies:
  W^t copied before the step, W^(t+1) the weights the trainer really reached, the real optimizer
  stepped on a copy (with Lightning's clipping done by hand) giving exactly those weights;
- training with all callbacks attached is bit-identical to training without them, including what
  the user's module logs and its torchmetrics state.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bnlightning.callbacks import ActivationStats, InternalCovariateShift, LossLandscape
from tests.helpers import TRAINER_KW as QUIET_KW
from tests.helpers.callbacks import Recorder
from tests.helpers.zoo import CASES, Case

STEPS = 2
OPTIMIZERS: dict[str, tuple[Any, dict[str, Any]]] = {
    "sgd_momentum_clip_norm": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), {"gradient_clip_val": 0.05}),
    "adam_clip_value": (
        lambda p: torch.optim.Adam(p, lr=1e-3),
        {"gradient_clip_val": 1e-3, "gradient_clip_algorithm": "value"},
    ),
    "adamw_bf16_clip_norm": (
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
        {"precision": "bf16-mixed", "gradient_clip_val": 0.5},
    ),
    "rmsprop_steplr_accumulate": (
        lambda p: _with_scheduler(torch.optim.RMSprop(p, lr=1e-3, momentum=0.5)),
        {"accumulate_grad_batches": 2},
    ),
}
HEAVY = ("resnet18", "mobilenet_v3_small")  # the last setting runs on the light models only (CI time)


def _with_scheduler(opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "optimizer": opt,
        "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), "interval": "step"},
    }


def _optimizer(made: Any) -> torch.optim.Optimizer:
    return made["optimizer"] if isinstance(made, dict) else made


TRAINER_KW: dict[str, Any] = {**QUIET_KW, "log_every_n_steps": 1}


class Capture(pl.Callback):
    """Placed last: W^t (a copy of the network), the optimizer state and .grad, the batch and the RNG
    state before each step; the weights right after it."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, Any]] = {}
        self._batch: Any = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.steps[trainer.global_step] = {
            "net": copy.deepcopy(pl_module.net),
            "rng": torch.get_rng_state(),
            "batch": self._batch,
            "opt": copy.deepcopy(optimizer.state_dict()),
            "grads": {n: p.grad.clone() for n, p in pl_module.net.named_parameters() if p.grad is not None},
        }

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step - 1 in self.steps:  # (accumulating: rewritten with the same weights until the next step)
            self.steps[trainer.global_step - 1]["after"] = {
                n: p.detach().clone() for n, p in pl_module.net.named_parameters()
            }


def run(case: Case, opt_name: str, callbacks: list[pl.Callback]) -> tuple[pl.LightningModule, Recorder]:
    make_opt, settings = OPTIMIZERS[opt_name]
    torch.manual_seed(0)
    module = case.build(make_opt)
    g = torch.Generator().manual_seed(1)
    batches = [case.batch(g) for _ in range(STEPS * settings.get("accumulate_grad_batches", 1))]
    rec = Recorder()
    pl.Trainer(max_steps=STEPS, callbacks=callbacks, logger=rec, **TRAINER_KW, **settings).fit(
        module, DataLoader(batches, batch_size=None)
    )
    return module, rec


# --- the plain references ------------------------------------------------------------------
def grads_at(case: Case, net: nn.Module, batch: Any, rng: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    torch.set_rng_state(rng)
    net.zero_grad()
    loss = case.loss(net, batch)
    loss.backward()
    return loss.detach(), {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in net.named_parameters()
    }


def weight_name(net: nn.Module, module_name: str) -> str:
    w = net.get_submodule(module_name).weight
    return next(n for n, p in net.named_parameters() if p is w)


def reference_ics(case: Case, cap: dict[str, Any], layers: list[str]) -> dict[str, Tensor]:
    """Per layer: a fresh copy of W^t whose Conv/Linear weights used earlier are set to W^(t+1).

    "Earlier" is the position in ``named_parameters()``, which for these models is the order of
    first use in the forward pass (a tied decoder weight is listed, and first used, as the embedding).
    """
    net, batch, rng, after = cap["net"], cap["batch"], cap["rng"], cap["after"]
    names = [n for n, _ in net.named_parameters()]
    updated = list(
        dict.fromkeys(weight_name(net, n) for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    )
    _, G = grads_at(case, copy.deepcopy(net), batch, rng)
    out = {}
    for layer in layers:
        own = weight_name(net, layer.removeprefix("net."))
        shifted = copy.deepcopy(net)
        with torch.no_grad():
            for p in updated:
                if p != own and names.index(p) < names.index(own):
                    shifted.get_parameter(p).copy_(after[p])
        _, G2 = grads_at(case, shifted, batch, rng)
        g, g2 = G[own].flatten().double(), G2[own].flatten().double()
        out[f"ics/l2/{layer}"] = (g - g2).norm()
        out[f"ics/cos/{layer}"] = g @ g2 / (g.norm() * g2.norm())
        out[f"ics/rel/{layer}"] = (g - g2).norm() / g.norm()
        out[f"__norm__/{layer}"] = g.norm()
    return out


def reference_landscape(case: Case, cap: dict[str, Any], lr: float, steps: list[float]) -> dict[str, Tensor]:
    net, batch, rng = cap["net"], cap["batch"], cap["rng"]
    _, g = grads_at(case, copy.deepcopy(net), batch, rng)
    losses, dists, ratios = [], [], []
    for s in steps:
        moved = copy.deepcopy(net)
        with torch.no_grad():
            for n, p in moved.named_parameters():
                p.sub_(s * lr * g[n])
        loss, gs = grads_at(case, moved, batch, rng)
        d = torch.sqrt(sum(((g[n].double() - gs[n].double()) ** 2).sum() for n in g))
        losses.append(loss.double())
        dists.append(d)
        ratios.append(d / torch.sqrt(sum(((s * lr * g[n].double()) ** 2).sum() for n in g)))
    return {
        "landscape/loss_min": min(losses),
        "landscape/loss_max": max(losses),
        "landscape/grad_l2_max": max(dists),
        "landscape/beta_eff": max(ratios),
    }


def real_step_on_a_copy(case_name: str, opt_name: str, cap: dict[str, Any], clip: bool = True) -> dict[str, Tensor]:
    """The real optimizer class stepped on a copy of W^t with the captured .grad, state and (by hand) Lightning's
    clipping."""
    make_opt, settings = OPTIMIZERS[opt_name]
    net = copy.deepcopy(cap["net"])
    for n, p in net.named_parameters():
        p.grad = cap["grads"][n].clone() if n in cap["grads"] else None
    opt = _optimizer(make_opt(net.parameters()))
    opt.load_state_dict(copy.deepcopy(cap["opt"]))
    if clip and "gradient_clip_val" in settings:
        params = [p for p in net.parameters() if p.grad is not None]
        if settings.get("gradient_clip_algorithm") == "value":
            torch.nn.utils.clip_grad_value_(params, settings["gradient_clip_val"])
        else:
            torch.nn.utils.clip_grad_norm_(params, settings["gradient_clip_val"])
    opt.step()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


MAX_REL_ERR: dict[str, float] = {}


@pytest.mark.parametrize(
    ("case_name", "opt_name"),
    [(c, o) for c in CASES for o in OPTIMIZERS if not (o == "rmsprop_steplr_accumulate" and c in HEAVY)],
)
def test_foreign_model_matches_references_and_trains_identically(case_name: str, opt_name: str) -> None:
    if case_name == "lstm" and "bf16" in opt_name:
        pytest.skip(
            "torch's CPU LSTM has no bf16 autocast kernel (oneDNN 'could not create a primitive descriptor'): "
            "training fails without callbacks too"
        )
    case = CASES[case_name]
    kw = {"every_n_steps": 1, "loss_fn": case.loss_fn}
    capture = Capture()
    cbs = [
        InternalCovariateShift(layers=case.layers, **kw),
        LossLandscape(**kw),
        ActivationStats(histogram=False, **kw),
        capture,
    ]
    plain, plain_rec = run(case, opt_name, [])
    measured, rec = run(case, opt_name, cbs)

    # zero observer effect: weights, buffers, the module's own logged values and metric states
    for (n, a), (_, b) in zip(plain.state_dict().items(), measured.state_dict().items()):
        assert torch.equal(a, b), n
    ours = ("ics/", "landscape/", "act/")
    theirs = {s: {k: v for k, v in m.items() if not k.startswith(ours)} for s, m in rec.logged.items()}
    assert {s: m for s, m in theirs.items() if m} == plain_rec.logged

    worst = 0.0
    for step, cap in capture.steps.items():
        # W^(t+1) the callback used is the real step: the optimizer stepped on a copy with the clipped gradient
        stepped = real_step_on_a_copy(case_name, opt_name, cap)
        for n, w in cap["after"].items():
            assert torch.equal(stepped[n], w), n
        logged = rec.logged[step]
        lr = cap["opt"]["param_groups"][0]["lr"]
        want = {**reference_ics(case, cap, case.layers), **reference_landscape(case, cap, lr, [0.5, 1.0, 2.0, 4.0])}
        for key, w in want.items():
            if key.startswith("__norm__"):
                continue
            got = logged[key]
            w = float(w)
            # ||G - G'|| is a difference of nearby float32 gradients: its error is on the scale of ||G||
            floor = 1e-5 * float(want[f"__norm__/{key.split('/', 2)[2]}"]) if key.startswith("ics/l2") else 1e-6
            assert abs(got - w) <= 1e-3 * abs(w) + floor, f"step {step} {key}: got {got:.8g}, reference {w:.8g}"
            if abs(w) > 1e-6:
                worst = max(worst, abs(got - w) / abs(w))
        assert any(k.startswith("act/") for k in logged)
    MAX_REL_ERR[f"{case_name}/{opt_name}"] = worst
    print(f"ZOO {case_name} {opt_name}: largest relative error {worst:.2e}")


def test_clipping_changes_the_step_the_ics_is_measured_for() -> None:
    """With clipping, the unclipped step is a different W^(t+1): the logged ICS is that of the clipped one."""
    case = CASES["resnet18"]
    capture = Capture()
    _, rec = run(case, "sgd_momentum_clip_norm", [InternalCovariateShift(layers=["net.fc"], every_n_steps=1), capture])
    cap = capture.steps[1]
    unclipped = real_step_on_a_copy("resnet18", "sgd_momentum_clip_norm", cap, clip=False)
    assert not torch.equal(unclipped["layer4.1.conv2.weight"], cap["after"]["layer4.1.conv2.weight"])
    wrong = reference_ics(case, {**cap, "after": unclipped}, ["net.fc"])["ics/l2/net.fc"]
    right = reference_ics(case, cap, ["net.fc"])["ics/l2/net.fc"]
    assert rec.logged[1]["ics/l2/net.fc"] == pytest.approx(float(right), rel=1e-3)
    assert not math.isclose(float(wrong), float(right), rel_tol=0.05)
