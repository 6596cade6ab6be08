"""The loss landscape along the gradient (PROTOCOL §2, the paper's Fig. 4) as a pure function."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from bnlightning.callbacks.functional._batching import MODES, Engine, chunks, reduce_together, resolve_mode, run_members
from bnlightning.callbacks.functional._harness import LossHarness
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional._numerics import Reduce, float32, to_float32
from bnlightning.callbacks.functional.gradient import StepGradient, check_gradient, gradient_pass
from bnlightning.callbacks.functional.names import (
    LANDSCAPE_BETA_EFF,
    LANDSCAPE_GRAD_L2_MAX,
    LANDSCAPE_LOSS_MAX,
    LANDSCAPE_LOSS_MIN,
)

if TYPE_CHECKING:
    from bnlightning.callbacks.functional._state import RngState

Mode = Literal["auto", "vmap", "loop"]


def check_step_sizes(step_sizes: Sequence[float]) -> list[float]:
    """The step sizes as floats; one clear error for an empty grid or a non-positive or infinite entry."""
    steps = [float(s) for s in step_sizes]
    if not steps:
        raise ValueError("step_sizes must be a non-empty list of positive numbers")
    bad = [s for s in steps if not s > 0 or math.isinf(s)]
    if bad:
        raise ValueError(f"step sizes must be positive and finite, got {bad[0]} in {steps}")
    return steps


def loss_landscape(
    module: nn.Module,
    batch: Any,
    step_sizes: Sequence[float],
    *,
    loss_fn: LossFn | None = None,
    param_scale: Mapping[str, float] | None = None,
    mode: Mode = "auto",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    gradient: StepGradient | None = None,
    weights: Mapping[str, Tensor] | None = None,
    reduce: Reduce | None = None,
) -> dict[str, Tensor]:
    """Loss and gradient along the descent direction.

    With ``g = grad L(w)`` over every trainable parameter, evaluates the loss and the gradient at
    ``w - s * g`` for each ``s`` in ``step_sizes`` (same batch, same random draws, modules in their
    current mode, buffers untouched). Under DDP (``reduce``) g, every g_s and every loss are averaged
    over ranks first, so the direction and the numbers are those of the global batch.

    Args:
        module, batch, loss_fn: as in ``internal_covariate_shift``.
        step_sizes: positive step sizes ``s`` (absolute).
        param_scale: optional canonical name -> multiplier of ``s`` for that parameter (per-group
            learning rates); the displacement is then ``s * scale_p * g_p``.
        mode: ``loop`` (one pass per step size; each gradient is reduced to its distance from g as it
            is produced, so the loop holds g, one displaced point and one gradient tensor), ``vmap``,
            or ``auto``: a loop for networks with convolutions, else vmap in chunks that fit
            ``memory_budget``, else the loop.
        chunk_size: at most this many step sizes per vmap call.
        memory_budget: bytes ``auto`` may use for batched members (see ``internal_covariate_shift``).
        gradient: ``step_gradient(...)`` of this module, batch, weights and RNG state: used as ``g``.
        weights: canonical name -> w when the module does not hold it.
        reduce: mean over ranks (DDP).

    Returns:
        ``landscape/loss_min``, ``landscape/loss_max`` (over the grid), ``landscape/grad_l2_max`` =
        max_s ||g - g_s||_2 and ``landscape/beta_eff`` = max_s ||g - g_s||_2 / ||displacement_s||_2,
        as 0-dim float32 tensors; a NaN anywhere shows as NaN (``Tensor.max`` propagates it).
    """
    steps = check_step_sizes(step_sizes)
    model = LossHarness(module, loss_fn)
    if weights is not None:
        model.values.update({n: float32(w) for n, w in weights.items()})
    engine = resolve_mode(mode, model, MODES, chunk_size)
    batch = to_float32(batch)
    with model.session() as rng:
        if gradient is None:
            gradient = gradient_pass(model, model.trainable, batch, rng, reduce)
        check_gradient(model, gradient, model.trainable)
        line = _Line(model, batch, rng, gradient.grads, dict(param_scale or {}), reduce)
        losses, dists = _evaluate(line, steps, engine, gradient, chunk_size, memory_budget)
        ratios = dists / (
            torch.tensor(steps, dtype=torch.float32, device=dists.device) * line.displacement_norm().to(dists.device)
        )
        return {
            LANDSCAPE_LOSS_MIN: losses.min(),
            LANDSCAPE_LOSS_MAX: losses.max(),
            LANDSCAPE_GRAD_L2_MAX: dists.max(),
            LANDSCAPE_BETA_EFF: ratios.max(),
        }


@dataclass
class _Line:
    """The points w - s * direction along the gradient g, and what every pass needs.

    Attributes:
        model: the module as the measurement sees it (``values`` is w). batch: the float32 batch.
        rng: the RNG state every pass replays. g: canonical name -> g, every trainable parameter.
        scale: canonical name -> multiplier of s (per-group learning rates; 1 where absent).
        reduce: mean over ranks (DDP) of every gradient and loss.
    """

    model: LossHarness
    batch: Any
    rng: RngState
    g: dict[str, Tensor]
    scale: dict[str, float]
    reduce: Reduce | None
    names: list[str] = field(init=False)  # every trainable parameter
    direction: dict[str, Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.names = self.model.trainable
        # the displacement per unit s; no copy of g where it is g
        self.direction = {
            n: self.g[n] * self.scale[n] if self.scale.get(n, 1.0) != 1.0 else self.g[n] for n in self.names
        }

    def displacement_norm(self) -> Tensor:
        """||direction||_2 over every trainable parameter: ||displacement_s||_2 / s."""
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in self.direction.values()]))

    def point(self, s: float) -> dict[str, Tensor]:
        return {n: self.model.values[n] - s * self.direction[n] for n in self.names}

    def loss(self, ws: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
        """The loss with the trainable parameters ``ws`` and ``buffers``: vmap's member function."""
        return self.model.loss({**self.model.values, **ws, **buffers}, self.batch)


def _evaluate(
    line: _Line,
    steps: list[float],
    engine: Engine,
    gradient: StepGradient,
    chunk_size: int | None,
    memory_budget: int | None,
) -> tuple[Tensor, Tensor]:
    """The loss and ||g - g_s||_2 at every step size, by the loop or vmap (``engine``)."""
    return run_members(
        engine,
        "loss_landscape",
        line.model,
        gradient,
        weight_bytes=line.model.trainable_bytes(),
        members=len(steps),
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        batched=partial(_batched, line, steps),
        looped=partial(_looped, line, steps),
    )


def _looped(line: _Line, steps: list[float]) -> tuple[Tensor, Tensor]:
    """One pass per step size: the losses and the distances ||g - g_s||_2."""
    losses, dists = [], []
    for s in steps:
        loss_s, dist = _streamed(line, s) if line.reduce is None else _reduced(line, s)
        losses.append(loss_s)
        dists.append(dist)
    return torch.stack(losses), torch.stack(dists)


def _streamed(line: _Line, s: float) -> tuple[Tensor, Tensor]:
    """Loss and ||g - g_s||_2 at step size s, each gradient reduced to its squared distance from g as
    it is produced: the pass holds one gradient tensor at a time, never all of g_s."""
    acc: list[Tensor] = []
    loss_s, _, _ = line.model.gradient(
        line.names,
        line.batch,
        line.rng,
        overrides=line.point(s),
        consume=lambda n, gs: acc.append((line.g[n] - gs).pow(2).sum()),
    )
    return loss_s, torch.stack(acc).sum().sqrt()


def _reduced(line: _Line, s: float) -> tuple[Tensor, Tensor]:
    """Loss and ||g - g_s||_2 at step size s under DDP: g_s and the loss averaged over ranks (one call) first."""
    loss_s, gs, _ = line.model.gradient(line.names, line.batch, line.rng, overrides=line.point(s))
    gs, scalars = reduce_together(line.reduce, gs, {"loss": loss_s})
    return scalars["loss"], torch.stack([(line.g[n] - gs[n]).pow(2).sum() for n in line.names]).sum().sqrt()


def _batched(line: _Line, steps: list[float], size: int | None) -> tuple[Tensor, Tensor]:
    """The step sizes through vmap, ``size`` at a time: the losses and the distances ||g - g_s||_2."""
    losses, dists = [], []
    for chunk in chunks(len(steps), size):
        stacked = {
            n: torch.stack([line.model.values[n] - steps[i] * line.direction[n] for i in chunk]) for n in line.names
        }
        line.rng.restore()
        gs, ls = vmap(grad_and_value(line.loss), in_dims=(0, 0), randomness="same")(
            stacked, line.model.fresh_buffers(len(chunk))
        )
        gs, scalars = reduce_together(line.reduce, gs, {"loss": ls})
        losses.append(scalars["loss"])
        dists.append(torch.stack([(line.g[n] - gs[n]).pow(2).flatten(1).sum(1) for n in line.names]).sum(0).sqrt())
    return torch.cat(losses), torch.cat(dists)
