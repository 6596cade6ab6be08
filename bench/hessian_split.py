"""Where one ``hessian_spectrum`` measurement's time goes: the HVPs' backward passes against everything else.

The model (``bench/cost.py``'s ResNet-18, demo Transformer or VGG-11-BN ×0.25) trains ``--gap`` optimizer steps by
hand between measurements, so the point and the top eigenvector move as in a run; each measurement is warm-started
from the previous one (eigenvectors and trace variance ratio), as ``HessianSpectrum`` does. Under ``cProfile`` with
the process's CPU clock, ``backward`` is the time inside autograd's engine (the retained graph's set-up backward and
every HVP); ``other`` is the rest: the set-up forward, the Krylov vector arithmetic, the probes. Both in training
steps (the median of 5 steps timed before the first measurement). Every measurement uses the same batch. The clock is
always the CPU time (``--clock`` is not read), so it runs on the CPU only.

Example::

    python bench/hessian_split.py --threads 1 --models resnet18,transformer --max-basis 4,8,16
    python bench/hessian_split.py --quick --threads 1
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli
import _report
import _timing
import cost

from bnlightning.callbacks.functional.hessian import hessian_spectrum

QUICK = {"models": ["vgg"], "gap": 5, "measurements": 2, "max_basis": [8]}
FULL = {"models": ["resnet18", "transformer"], "gap": 100, "measurements": 4, "max_basis": [8]}
ENGINE = "<method 'run_backward' of 'torch._C._EngineBase' objects>"


def parse_args(argv: list[str] | None = None) -> Any:
    p = _cli.bench_parser("bench/hessian_split.py", __doc__, QUICK, FULL)
    p.add_argument(
        "--models", type=lambda s: [m for m in s.split(",") if m], default=None, help="of resnet18, transformer, vgg"
    )
    p.add_argument("--gap", type=_cli.positive_int, default=None, help="optimizer steps between measurements")
    p.add_argument("--measurements", type=_cli.positive_int, default=None, help="measurements per model")
    p.add_argument("--max-basis", type=_cli.int_list, default=None, help="comma-separated Lanczos basis sizes")
    p.add_argument("--tol", type=_cli.positive_float, default=1e-3, help="the eigen solver's tolerance (1e-3)")
    args = p.parse_args(argv)
    args.device, args.clock = _cli.resolve_device(p, args.device), "cpu"  # the header names the clock it uses
    if args.device.type != "cpu":
        p.error("argument --device: bench/hessian_split.py runs on the CPU (its clock is the process's CPU time)")
    for m in args.models:
        if m not in ("resnet18", "transformer", "vgg"):
            p.error(f"argument --models: unknown model {m!r}; accepted: resnet18, transformer, vgg")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def train(model: Any, optimizer: torch.optim.Optimizer, batches: list[Any], start: int, steps: int) -> float:
    """``steps`` optimizer steps on ``batches`` (cycled from ``start``); the median CPU time of one."""
    times = []
    for i in range(steps):
        t = time.process_time()
        optimizer.zero_grad()
        model.loss(batches[(start + i) % len(batches)]).backward()
        optimizer.step()
        times.append(time.process_time() - t)
    return _timing.median(times)


def split_one(args: Any, name: str, max_basis: int) -> list[dict[str, Any]]:
    """The measurements of one model at one basis size, each split into backward and other, in training steps."""
    model: Any = cost.make_model(name, args.seed)  # a LightningModule with ``loss(batch)``
    model.train()
    batches = list(cost.make_loader(name, 50, args.seed))
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Optimizer), "bench/cost.py's models return one optimizer"
    train(model, optimizer, batches, 0, args.gap)
    step = train(model, optimizer, batches, args.gap, 5)
    rows, previous = [], None
    for j in range(args.measurements):
        profile = cProfile.Profile(time.process_time)
        t = time.process_time()
        profile.enable()
        result = hessian_spectrum(
            model, batches[0], loss_fn=lambda module, batch: model.loss(batch), max_basis=max_basis, tol=args.tol,
            v0=previous.eigenvectors if previous else None, trace_ratios=previous.trace_ratios if previous else None,
        )  # fmt: skip
        profile.disable()
        total = time.process_time() - t
        backward = sum(v[2] for k, v in pstats.Stats(profile).stats.items() if k[2] == ENGINE)  # type: ignore[attr-defined]
        metrics = {k.split("/")[-1]: float(v) for k, v in result.metrics.items()}
        rows.append({"model": name, "max_basis": max_basis, "measurement": j, "steps": total / step,
                     "backward": backward / step, "other": (total - backward) / step, **metrics})  # fmt: skip
        r = rows[-1]
        print(f"  {name} basis {max_basis} #{j}: {r['steps']:.1f} steps = backward {r['backward']:.1f} + other "
              f"{r['other']:.1f}; Lanczos {r['iterations']:.0f} + probes {r['trace_probes']:.0f}, variance ratio "
              f"{r['trace_variance_ratio']:.2f}", flush=True)  # fmt: skip
        previous = result
        train(model, optimizer, batches, args.gap + 5 + j * args.gap, args.gap)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info, started = _report.begin(__file__, args)
    rows = [r for m in args.models for b in args.max_basis for r in split_one(args, m, b)]
    print()
    print(
        _report.format_table(
            ["model", "max_basis", "#", "steps", "backward", "other", "Lanczos", "probes"],
            [
                [
                    r["model"],
                    r["max_basis"],
                    r["measurement"],
                    r["steps"],
                    r["backward"],
                    r["other"],
                    r["iterations"],
                    r["trace_probes"],
                ]
                for r in rows
            ],
        )
    )
    share = sum(r["other"] for r in rows) / sum(r["steps"] for r in rows)
    return _report.finish(
        __file__, argv, args, info, {"rows": rows}, f"outside the backward passes: {share:.0%}", started
    )


if __name__ == "__main__":
    main()
