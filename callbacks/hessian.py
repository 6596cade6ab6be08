"""``HessianSpectrum``: curvature of the training loss during training (PROTOCOL §9)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from bnlightning.callbacks.base import MeasurementCallback
from bnlightning.callbacks.functional._hvp import check_hvp_method
from bnlightning.callbacks.functional._layers import resolve_layers
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional.gauges import adaptive_preconditioner, preconditioned_sharpness
from bnlightning.callbacks.functional.hessian import hessian_spectrum, sharpness_limit
from bnlightning.callbacks.functional.names import (
    HESSIAN_LAMBDA_MAX,
    HESSIAN_PRECOND_ITERATIONS,
    HESSIAN_PRECOND_LAMBDA_MAX,
    HESSIAN_SHARPNESS_RATIO,
    HESSIAN_TRACE,
    hessian_eig,
)

__all__ = ["HessianSpectrum", "sharpness_limit"]


class HessianSpectrum(MeasurementCallback):
    r"""Log the top Hessian eigenvalues, the trace and the sharpness ratio of the training loss.

    On the measured step's training batch, at the weights W^t (in ``on_before_optimizer_step``), with
    the training loss exactly as the other measurements take it (float32 outside autocast, BatchNorm in
    training mode with its running statistics untouched, the same random draws in every pass), H is
    reached only through Hessian-vector products: the top-k eigenvalues by thick-restart Lanczos
    (algebraic order: H is indefinite), warm-started from the previous measurement's eigenvectors; the
    trace by Hutchinson's estimator with Rademacher probes, deflated by the whole Lanczos basis. Under DDP
    every HVP is averaged over ranks (the global-batch Hessian) and every rank draws the same vectors.

    What H is, precisely: with dropout (or noisy BatchNorm), the loss with one fresh draw of the masks,
    the same draw in every HVP, not the masks training used on that step (the RNG state is the one at
    ``on_before_optimizer_step``, rewound afterwards). With ``accumulate_grad_batches > 1``, the Hessian
    of the *last micro-batch's* loss, not of the step's mean over micro-batches (a smaller batch is
    sharper: a larger λmax); ``sharpness_ratio`` is that λmax over the step's 2(1+β)/η, unscaled, and an
    info line at setup says so.

    Logged metrics:

    - ``hessian/lambda_max``, ``hessian/eig_<j>`` (j = 1..k): the top eigenvalues, descending
    - ``hessian/iterations``: HVPs the eigen solver used; ``hessian/converged``: 1 if every pair met ``tol``;
      ``hessian/hvps``: HVPs of H's measurement (eigen solver and trace probes); ``hessian/precond_iterations``:
      those of λmax(P⁻¹H) (Adam, AdamW, RMSprop)
    - ``hessian/trace``, ``hessian/trace_se``: the trace estimate and its standard error (``n_probes > 0``);
      ``hessian/trace_probes``: the probes it used; ``hessian/trace_variance_ratio``: a deflated probe's
      variance over a plain Hutchinson probe's (what the deflation bought; it sets the next measurement's probes)
    - ``hessian/sharpness_ratio`` = λmax / (2(1+β)/η): 1 is the edge of stability (Cohen et al. 2021), for
      SGD with learning rate η and heavy-ball momentum β (β = 0 for plain SGD), η and β as they are at the
      measured step. Several parameter groups are fine when they share 2(1+β)/η. For Adam and AdamW it is
      ``hessian/precond_lambda_max`` = λmax(P⁻¹H), P = diag(√v̂ + ε) of the step about to be taken
      (``functional.gauges.adaptive_preconditioner``), over (2 + 2β₁)/(η(1 − β₁)) (38/η at β₁ = 0.9;
      Cohen et al. 2022); for RMSprop over 2(1+β)/η. NaN, with a one-time warning saying why
      (``sharpness_limit``), for SGD groups with different 2(1+β)/η, Nesterov or dampening, and any other
      optimizer (LBFGS, a custom class)
    - per layer in ``layers``: the same under ``hessian/<layer>/`` for the block of H of that layer's weight

    Args:
        k: how many top eigenvalues (>= 1).
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        tol: tolerance on each eigenvalue's relative error: Lanczos stops when ``min(r, 10·r²/gap) <= tol·|θ|``
            for every wanted Ritz pair (r its residual ``||Hv - θv||``; docs/curvature.md).
        max_iter: cap on the HVPs of the eigen solver per block.
        n_probes: the trace's accuracy, as the number of plain Hutchinson probes whose standard error it
            matches, and the most probes it takes (0 turns the trace off). The trace is deflated by the
            Lanczos basis; each measurement takes ``ceil(n_probes · r)`` probes (at least 4), r the variance
            ratio the previous measurement estimated (``hessian/trace_variance_ratio``), the first ``n_probes``.
        layers: module names whose weight block is measured too (default none).
        warm_start: start from the previous measurement's eigenvectors (kept in memory, not in checkpoints).
        seed: seed of the random start vector and probes (the global RNG is never used).
        max_basis: Lanczos basis size (memory: up to ``max_basis + 3`` parameter-sized vectors with the trace's
            probe and product; default 8 for k = 1).
        hvp_method: ``retained`` (one forward and backward, then one backward per HVP; the fastest
            measured), ``double_backward`` or ``jvp`` (forward-over-reverse; no retained graph; works
            with BatchNorm in training mode).
        loss_fn: ``(module, batch) -> scalar loss`` or its import path (default: see ``loss_method``).
        loss_method: the module's method ``(batch) -> scalar loss`` (default: ``loss`` if it takes one
            batch, else ``training_step``; see ``MeasurementCallback``).
        max_overhead: ``None``, or the fraction in (0, 1) of training time this callback's measurements may
            take: it then times them and skips scheduled steps to stay within it (shared fairly with the
            other budgeted callbacks; ``every_n_steps`` is the densest spacing) and logs ``hessian/cost_steps``.
        schedule: ``"fixed"`` (every ``every_n_steps`` steps) or ``"log"`` (about 10 steps per decade:
            1, 2, 3, 4, 6, 7, 8, 10, 13, 16, 20, ..., 100, 126, ...).

    Raises:
        ValueError: a bad argument; at setup, an unknown layer, or ``k`` larger than the network's
            trainable parameters or than a layer's weight (its block of H has that many eigenvalues).
        MisconfigurationException: at setup, manual optimization, an unsupported strategy, LBFGS.

    Example::

        trainer = Trainer(callbacks=[HessianSpectrum(k=3, every_n_steps=200, n_probes=20)])
    """

    metric_prefix = "hessian"

    def __init__(
        self,
        k: int = 1,
        every_n_steps: int = 100,
        tol: float = 1e-3,
        max_iter: int = 100,
        n_probes: int = 20,
        layers: list[str] | None = None,
        warm_start: bool = True,
        seed: int = 0,
        max_basis: int | None = None,
        hvp_method: str = "retained",
        loss_fn: LossFn | str | None = None,
        loss_method: str | None = None,
        max_overhead: float | None = None,
        schedule: str = "fixed",
    ) -> None:
        super().__init__(every_n_steps, loss_fn, loss_method, max_overhead, schedule)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol > 0 and math.isfinite(tol)):
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < k:
            raise ValueError(f"max_iter must be an integer >= k = {k}, got {max_iter!r}")
        if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 0:
            raise ValueError(f"n_probes must be an integer >= 0 (0: no trace), got {n_probes!r}")
        check_hvp_method(hvp_method)
        if max_basis is not None and (
            isinstance(max_basis, bool) or not isinstance(max_basis, int) or max_basis < k + 1
        ):
            raise ValueError(f"max_basis must be None or an integer >= k + 1 = {k + 1}, got {max_basis!r}")
        self.k, self.tol, self.max_iter, self.n_probes = k, float(tol), max_iter, n_probes
        self.layers = list(layers) if layers else []
        self.warm_start, self.seed, self.max_basis, self.hvp_method = warm_start, seed, max_basis, hvp_method
        self._vectors: dict[str, list[dict[str, Tensor]]] = {}
        self._trace_ratios: dict[str, float] = {}
        self._warned_ratio = False
        self._precond_vector: dict[str, Tensor] | None = None

    @override
    def on_measurement_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layers:
            resolve_layers(pl_module, self.layers)
        self._check_k_fits(pl_module)
        if trainer.accumulate_grad_batches > 1:
            rank_zero_info(
                f"HessianSpectrum: with accumulate_grad_batches={trainer.accumulate_grad_batches}, H is the Hessian of "
                "the last "
                f"micro-batch's loss, and hessian/sharpness_ratio compares its lambda_max with 2(1+beta)/eta."
            )

    def _check_k_fits(self, pl_module: pl.LightningModule) -> None:
        """``k`` eigenvalues need at least ``k`` parameters in every block measured: fail at setup, not at step t."""
        size = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        blocks = {f"{type(pl_module).__name__} has {size} trainable parameters": size}
        for layer in self.layers or []:
            weight = pl_module.get_submodule(layer).weight
            assert isinstance(weight, Tensor), "resolve_layers checked the layer has a weight"
            size = weight.numel()
            blocks[f"the weight of layer {layer!r} has {size} entries"] = size
        what, size = min(blocks.items(), key=lambda item: item[1])
        if self.k > size:
            raise ValueError(f"HessianSpectrum k: got {self.k}; accepted: an integer from 1 to {size} ({what})")

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any
    ) -> dict[str, Tensor]:
        result = hessian_spectrum(
            pl_module,
            batch,
            k=self.k,
            tol=self.tol,
            max_iter=self.max_iter,
            n_probes=self.n_probes,
            layers=self.layers,
            v0=self._vectors if self.warm_start else None,
            seed=self.seed + trainer.global_step,
            max_basis=self.max_basis,
            hvp_method=self.hvp_method,
            loss_fn=self.measured_loss(pl_module),
            reduce=self.reduce(trainer),
            trace_ratios=self._trace_ratios if self.warm_start else None,
        )
        if self.warm_start:
            self._vectors, self._trace_ratios = result.eigenvectors, result.trace_ratios
        metrics = dict(result.metrics)
        limit, why_not = sharpness_limit(optimizer)
        precond = adaptive_preconditioner(optimizer, pl_module) if limit is None else None
        if precond is not None:  # Adam, AdamW, RMSprop: λmax(P⁻¹H) against its own threshold (Cohen et al. 2022)
            lam, self._precond_vector, precond_hvps = preconditioned_sharpness(
                pl_module, batch, precond.diagonal, tol=self.tol, max_iter=self.max_iter,
                seed=self.seed + trainer.global_step, v0=self._precond_vector if self.warm_start else None,
                hvp_method=self.hvp_method,
                loss_fn=self.measured_loss(pl_module), reduce=self.reduce(trainer),
            )  # fmt: skip
            metrics[HESSIAN_PRECOND_LAMBDA_MAX] = lam
            metrics[HESSIAN_PRECOND_ITERATIONS] = torch.tensor(float(precond_hvps))
            metrics[HESSIAN_SHARPNESS_RATIO] = lam / precond.threshold
            return metrics
        if limit is None and not self._warned_ratio:
            self._warned_ratio = True
            warnings.warn(
                f"HessianSpectrum: hessian/sharpness_ratio is logged as NaN: {why_not} (Adam, AdamW and RMSprop get "
                "the preconditioned ratio).",
                stacklevel=2,
            )
        metrics[HESSIAN_SHARPNESS_RATIO] = (
            metrics[HESSIAN_LAMBDA_MAX] / limit
            if limit is not None and HESSIAN_LAMBDA_MAX in metrics
            else torch.tensor(float("nan"))
        )
        return metrics

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._vectors, self._trace_ratios = {}, {}
        self._precond_vector = None

    @override
    def charts(self) -> dict[str, list[str]]:
        return {
            "hessian_eigenvalues": [hessian_eig(j + 1) for j in range(self.k)],
            "hessian_trace": [HESSIAN_TRACE],
            "hessian_sharpness_ratio": [HESSIAN_SHARPNESS_RATIO],
        }
