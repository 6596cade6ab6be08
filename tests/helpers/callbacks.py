"""Naive reference implementations and tiny models shared by the callback tests.

The references are written plainly on purpose: per-layer ``copy.deepcopy`` model copies,
explicit loops, ``.backward()`` on the copies and a hand-written SGD update.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn

from bnlightning.models import MLP, VGG


def mlp(norm: str = "batch") -> MLP:
    return MLP(in_features=16, out_features=10, depth=3, width=20, activation="sigmoid", norm=norm)


def dln(norm: str = "batch") -> MLP:
    return MLP(
        in_features=10,
        out_features=10,
        depth=24,
        width=10,
        activation="identity",
        bias=False,
        loss="sum_squared",
        norm=norm,
    )


def vgg(norm: str = "batch") -> VGG:
    return VGG(config="A", norm=norm, width=0.125)


def batch_for(model: nn.Module, n: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, VGG):
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    fc1 = model.net.fc1
    x = torch.randn(n, fc1.in_features, generator=g)
    if model.loss_kind == "sum_squared":
        return x, torch.randn(n, 10, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g)


def conv_linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def grads_of(model: nn.Module, batch: Any, rng: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    torch.set_rng_state(rng)
    model.zero_grad()
    loss = model.loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def naive_ics(model: nn.Module, batch: Any, lr: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per layer: a fresh deep copy, the earlier Conv/Linear weights moved by -lr * G, backward.

    Returns the metrics and ||G_i|| per layer.
    """
    rng = torch.get_rng_state()
    _, G = grads_of(copy.deepcopy(model), batch, rng)
    layers = conv_linear_names(model)
    out, norms = {}, {}
    for i, layer in enumerate(layers):
        copy_i = copy.deepcopy(model)
        with torch.no_grad():
            for earlier in layers[:i]:
                w = copy_i.get_submodule(earlier).weight
                w.copy_(w - lr * G[f"{earlier}.weight"])
        _, G2 = grads_of(copy_i, batch, rng)
        g, g2 = G[f"{layer}.weight"].flatten(), G2[f"{layer}.weight"].flatten()
        out[f"ics/l2/{layer}"] = (g - g2).norm()
        out[f"ics/cos/{layer}"] = (g @ g2) / (g.norm() * g2.norm())
        out[f"ics/rel/{layer}"] = (g - g2).norm() / g.norm()
        norms[layer] = g.norm()
    torch.set_rng_state(rng)
    return out, norms


def naive_landscape(model: nn.Module, batch: Any, steps: list[float]) -> dict[str, Tensor]:
    rng = torch.get_rng_state()
    _, g = grads_of(copy.deepcopy(model), batch, rng)
    losses, diffs, ratios = [], [], []
    for s in steps:
        copy_s = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in copy_s.named_parameters():
                p.copy_(p - s * g[n])
        loss_s, g_s = grads_of(copy_s, batch, rng)
        diff = torch.sqrt(sum(((g[n] - g_s[n]) ** 2).sum() for n in g))
        step_norm = torch.sqrt(sum(((s * g[n]) ** 2).sum() for n in g))
        losses.append(loss_s)
        diffs.append(diff)
        ratios.append(diff / step_norm)
    torch.set_rng_state(rng)
    return {
        "landscape/loss_min": min(losses),
        "landscape/loss_max": max(losses),
        "landscape/grad_l2_max": max(diffs),
        "landscape/beta_eff": max(ratios),
    }


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Everything a measurement must leave alone, cloned."""
    import random

    import numpy as np

    snap: dict[str, Any] = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "grad_ids": {n: id(p.grad) for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "torch_rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].copy(),
    }
    if optimizer is not None:
        snap["opt"] = copy.deepcopy(optimizer.state_dict())
    return snap


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("params", "buffers"):
        assert a[key].keys() == b[key].keys()
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), f"{key} {n} changed"
    for n in a["grads"]:
        assert (a["grads"][n] is None) == (b["grads"][n] is None), f"grad {n} appeared/disappeared"
        if a["grads"][n] is not None:
            assert torch.equal(a["grads"][n], b["grads"][n]), f"grad {n} changed"
    assert a["grad_ids"] == b["grad_ids"]
    assert a["modes"] == b["modes"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    assert a["py_rng"] == b["py_rng"]
    assert (a["np_rng"] == b["np_rng"]).all()
    if "opt" in a:
        sa, sb = a["opt"], b["opt"]
        assert sa["param_groups"] == sb["param_groups"]
        assert sa["state"].keys() == sb["state"].keys()
        for k in sa["state"]:
            for name, v in sa["state"][k].items():
                w = sb["state"][k][name]
                assert torch.equal(v, w) if isinstance(v, Tensor) else v == w


class Recorder(Logger):
    """An in-memory logger: what was handed to the loggers, by step (only keys under ``prefixes``, if given)."""

    def __init__(self, prefixes: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.logged: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        kept = {k: float(v) for k, v in metrics.items() if self.prefixes is None or k.split("/")[0] in self.prefixes}
        if kept:
            self.logged.setdefault(int(step), {}).update(kept)
