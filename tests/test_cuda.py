"""The CUDA paths (``pytest -m cuda``; skipped without a GPU): mixed precision, CPU agreement, observer effect.

- bf16-mixed and 16-mixed (GradScaler) training of VGG-BN with every measurement callback
  attached: the values logged are those of the float32 functions on a CPU copy of the model
  and batch at the weights the trainer really had before and after the step (<= 1e-4 relative),
  and the gradients the step used were unscaled;
- each pure measurement in float32 on CUDA agrees with the same measurement on the CPU copy;
- zero observer effect: with deterministic kernels, training with every callback attached ends
  at bit-identical weights and buffers to training without.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

# cuBLAS reads this when its first handle is made; deterministic matmuls need it (torch docs,
# "Reproducibility"). Set before any CUDA work of this process.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnlightning.callbacks import (
    ActivationGradients,
    ActivationStats,
    EffectiveLearningRate,
    GradientCurvature,
    HessianSpectrum,
    InternalCovariateShift,
    LossLandscape,
    MeanShift,
    SpectralDensity,
    internal_covariate_shift,
    loss_landscape,
    sgd_update,
)
from bnlightning.callbacks.functional.hessian import hessian_spectrum
from tests.helpers.callbacks import Recorder, batch_for, mlp, vgg

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

RTOL = 1e-4
LR = 0.1
CUDA = torch.device("cuda")


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-6)


def assert_close_metrics(
    got: dict[str, Any], ref: dict[str, Any], rtol: float = RTOL, skip: tuple[str, ...] = ()
) -> None:
    assert set(got) == set(ref)
    worst = max(
        ((rel_err(float(got[k]), float(ref[k])), k) for k in ref if not any(s in k for s in skip)), default=(0.0, "")
    )
    assert worst[0] <= rtol, (
        f"{worst[1]}: cuda {float(got[worst[1]])} vs cpu {float(ref[worst[1]])} (rel {worst[0]:.2e})"
    )


def cuda_loader(model: nn.Module, n: int = 32, batch_size: int = 8) -> DataLoader:
    x, y = batch_for(model, n=n, seed=3)
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def every_callback(n: int) -> list[pl.Callback]:
    return [
        InternalCovariateShift(every_n_steps=n),
        LossLandscape(every_n_steps=n),
        ActivationStats(every_n_steps=n),
        HessianSpectrum(every_n_steps=n, max_iter=20, n_probes=2),
        MeanShift(every_n_steps=n, max_overhead=0.5),
        GradientCurvature(every_n_steps=n),
        ActivationGradients(every_n_steps=n),
        EffectiveLearningRate(every_n_steps=n),
        SpectralDensity(every_n_steps=n, lanczos_steps=4, n_starts=1),
    ]


def fit_cuda(
    model: pl.LightningModule,
    callbacks: list[Any],
    steps: int,
    precision: str = "32-true",
    loggers: list[Any] | None = None,
) -> None:
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        callbacks=callbacks,
        logger=loggers or False,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, cuda_loader(model))


# --- mixed precision ------------------------------------------------------------------------
class StepWitness(pl.Callback):
    """Keeps, at a given step, the batch, W^t and the gradients the optimizer applies, and W^(t+1)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.seen: dict[str, Any] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.seen["batch"] = [t.detach().cpu().clone() for t in batch]

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step == self.step:
            self.seen["before"] = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters()}
            self.seen["grads"] = {n: p.grad.detach().float().cpu().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step + 1:
            self.seen["after"] = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_vgg_with_every_callback_matches_cpu_float32(precision: str) -> None:
    torch.manual_seed(0)
    model = vgg("batch")
    model.optimizer_factory = lambda params: torch.optim.SGD(params, lr=LR)
    rec = Recorder(("ics", "landscape", "act", "hessian", "meanshift"))
    witness = StepWitness(step=3)
    fit_cuda(model, [witness, *every_callback(2)], steps=4, precision=precision, loggers=[rec])
    assert sorted(rec.logged) == [1, 3]
    assert all(math.isfinite(v) for v in rec.logged[3].values()), rec.logged[3]
    assert {k.split("/")[0] for k in rec.logged[3]} == {"ics", "landscape", "act", "hessian", "meanshift"}

    # The gradients the step used are unscaled: plain SGD moves W by exactly lr * grad, and under
    # 16-mixed a gradient still carrying GradScaler's scale would be 2**16 times too large.
    seen = witness.seen
    for name, grad in seen["grads"].items():
        moved = seen["before"][name] - seen["after"][name]
        assert torch.allclose(moved, LR * grad, rtol=1e-3, atol=1e-7), name
    assert any(g.abs().sum() > 0 for g in seen["grads"].values())

    # The logged ICS is the float32 function on a CPU copy at the trainer's real W^t and W^(t+1)
    # (buffers do not enter: training-mode BN normalises with the batch's statistics).
    cpu = copy.deepcopy(model).cpu()
    with torch.no_grad():
        for n, p in cpu.named_parameters():
            p.copy_(seen["before"][n])
    ref = internal_covariate_shift(cpu, tuple(seen["batch"]), next_weights=seen["after"], mode="loop")
    logged = {k: v for k, v in rec.logged[3].items() if k.startswith("ics/")}
    assert_close_metrics(logged, {k: v.item() for k, v in ref.items()})


# --- CUDA vs CPU, float32 --------------------------------------------------------------------
# Noisy BN is left out: its noise comes from the generator of the device the model is on (as in
# training), so a CPU copy draws other noise; its CUDA draws are covered by the observer-effect test.
@pytest.mark.parametrize("make", [lambda: vgg("batch"), lambda: mlp("batch")], ids=["vgg", "mlp"])
@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_float32_measurements_on_cuda_match_the_cpu_copy(make: Any, mode: str) -> None:
    torch.manual_seed(0)
    cpu = make()
    gpu = copy.deepcopy(cpu).to(CUDA)
    batch = batch_for(cpu, n=16)
    gbatch = tuple(t.to(CUDA) for t in batch)

    ref = internal_covariate_shift(cpu, batch, sgd_update(0.1), mode=mode)
    got = internal_covariate_shift(gpu, gbatch, sgd_update(0.1), mode=mode)
    assert_close_metrics({k: v.item() for k, v in got.items()}, {k: v.item() for k, v in ref.items()})

    steps = [0.05, 0.1, 0.2, 0.4]
    ref = loss_landscape(cpu, batch, steps, mode=mode)
    got = loss_landscape(gpu, gbatch, steps, mode=mode)
    assert_close_metrics({k: v.item() for k, v in got.items()}, {k: v.item() for k, v in ref.items()})


@pytest.mark.parametrize("make", [lambda: vgg("batch"), lambda: mlp("batch")], ids=["vgg", "mlp"])
def test_hessian_spectrum_on_cuda_matches_the_cpu_copy(make: Any) -> None:
    torch.manual_seed(0)
    cpu = make()
    gpu = copy.deepcopy(cpu).to(CUDA)
    batch = batch_for(cpu, n=16)
    gbatch = tuple(t.to(CUDA) for t in batch)
    kw = dict(k=1, tol=1e-7, max_iter=200, n_probes=4, seed=0)
    ref = hessian_spectrum(cpu, batch, **kw).metrics
    got = hessian_spectrum(gpu, gbatch, **kw).metrics
    # same seed -> same start and probes on both devices (a CPU generator); iteration counts may
    # differ by a restart, the values may not
    for key in ("hessian/lambda_max", "hessian/trace"):
        assert rel_err(got[key].item(), ref[key].item()) <= RTOL, (key, got[key].item(), ref[key].item())
    assert_close_metrics(
        {k: v.item() for k, v in got.items()}, {k: v.item() for k, v in ref.items()}, skip=("iterations", "converged")
    )


# --- observer effect ------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("norm", ["batch", "noisy_batch"])
def test_zero_observer_effect_on_cuda_with_deterministic_kernels(norm: str, precision: str) -> None:
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        torch.manual_seed(0)
        base = vgg(norm)
        a, b = copy.deepcopy(base), copy.deepcopy(base)
        fit_cuda(a, [], steps=4, precision=precision)
        rec = Recorder(("ics", "landscape", "act", "hessian", "meanshift", "gradact", "efflr", "sld"))
        fit_cuda(b, every_callback(1), steps=4, precision=precision, loggers=[rec])
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(rec.logged) == 4
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    for (na, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(ba, bb), na
