"""The loss landscape along the gradient (PROTOCOL §2, the paper's Fig. 4) as a pure function."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from bnlightning.callbacks.functional._batching import MODES, chunks, resolve_mode, run_members
from bnlightning.callbacks.functional._harness import LossHarness
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional._numerics import Reduce, float32, reduce_dict, to_float32
from bnlightning.callbacks.functional.gradient import StepGradient, check_gradient, gradient_pass

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
        module: any module; ``loss_fn`` as in ``internal_covariate_shift``.
        batch: the batch.
        step_sizes: positive step sizes ``s`` (absolute).
        loss_fn: the loss (see ``internal_covariate_shift``).
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
    scale = dict(param_scale or {})
    names = model.trainable
    with model.session() as rng:
        if gradient is None:
            gradient = gradient_pass(model, names, batch, rng, reduce)
        check_gradient(model, gradient, names)
        g = {n: gradient.grads[n] for n in names}
        direction = {n: g[n] * scale[n] if scale.get(n, 1.0) != 1.0 else g[n] for n in names}  # no copy of g where it is g
        disp_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in direction.values()]))

        def point(s: float) -> dict[str, Tensor]:
            return {n: model.values[n] - s * direction[n] for n in names}

        def looped() -> tuple[Tensor, Tensor]:
            losses, dists = [], []
            for s in steps:
                if reduce is None:  # stream: each gradient becomes its squared distance from g at once
                    acc: list[Tensor] = []
                    loss_s, _, _ = model.gradient(names, batch, rng, overrides=point(s), consume=lambda n, gs: acc.append((g[n] - gs).pow(2).sum()))
                    dist = torch.stack(acc).sum().sqrt()
                else:
                    loss_s, gs, _ = model.gradient(names, batch, rng, overrides=point(s))
                    gs = reduce_dict({**gs, "__loss__": loss_s}, reduce)
                    loss_s = gs.pop("__loss__")
                    dist = torch.stack([(g[n] - gs[n]).pow(2).sum() for n in names]).sum().sqrt()
                losses.append(loss_s)
                dists.append(dist)
            return torch.stack(losses), torch.stack(dists)

        rest = {k: v for k, v in model.values.items() if k not in names}

        def batched(size: int | None) -> tuple[Tensor, Tensor]:
            losses, dists = [], []
            for chunk in chunks(len(steps), size):
                stacked = {n: torch.stack([model.values[n] - steps[i] * direction[n] for i in chunk]) for n in names}

                def f(ws: dict[str, Tensor], bufs: dict[str, Tensor]) -> Tensor:
                    return model.loss({**rest, **ws, **bufs}, batch)

                rng.restore()
                gs, ls = vmap(grad_and_value(f), in_dims=(0, 0), randomness="same")(stacked, model.fresh_buffers(len(chunk)))
                gs = reduce_dict({**gs, "__loss__": ls}, reduce)
                losses.append(gs.pop("__loss__"))
                dists.append(torch.stack([(g[n] - gs[n]).pow(2).flatten(1).sum(1) for n in names]).sum(0).sqrt())
            return torch.cat(losses), torch.cat(dists)

        losses, dists = run_members(
            engine,
            "loss_landscape",
            model,
            gradient,
            weight_bytes=model.trainable_bytes(),
            members=len(steps),
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            batched=batched,
            looped=looped,
        )
        ratios = dists / (torch.tensor(steps, dtype=torch.float32, device=dists.device) * disp_norm.to(dists.device))
        return {
            "landscape/loss_min": losses.min(),
            "landscape/loss_max": losses.max(),
            "landscape/grad_l2_max": dists.max(),
            "landscape/beta_eff": ratios.max(),
        }
