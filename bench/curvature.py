"""Cost of the curvature measurements: HVPs to λmax (cold vs warm-started) and one HVP in training steps.

On VGG-11-BN (``VGG(config="A", norm="batch", width=w)``) in training mode, on one fixed
batch of CIFAR-shaped inputs (Gaussian images labelled by a fixed random linear "teacher",
so SGD has something to learn; its ``loss(batch)``, through ``functional_call`` with cloned
buffers), for each learning rate in ``--lrs``, after ``--pretrain-steps`` SGD steps on a pool
of batches:

1. **HVPs to λmax.** ``top_eigenvalues`` (k = 1, its defaults: ``max_basis`` 4) from a random
   start ("cold"), then ``--rounds`` times: ``--sgd-steps`` SGD steps, and again cold and
   "warm" (``v0`` = the previous measurement's eigenvector), on the same measured batch
   ("warm, same batch") and on a fresh batch ("warm, new batch": what a callback measuring
   each time on the current training batch sees). For each run: ``stop`` = HVPs until the
   solver's rule fired (tol ``--tol``; the eigenvalue error bound ``min(r, 10 r²/gap) <= tol·|θ|``
   since it replaced the residual rule ``r <= tol·|θ|`` of docs/benchmarks.md §5), ``to 1e-3`` = HVPs until
   the Ritz value first came within 1e-3 (relative) of a reference λmax (the largest Ritz
   value of the runs and of a tight run, basis 20, tol 1e-5, started from their vectors),
   ``overlap`` = |<previous eigenvector, new one>| (1: the top direction did not move).
2. **Cost of one HVP** in units of one training step (forward + ``backward()``, same model
   and batch) for the three ``make_hvp`` methods: ``retained`` (its one-off set-up, a forward
   and a first backward with ``create_graph``, reported apart), ``double_backward``, ``jvp``;
   also on an MLP (784-100-100-100-10, sigmoid, BN) as the non-convolutional case.
   Medians of ``--repeats`` interleaved timings.
3. **Basis size** (only with ``--basis-sweep 2,4,8``): cold HVP counts for each
   ``max_basis`` (two random starts each) at the first measured point of every width and lr,
   i.e. the memory (``max_basis + 1`` parameter-sized vectors) against HVPs trade-off.

Quick mode (``--quick``): width 0.125, 10 pretrain steps, 1 round, 3 repeats.

Example::

    python bench/curvature.py --threads 1 --clock cpu   # widths 0.125 and 0.25
    python bench/curvature.py --quick --threads 1 --clock cpu
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bnlightning.callbacks.functional._hvp import make_hvp
from bnlightning.callbacks.functional._lanczos import top_eigenvalues
from bnlightning.callbacks.functional._vectors import dot as _dot

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli
import _fixtures
import _report
import _timing

QUICK = {"widths": [0.125], "pretrain_steps": 10, "rounds": 1, "repeats": 3}
FULL = {"widths": [0.125, 0.25], "pretrain_steps": 20, "rounds": 2, "repeats": 3}
METHODS = ("retained", "double_backward", "jvp")


def float_list(text: str) -> list[float]:
    return [_cli.positive_float(t.strip()) for t in text.split(",") if t.strip()] or [_cli.positive_float(text)]


def parse_args(argv: list[str] | None = None) -> Any:
    p = _cli.bench_parser("bench/curvature.py", __doc__, QUICK, FULL)
    p.add_argument("--widths", type=float_list, default=None, help="comma-separated VGG channel multipliers")
    p.add_argument("--batch-size", type=_cli.positive_int, default=32, help="batch size (32)")
    p.add_argument(
        "--pretrain-steps", type=_cli.nonnegative_int, default=None, help="SGD steps before the first measurement"
    )
    p.add_argument("--rounds", type=_cli.positive_int, default=None, help="warm-started re-measurements")
    p.add_argument("--sgd-steps", type=_cli.positive_int, default=1, help="SGD steps between measurements (1)")
    p.add_argument(
        "--lrs",
        type=float_list,
        default=[0.1, 0.01],
        help="comma-separated SGD learning rates (0.1, the paper's, and 0.01)",
    )
    p.add_argument(
        "--tol", type=_cli.positive_float, default=1e-3, help="top_eigenvalues' relative residual tolerance (1e-3)"
    )
    p.add_argument(
        "--max-basis", type=_cli.positive_int, default=None, help="top_eigenvalues' max_basis (default: its own, 4)"
    )
    p.add_argument("--repeats", type=_cli.positive_int, default=None, help="timings per HVP method (medians)")
    p.add_argument(
        "--basis-sweep",
        type=_cli.int_list,
        default=[],
        help="comma-separated max_basis values to compare cold (off by default)",
    )
    p.add_argument("--no-cost", action="store_true", help="skip the HVP cost table (2)")
    args = p.parse_args(argv)
    for b in [args.max_basis or 2, *args.basis_sweep]:
        if b < 2:
            p.error(f"argument --max-basis/--basis-sweep: max_basis must be >= 2, got {b}")
    args.device = _cli.resolve_device(p, args.device)
    args.timer = _timing.make_clock(p, args.clock, args.device)
    return args


# --- the measured function ----------------------------------------------------------------
class LossCall(nn.Module):
    """``module.loss(batch)`` as ``forward``, so ``functional_call`` can substitute its tensors."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m: Any = module  # a LightningModule with ``loss(batch)``

    def forward(self, batch: Any) -> Tensor:
        return self.m.loss(batch)


def hvp_for(model: nn.Module, batch: Any, method: str = "retained") -> tuple[Callable, dict[str, Tensor]]:
    call = LossCall(model)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_of(p: dict[str, Tensor]) -> Tensor:
        tensors = {f"m.{k}": v for k, v in p.items()} | {f"m.{k}": b.clone() for k, b in buffers.items()}
        return functional_call(call, tensors, (batch,))

    return make_hvp(loss_of, params, method=method), params


def batches(n: int, size: int, device: torch.device, seed: int) -> list[tuple[Tensor, Tensor]]:
    """Gaussian images labelled by one fixed random linear teacher (learnable, unlike random labels)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(3 * 32 * 32, 10, generator=torch.Generator().manual_seed(12345))
    out = []
    for _ in range(n):
        x = torch.randn(size, 3, 32, 32, generator=g)
        out.append((x.to(device), (x.flatten(1) @ teacher).argmax(1).to(device)))
    return out


def sgd_steps(model: Any, pool: list[Any], steps: int, lr: float, start: int) -> None:
    for i in range(steps):
        model.zero_grad(set_to_none=True)
        model.loss(pool[(start + i) % len(pool)]).backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
    model.zero_grad(set_to_none=True)


def reference(hvp: Callable, params: dict[str, Tensor], runs: list[Any]) -> float:
    """λmax to ~1e-8: a tight run (basis 20, tol 1e-5) started from the runs' eigenvectors.

    Every Ritz value is a lower bound of λmax (a Rayleigh quotient), so the largest of them
    is the reference; starting from the sum of the runs' vectors (one of them from a random
    start) keeps a component along the top eigenvector.
    """
    tight = top_eigenvalues(hvp, params, tol=1e-5, max_iter=300, max_basis=20, v0=[r.eigenvectors[0] for r in runs])
    return max(float(tight.eigenvalues[0]), *(float(r.eigenvalues[0]) for r in runs))


def summarize(kind: str, res: Any, ref: float, prev: list[dict[str, Tensor]] | None = None) -> dict[str, Any]:
    to_1e3 = next((h for h, theta, _ in res.history if abs(theta - ref) <= 1e-3 * abs(ref)), None)
    overlap = None if prev is None else abs(_dot(prev[0], res.eigenvectors[0]))
    return {
        "kind": kind,
        "stop_hvps": res.iterations,
        "converged": res.converged,
        "to_1e-3_hvps": to_1e3,
        "overlap": overlap,
        "lambda": float(res.eigenvalues[0]),
        "reference": ref,
        "rel_error": abs(float(res.eigenvalues[0]) - ref) / abs(ref),
    }


# --- 1. HVPs to λmax ------------------------------------------------------------------------
def bench_counts(args: Any, width: float, lr: float) -> list[dict[str, Any]]:
    model = _fixtures.make_vgg(width, seed=args.seed).to(args.device).train()
    pool = batches(8, args.batch_size, args.device, args.seed)
    measured = batches(1, args.batch_size, args.device, args.seed + 1)[0]
    fresh = batches(args.rounds, args.batch_size, args.device, args.seed + 2)
    sgd_steps(model, pool, args.pretrain_steps, lr, 0)
    opts = {"tol": args.tol, "max_iter": 300, "max_basis": args.max_basis}
    rows: list[dict[str, Any]] = []
    hvp, params = hvp_for(model, measured)
    cold = top_eigenvalues(hvp, params, generator=torch.Generator().manual_seed(args.seed), **opts)
    ref = reference(hvp, params, [cold])
    rows.append({"round": 0, **summarize("cold", cold, ref)})
    for b in args.basis_sweep:
        for seed in range(2):
            res = top_eigenvalues(
                hvp,
                params,
                tol=args.tol,
                max_iter=300,
                max_basis=b,
                generator=torch.Generator().manual_seed(100 + seed),
            )
            rows.append({"round": 0, **summarize(f"cold, max_basis {b}", res, ref)})
    prev_same = prev_new = cold.eigenvectors
    for r in range(1, args.rounds + 1):
        sgd_steps(model, pool, args.sgd_steps, lr, args.pretrain_steps + r * args.sgd_steps)
        hvp, params = hvp_for(model, measured)
        cold = top_eigenvalues(hvp, params, generator=torch.Generator().manual_seed(args.seed + r), **opts)
        warm = top_eigenvalues(hvp, params, v0=prev_same, **opts)
        ref = reference(hvp, params, [cold, warm])
        rows += [
            {"round": r, **summarize("cold", cold, ref)},
            {"round": r, **summarize("warm, same batch", warm, ref, prev_same)},
        ]
        prev_same = warm.eigenvectors
        hvp, params = hvp_for(model, fresh[r - 1])
        warm_new = top_eigenvalues(hvp, params, v0=prev_new, **opts)
        rows.append(
            {"round": r, **summarize("warm, new batch", warm_new, reference(hvp, params, [warm_new]), prev_new)}
        )
        prev_new = warm_new.eigenvectors
    for row in rows:
        row["width"], row["lr"] = width, lr
    return rows


# --- 2. cost of one HVP ---------------------------------------------------------------------
def bench_cost(args: Any, name: str, model: Any, batch: Any) -> dict[str, Any]:
    model = model.to(args.device).train()
    snapshot = {k: b.clone() for k, b in model.named_buffers()}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model.loss(batch).backward()

    built: dict[str, Callable] = {}
    v = {
        k: torch.randn(p.shape, generator=torch.Generator().manual_seed(0)).to(args.device)
        for k, p in model.named_parameters()
    }
    step()  # warm-up of every path
    for m in METHODS:
        built[m] = hvp_for(model, batch, m)[0]
        built[m](v)
    times: dict[str, list[float]] = {"step": [], "retained_setup": [], **{m: [] for m in METHODS}}
    for rep in range(args.repeats):
        for what in _timing.alternate(["step", "retained_setup", *METHODS], rep):
            if what == "step":
                times["step"].append(args.timer.timed(step)[0])
            elif what == "retained_setup":
                t, built["retained"] = args.timer.timed(lambda: hvp_for(model, batch, "retained")[0])
                times["retained_setup"].append(t)
            else:
                times[what].append(args.timer.timed(lambda m=what: built[m](v))[0])
    with torch.no_grad():  # the timed training steps moved BN's running stats; put them back
        for k, b in model.named_buffers():
            b.copy_(snapshot[k])
    model.zero_grad(set_to_none=True)
    step_s = statistics.median(times["step"])
    row: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in model.parameters()), "step_s": step_s}
    for what in ("retained_setup", *METHODS):
        row[f"{what}_steps"] = statistics.median(times[what]) / step_s
    return row


def bench_mlp_cost(args: Any) -> dict[str, Any]:
    """The cost of one HVP on the MLP (784-100-100-100-10, sigmoid, BN), the non-convolutional case."""
    from bnlightning.models import MLP

    torch.manual_seed(args.seed)
    mlp = MLP(in_features=784, out_features=10, depth=3, width=100, activation="sigmoid", norm="batch")
    g = torch.Generator().manual_seed(args.seed)
    mlp_batch = (
        torch.randn(128, 784, generator=g).to(args.device),
        torch.randint(0, 10, (128,), generator=g).to(args.device),
    )
    print("MLP: HVP cost ...", flush=True)
    return bench_cost(args, "MLP 3x100 BN, batch 128", mlp, mlp_batch)


def run_all(args: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """HVP counts at every width and lr, and (unless ``--no-cost``) the cost of one HVP per width and on the MLP."""
    counts: list[dict[str, Any]] = []
    costs: list[dict[str, Any]] = []
    for width in args.widths:
        for lr in args.lrs:
            print(f"width {width}, lr {lr}: HVP counts ...", flush=True)
            counts += bench_counts(args, width, lr)
        if not args.no_cost:
            print(f"width {width}: HVP cost ...", flush=True)
            model = _fixtures.make_vgg(width, seed=args.seed)
            costs.append(
                bench_cost(
                    args, f"VGG-11-BN w={width}", model, batches(1, args.batch_size, args.device, args.seed + 1)[0]
                )
            )
    if not args.no_cost:
        costs.append(bench_mlp_cost(args))
    return counts, costs


def print_tables(counts: list[dict[str, Any]], costs: list[dict[str, Any]]) -> None:
    print()
    print(
        _report.format_table(
            ["width", "lr", "round", "run", "stop HVPs", "HVPs to 1e-3", "rel. error at stop", "λmax", "overlap"],
            [
                [
                    r["width"],
                    r["lr"],
                    r["round"],
                    r["kind"],
                    r["stop_hvps"],
                    r["to_1e-3_hvps"],
                    f"{r['rel_error']:.1e}",
                    r["lambda"],
                    "" if r["overlap"] is None else f"{r['overlap']:.3f}",
                ]
                for r in counts
            ],
        )
    )
    if costs:
        print()
        print(
            _report.format_table(
                ["model", "params", "step s", "retained set-up", "retained HVP", "double_backward HVP", "jvp HVP"],
                [
                    [
                        r["model"],
                        r["params"],
                        r["step_s"],
                        r["retained_setup_steps"],
                        r["retained_steps"],
                        r["double_backward_steps"],
                        r["jvp_steps"],
                    ]
                    for r in costs
                ],
            )
        )
        print("(HVP columns in training steps: forward + backward on the same batch)")


def summary_line(args: Any, counts: list[dict[str, Any]], costs: list[dict[str, Any]]) -> str:
    """Per lr, the median HVPs to stop / to 1e-3 of each kind of run; the basis sweep; one HVP in steps."""

    def med(lr: float, kind: str, key: str) -> float:
        vals = [r[key] for r in counts if r["lr"] == lr and r["kind"] == kind and r[key] is not None]
        return statistics.median(vals) if vals else float("nan")

    parts = [
        f"lr {lr}: HVPs to stop / to 1e-3 on λmax, median: cold "
        f"{med(lr, 'cold', 'stop_hvps'):.0f}/{med(lr, 'cold', 'to_1e-3_hvps'):.0f}, "
        "warm same batch "
        f"{med(lr, 'warm, same batch', 'stop_hvps'):.0f}/{med(lr, 'warm, same batch', 'to_1e-3_hvps'):.0f}, "
        f"warm new batch {med(lr, 'warm, new batch', 'stop_hvps'):.0f}/{med(lr, 'warm, new batch', 'to_1e-3_hvps'):.0f}"
        for lr in args.lrs
    ]
    sweep = [
        f"max_basis {b}: {med(lr, f'cold, max_basis {b}', 'stop_hvps'):.0f}"
        for lr in args.lrs
        for b in args.basis_sweep
    ]
    if sweep:
        parts.append("cold HVPs to stop by basis size (median over points and starts): " + ", ".join(sweep))
    if costs:
        parts.append(
            "one retained HVP = "
            + ", ".join(f"{r['retained_steps']:.2f}" for r in costs)
            + " training steps ("
            + ", ".join(r["model"] for r in costs)
            + ")"
        )
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info, started = _report.begin(__file__, args)
    print(
        f"VGG-11-BN widths {args.widths}, batch {args.batch_size}, lrs {args.lrs}, {args.pretrain_steps} pretrain "
        f"steps, {args.rounds} rounds of {args.sgd_steps} SGD step(s), tol {args.tol}",
        flush=True,
    )
    counts, costs = run_all(args)
    print_tables(counts, costs)
    summary = summary_line(args, counts, costs)
    return _report.finish(__file__, argv, args, info, {"counts": counts, "costs": costs}, summary, started)


if __name__ == "__main__":
    main()
