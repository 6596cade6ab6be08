"""Time the batched measurements against a naive per-layer / per-step-size loop.

For the MLP (3 x 100 sigmoid, BN), the deep linear network (25 x 10x10, BN) and
VGG-11-BN (config A) at batch 128, on one fixed batch, it times

- ``naive``: the plain reference -- per layer (per step size) a ``copy.deepcopy`` of the
  model, the earlier weights moved by hand, forward and ``.backward()``;
- ``loop``: ``bnlightning.callbacks`` with ``mode="loop"`` (one functional pass per member);
- ``vmap``: ``mode="vmap"`` (all members in one ``torch.func.vmap`` call);
- ``prefix`` (ICS only): ``mode="prefix"`` (one pass through the updated layers gives
  every layer's input; each G' then runs only the rest of the network);

and reports what ``mode="auto"`` picks and its time relative to naive. A second table
times both measurements on one batch, as the two callbacks do on a step both measure:
``separate`` (each computes its own G) against ``shared`` (``step_gradient`` once, passed
as ``gradient=`` to both, as the callbacks share it), both ``mode="auto"``. The CPU may be
shared, so methods are interleaved (rotated order within each repetition) and medians
reported. Prints one table and a final summary line; writes JSON beside this file.

    python bench/measure.py                 # all models, 5 repetitions
    python bench/measure.py --models mlp dln --reps 7
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlightning.callbacks import internal_covariate_shift, loss_landscape, sgd_update, step_gradient
from bnlightning.callbacks.functional import ICS_MODES, MODES
from bnlightning.callbacks.functional._batching import resolve_mode
from bnlightning.callbacks.functional._harness import LossHarness
from bnlightning.models import MLP, VGG

MODELS: dict[str, tuple[Callable[[float], nn.Module], float]] = {
    "mlp": (
        lambda w: MLP(in_features=784, out_features=10, depth=3, width=100, activation="sigmoid", norm="batch"),
        0.1,
    ),
    "dln": (
        lambda w: MLP(
            in_features=10,
            out_features=10,
            depth=24,
            width=10,
            activation="identity",
            bias=False,
            loss="sum_squared",
            norm="batch",
        ),
        1e-6,
    ),
    "vgg": (lambda w: VGG(config="A", norm="batch", width=w), 0.1),
}


def make_batch(name: str, model: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if name == "vgg":
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    if name == "dln":
        return torch.randn(n, 10, generator=g), torch.randn(n, 10, generator=g)
    return torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)


def _grads(model: Any, batch: Any, rng: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.set_rng_state(rng)
    model.zero_grad()
    model.loss(batch).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def naive_ics(model: Any, batch: Any, lr: float) -> None:
    rng = torch.get_rng_state()
    G = _grads(copy.deepcopy(model), batch, rng)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for i, layer in enumerate(layers):
        c = copy.deepcopy(model)
        with torch.no_grad():
            for earlier in layers[:i]:
                w = c.get_submodule(earlier).weight
                w -= lr * G[f"{earlier}.weight"]
        G2 = _grads(c, batch, rng)
        g, g2 = G[f"{layer}.weight"], G2[f"{layer}.weight"]
        _ = ((g - g2).norm(), torch.nn.functional.cosine_similarity(g.flatten(), g2.flatten(), dim=0))
    torch.set_rng_state(rng)


def naive_landscape(model: Any, batch: Any, steps: list[float]) -> None:
    rng = torch.get_rng_state()
    g = _grads(copy.deepcopy(model), batch, rng)
    for s in steps:
        c = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in c.named_parameters():
                p -= s * g[n]
        c.zero_grad()
        torch.set_rng_state(rng)
        loss = c.loss(batch)
        loss.backward()
        _ = torch.stack([((g[n] - p.grad) ** 2).sum() for n, p in c.named_parameters()]).sum().sqrt()
    torch.set_rng_state(rng)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per method (medians are reported)")
    parser.add_argument("--vgg-width", type=float, default=1.0, help="VGG channel multiplier (1.0 = VGG-11)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs", "bench", "measure.json"),
        help="JSON output path (default: %(default)s)",
    )
    return parser.parse_args(argv)


def _setup(name: str, args: argparse.Namespace) -> tuple[nn.Module, Any, float, list[float]]:
    """The model ``name`` (seeded, training mode), its batch, its lr and the landscape's step sizes."""
    build, lr = MODELS[name]
    torch.manual_seed(0)
    model = build(args.vgg_width).train()
    batch = make_batch(name, model, args.batch_size)
    return model, batch, lr, [0.5 * lr, lr, 2 * lr, 4 * lr]


def _time_rotated(methods: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Each method's times over ``reps`` repetitions, after one warm-up call each."""
    for fn in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    keys = list(methods)
    for r in range(reps):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotate the order: shared-CPU noise hits all alike
            times[k].append(timed(methods[k]))
    return times


def bench_methods(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per measurement (ICS, landscape) on model ``name``: each method's median time."""
    model, batch, lr, steps = _setup(name, args)
    # "auto-vmap" is vmap in chunks that fit the memory budget: these models fit whole
    autos = {
        what: resolve_mode("auto", LossHarness(model), modes, None).replace("auto-vmap", "vmap")
        for what, modes in (("ics", ICS_MODES), ("landscape", MODES))
    }
    methods: dict[str, dict[str, Callable[[], Any]]] = {
        "ics": {
            "naive": lambda: naive_ics(model, batch, lr),
            "loop": lambda: internal_covariate_shift(model, batch, sgd_update(lr), mode="loop"),
            "vmap": lambda: internal_covariate_shift(model, batch, sgd_update(lr), mode="vmap"),
            "prefix": lambda: internal_covariate_shift(model, batch, sgd_update(lr), mode="prefix"),
        },
        "landscape": {
            "naive": lambda: naive_landscape(model, batch, steps),
            "loop": lambda: loss_landscape(model, batch, steps, mode="loop"),
            "vmap": lambda: loss_landscape(model, batch, steps, mode="vmap"),
        },
    }
    rows = []
    for what, fns in methods.items():
        times = _time_rotated(fns, args.reps)
        med = {k: statistics.median(v) for k, v in times.items()}
        auto = autos[what]
        rows.append(
            {
                "model": name,
                "measurement": what,
                "batch": args.batch_size,
                **{f"{k}_s": med[k] for k in med},
                "auto": auto,
                "auto_over_naive": med[auto] / med["naive"],
                "times": times,
            }
        )
    return rows


def bench_shared(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """ICS + landscape on one step of model ``name``: each computing its own G vs one shared G."""
    model, batch, lr, steps = _setup(name, args)

    def separate() -> None:
        internal_covariate_shift(model, batch, sgd_update(lr))
        loss_landscape(model, batch, steps)

    def shared() -> None:
        g = step_gradient(model, batch)
        internal_covariate_shift(model, batch, sgd_update(lr), gradient=g)
        loss_landscape(model, batch, steps, gradient=g)

    pair = {"separate": separate, "shared": shared}
    for fn in pair.values():
        fn()
    ptimes: dict[str, list[float]] = {k: [] for k in pair}
    for r in range(args.reps):
        for k in list(pair) if r % 2 == 0 else list(pair)[::-1]:
            ptimes[k].append(timed(pair[k]))
    pmed = {k: statistics.median(v) for k, v in ptimes.items()}
    return {"model": name, "separate_s": pmed["separate"], "shared_s": pmed["shared"], "times": ptimes}


def print_tables(rows: list[dict[str, Any]], shared_rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'model':6} {'measure':10} {'naive s':>9} {'loop s':>9} {'vmap s':>9} {'prefix s':>9} {'auto':>6} "
        f"{'auto/naive':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        prefix = f"{r['prefix_s']:9.4f}" if "prefix_s" in r else f"{'-':>9}"
        print(
            f"{r['model']:6} {r['measurement']:10} {r['naive_s']:9.4f} {r['loop_s']:9.4f} {r['vmap_s']:9.4f} {prefix} "
            f"{r['auto']:>6} {r['auto_over_naive']:10.2f}"
        )
    print()
    print(f"{'model':6} {'ICS + landscape':16} {'separate s':>10} {'shared s':>9} {'shared/separate':>15}")
    for r in shared_rows:
        print(
            f"{r['model']:6} {'auto, one batch':16} {r['separate_s']:10.4f} {r['shared_s']:9.4f} "
            f"{r['shared_s'] / r['separate_s']:15.2f}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = [row for name in args.models for row in bench_methods(name, args)]
    shared_rows = [bench_shared(name, args) for name in args.models]  # ICS + landscape on one step
    print_tables(rows, shared_rows)
    result = {
        "rows": rows,
        "shared_gradient": shared_rows,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "reps": args.reps,
        "vgg_width": args.vgg_width,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    ics = {r["model"]: r["auto_over_naive"] for r in rows if r["measurement"] == "ics"}
    print(
        "summary: ICS auto/naive "
        + ", ".join(f"{k} {v:.2f}x" for k, v in ics.items())
        + f" (median of {args.reps}, batch {args.batch_size}); json: {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
