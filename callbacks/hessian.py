"""``HessianSpectrum``: curvature of the training loss during training (PROTOCOL §9)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from bnlightning.callbacks.base import MeasurementCallback
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional._model import resolve_layers
from bnlightning.callbacks.functional.hessian import HVP_METHODS, edge_of_stability, hessian_spectrum

__all__ = ["HessianSpectrum"]


class HessianSpectrum(MeasurementCallback):
    r"""Log the top Hessian eigenvalues, the trace and the sharpness ratio of the training loss.

    On the measured step's training batch, at the weights W^t (in ``on_before_optimizer_step``), with
    the training loss exactly as the other measurements take it (float32 outside autocast, BatchNorm in
    training mode with its running statistics untouched, the same random draws in every pass), H is
    reached only through Hessian-vector products: the top-k eigenvalues by thick-restart Lanczos
    (algebraic order: H is indefinite), warm-started from the previous measurement's eigenvectors; the
    trace by Hutchinson's estimator with Rademacher probes, deflated by those eigenvectors. Under DDP
    every HVP is averaged over ranks (the global-batch Hessian) and every rank draws the same vectors.

    Logged metrics:

    - ``hessian/lambda_max``, ``hessian/eig_<j>`` (j = 1..k): the top eigenvalues, descending
    - ``hessian/iterations``: HVPs the eigen solver used; ``hessian/converged``: 1 if every pair met ``tol``
    - ``hessian/trace``, ``hessian/trace_se``: Hutchinson's estimate and its standard error (``n_probes > 0``)
    - ``hessian/sharpness_ratio`` = λmax / (2(1+β)/η): 1 is the edge of stability (Cohen et al. 2021), for
      SGD with learning rate η and heavy-ball momentum β (β = 0 for plain SGD); NaN, with a one-time
      warning, for other optimizers (Adam's preconditioned limit is not λmax of H) or Nesterov/dampening
    - per layer in ``layers``: the same under ``hessian/<layer>/`` for the block of H of that layer's weight

    Args:
        k: how many top eigenvalues (>= 1).
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        tol: relative residual tolerance of each eigenpair (``||Hv - θv|| <= tol·|θ|``).
        max_iter: cap on the HVPs of the eigen solver per block.
        n_probes: Hutchinson probes for the trace (0 turns the trace off).
        layers: module names whose weight block is measured too (default none).
        warm_start: start from the previous measurement's eigenvectors (kept in memory, not in checkpoints).
        seed: seed of the random start vector and probes (the global RNG is never used).
        max_basis: Lanczos basis size (memory: ``max_basis + 1`` parameter-sized vectors; default 4 for k = 1).
        hvp_method: ``retained`` (one forward and backward, then one backward per HVP; the fastest
            measured), ``double_backward`` or ``jvp`` (forward-over-reverse; no retained graph).
        loss_fn: ``(module, batch) -> scalar loss`` or its import path (default: see ``loss_method``).
        loss_method: the module's method ``(batch) -> scalar loss`` (default: ``loss`` if it takes one
            batch, else ``training_step``; see ``MeasurementCallback``).

    Raises:
        ValueError: a bad argument; at setup, an unknown layer.
        MisconfigurationException: at setup, manual optimization, an unsupported strategy, LBFGS.

    Example::

        trainer = Trainer(callbacks=[HessianSpectrum(k=3, every_n_steps=200, n_probes=20)])
    """

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
    ) -> None:
        super().__init__(every_n_steps, loss_fn, loss_method)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol > 0 and math.isfinite(tol)):
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < k:
            raise ValueError(f"max_iter must be an integer >= k = {k}, got {max_iter!r}")
        if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 0:
            raise ValueError(f"n_probes must be an integer >= 0 (0: no trace), got {n_probes!r}")
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"unknown hvp_method {hvp_method!r}; accepted: {', '.join(HVP_METHODS)}")
        if max_basis is not None and (isinstance(max_basis, bool) or not isinstance(max_basis, int) or max_basis < k + 1):
            raise ValueError(f"max_basis must be None or an integer >= k + 1 = {k + 1}, got {max_basis!r}")
        self.k, self.tol, self.max_iter, self.n_probes = k, float(tol), max_iter, n_probes
        self.layers = list(layers) if layers else []
        self.warm_start, self.seed, self.max_basis, self.hvp_method = warm_start, seed, max_basis, hvp_method
        self._vectors: dict[str, list[dict[str, Tensor]]] = {}
        self._warned_ratio = False

    def _state_key_extra(self) -> dict[str, Any]:
        return {"k": self.k, "layers": self.layers}

    @override
    def on_measurement_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layers:
            resolve_layers(pl_module, self.layers)

    @override
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any) -> dict[str, Tensor]:
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
        )
        if self.warm_start:
            self._vectors = result.eigenvectors
        metrics = dict(result.metrics)
        limit = edge_of_stability(optimizer)
        if limit is None and not self._warned_ratio:
            self._warned_ratio = True
            warnings.warn(
                f"HessianSpectrum: hessian/sharpness_ratio is defined for SGD (with heavy-ball momentum); the optimizer is "
                f"{type(getattr(optimizer, '_optimizer', optimizer)).__name__}, so it is logged as NaN.",
                stacklevel=2,
            )
        metrics["hessian/sharpness_ratio"] = metrics["hessian/lambda_max"] / limit if limit is not None and "hessian/lambda_max" in metrics else torch.tensor(float("nan"))
        return metrics

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._vectors = {}

    @override
    def charts(self) -> dict[str, list[str]]:
        return {"hessian_eigenvalues": [f"hessian/eig_{j + 1}" for j in range(self.k)], "hessian_trace": ["hessian/trace"], "hessian_sharpness_ratio": ["hessian/sharpness_ratio"]}
