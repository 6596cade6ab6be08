"""What one measurement costs, in training steps, on models nobody here wrote, and what a budget buys.

Models: torchvision's ResNet-18 (10 classes, batch 32 of 3x32x32, SGD lr 0.1 momentum 0.9),
Lightning's demo Transformer (``lightning.pytorch.demos.Transformer``, vocabulary 1000, batch 16x32
tokens, AdamW lr 1e-3), and VGG-11-BN at width 0.25 (``bnlightning.models.VGG``, batch 32, SGD),
each trained by ``Trainer.fit`` on synthetic tensors; on a GPU also ``vgg16`` (the paper's VGG-16-BN,
full width, batch 128), with ``--precision bf16-mixed`` for training (measurements stay float32).

1. **Cost of one measurement** of each callback alone, at its defaults, in steps of the same run:
   the callback measures every ``--probe-every`` steps; the clock is read around every step and
   around the callback's measuring hooks (``bench/overhead.py``'s instrumentation); cost = median
   measurement time / median time of the steps without one. The first measurement is reported
   apart (``first``): it pays one-time set-up and, for ``HessianSpectrum``, a cold Lanczos start
   (later ones are warm-started from the previous measurement's eigenvector). Beside each cost,
   its algorithmic floor (see ``floor``) in the same unit.
2. **One HVP per form** (``--hvp-forms``): the ``retained`` set-up and product and one ``jvp`` product,
   in training steps of the same model and batch (``HessianSpectrum``'s ``hvp_method``).
3. **Overhead under a budget**: ``--steps`` training steps with ``InternalCovariateShift``,
   ``LossLandscape``, ``ActivationStats`` and ``HessianSpectrum``, all with ``max_overhead=0.1``,
   against the same run without callbacks: (time with) / (time without) - 1, and how often each
   callback measured.

Clock: ``--clock cpu --threads 1`` (the process's CPU time, one thread) on a shared CPU.

Example::

    python bench/cost.py --clock cpu --threads 1 --models resnet18,transformer,vgg --steps 1000
    python bench/cost.py --quick --clock cpu --threads 1
    python bench/cost.py --device cuda --precision bf16-mixed --models vgg16 --steps 1000
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli
import _fixtures
import _report
import _timing
from overhead import StepClock, fit, time_measurements

CALLBACKS = (
    "HessianSpectrum",
    "InternalCovariateShift",
    "LossLandscape",
    "ActivationStats",
    "MeanShift",
    "ResidualVariance",
    "GradientCurvature",
    "ActivationGradients",
    "EffectiveLearningRate",
    "SpectralDensity",
)
BUDGETED = ("InternalCovariateShift", "LossLandscape", "ActivationStats", "HessianSpectrum")
MODELS = ("resnet18", "transformer", "vgg", "vgg16")
QUICK = {"models": ["transformer"], "probe_measurements": 2, "steps": 60, "callbacks": list(CALLBACKS)}
FULL = {"models": list(MODELS), "probe_measurements": 3, "steps": 1000, "callbacks": list(CALLBACKS)}


class Classifier(pl.LightningModule):
    """A user's image classifier: ``loss(batch)`` is cross-entropy of ``net``."""

    def __init__(self, net: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class LanguageModel(Classifier):
    """Lightning's demo Transformer as ``LightningTransformer`` trains it, with AdamW."""

    def loss(self, batch: Any) -> Tensor:
        inputs, target = batch
        return F.nll_loss(self.net(inputs, target), target.view(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def make_model(name: str, seed: int) -> pl.LightningModule:
    torch.manual_seed(seed)
    if name == "resnet18":
        import torchvision

        return Classifier(torchvision.models.resnet18(num_classes=10))
    if name == "transformer":
        from lightning.pytorch.demos import Transformer

        return LanguageModel(Transformer(vocab_size=1000))
    if name == "vgg16":  # the paper's VGG-16-BN at full width (a GPU figure: batch 128)
        return _fixtures.make_vgg(1.0, seed=seed, config="D")
    return _fixtures.make_vgg(0.25, seed=seed)


def make_loader(name: str, n_batches: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    if name == "transformer":
        tokens = torch.randint(0, 1000, (16 * n_batches, 33), generator=g)
        data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
        return DataLoader(data, batch_size=16)
    batch = 128 if name == "vgg16" else 32
    x = torch.randn(batch * n_batches, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch * n_batches,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def make_callback(name: str, every: int, **kwargs: Any) -> Any:
    import bnlightning.callbacks as cbs

    return getattr(cbs, name)(every_n_steps=every, **kwargs)


def floor(name: str, cb: Any, module: nn.Module) -> str:
    """The algorithmic floor of one measurement, in training steps (forward + backward + update = 1).

    ICS: G (1 step) + per measured layer half a step (its G' reuses the shared prefix's forward);
    landscape: G + one forward/backward per step size; activations: one forward (~1/3 step);
    Hessian: its HVPs (read from the logged iterations and probes) at about two steps each
    (an HVP is a forward-over-reverse or double backward: about twice a gradient). The stability
    gauges: gradient curvature = G + two HVPs (along g and along the step) + one forward for the
    actual change; activation gradients = one forward and backward; effective learning rate = two
    weight copies (no pass); spectral density = lanczos_steps x n_starts HVPs per norm mode.
    """
    if name == "InternalCovariateShift":
        return f"{1 + 0.5 * len(cb._layers):.1f}"
    if name == "LossLandscape":
        return f"{1 + len(cb.step_sizes):.1f}"
    if name in ("ActivationStats", "MeanShift", "ResidualVariance"):
        return "0.3"
    if name == "HessianSpectrum":
        hvps = getattr(cb, "_bench_hvps", None)
        return f"{2 * hvps:.0f} ({hvps} HVPs)" if hvps else "2 x HVPs"
    if name == "GradientCurvature":
        return "5.3"
    if name == "ActivationGradients":
        return "1.0"
    if name == "EffectiveLearningRate":
        return "0"
    if name == "SpectralDensity":
        hvps = cb.lanczos_steps * cb.n_starts * len(cb.norm_modes)
        return f"{2 * hvps} ({hvps} HVPs)"
    return ""


def count_hvps(cb: Any) -> None:
    """Record the HVPs of each Hessian measurement on ``cb._bench_hvps`` (the last one) and ``cb._bench_hvp_log``
    (every one: Lanczos iterations, trace probes, all HVPs of H, and λmax(P⁻¹H)'s Lanczos iterations for Adam)."""
    original = cb.record
    cb._bench_hvp_log = []

    def record(trainer: Any, metrics: dict[str, Tensor], step: int | None = None) -> None:
        def get(name: str) -> int:
            return int(float(metrics.get(f"hessian/{name}", torch.tensor(0.0))))

        if "hessian/hvps" in metrics:
            cb._bench_hvps = get("hvps") + get("precond_iterations")
        else:  # before the HVP count was logged: the eigen solver's, plus the probes and the deflation
            cb._bench_hvps = get("iterations") + cb.n_probes + cb.k
        entry = {
            "lanczos": get("iterations"),
            "probes": get("trace_probes"),
            "hvps": get("hvps"),
            "precond_lanczos": get("precond_iterations"),
        }
        cb._bench_hvp_log.append(entry)
        original(trainer, metrics, step)

    cb.record = record


def bench_costs(args: Any, model_name: str) -> list[dict[str, Any]]:
    model = make_model(model_name, args.seed)
    init = copy.deepcopy(model.state_dict())
    every = args.probe_every
    steps = every * (args.probe_measurements + 1)
    rows = []
    for name in args.callbacks:
        model.load_state_dict(init)
        cb = make_callback(name, every)
        durations = time_measurements(cb, args.timer)
        if name == "HessianSpectrum":
            count_hvps(cb)
        clock = StepClock(args.timer, [cb])
        try:
            fit(model, make_loader(model_name, steps + 1, args.seed), args, steps, [clock, cb])
        except Exception as err:  # a callback that does not apply to this model (no residual blocks)
            print(
                f"  {model_name} {name}: not measured ({type(err).__name__}: {str(err).splitlines()[0][:120]})",
                flush=True,
            )
            continue
        plain = [t for t, measured in clock.steps[1:] if not measured]
        step_s = _timing.median(plain)
        later = durations[1:] or durations
        row = {
            "model": model_name,
            "callback": name,
            "step_s": step_s,
            "first_in_steps": durations[0] / step_s,
            "cost_in_steps": _timing.median(later) / step_s,
            "measurement_runs_s": durations,
            "floor": floor(name, cb, model),
        }
        if name == "HessianSpectrum":
            row["hvps_per_measurement"] = cb._bench_hvp_log
            print(f"  {model_name} {name} HVPs per measurement: {cb._bench_hvp_log}", flush=True)
        rows.append(row)
        print(
            f"  {model_name} {name}: {row['cost_in_steps']:.2f} steps (first {row['first_in_steps']:.2f}); floor "
            f"{row['floor']}; step {step_s * 1e3:.0f} ms",
            flush=True,
        )
    return rows


class Counter(pl.Callback):
    """Training steps and their time, whatever the callbacks do."""

    def __init__(self, clock: _timing.Clock) -> None:
        self.clock, self.t0, self.seconds = clock, 0.0, 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.t0 = self.clock.now()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.seconds = self.clock.now() - self.t0


def bench_budget(args: Any, model_name: str) -> dict[str, Any]:
    """(2) ``--steps`` steps with the four main callbacks at ``max_overhead=0.1`` vs none."""
    model = make_model(model_name, args.seed)
    init = copy.deepcopy(model.state_dict())
    out: dict[str, Any] = {"model": model_name, "steps": args.steps}
    for side in ("none", "budget"):
        model.load_state_dict(init)
        cbs = [make_callback(n, 1, max_overhead=0.1) for n in BUDGETED] if side == "budget" else []
        counter = Counter(args.timer)
        fit(model, make_loader(model_name, args.steps + 1, args.seed), args, args.steps, [counter, *cbs])
        out[f"{side}_s"] = counter.seconds
        if cbs:
            out["measurements"] = {type(cb).__name__: cb.measurements for cb in cbs}
        print(f"  {model_name} {args.steps} steps, callbacks {side}: {counter.seconds:.1f} s", flush=True)
    out["overhead_pct"] = 100.0 * (out["budget_s"] / out["none_s"] - 1.0)
    return out


def bench_hvp_forms(args: Any, model_name: str, repeats: int = 3) -> dict[str, Any]:
    """One HVP of each form in training steps of the same model and batch (medians of ``repeats``, interleaved).

    A training step: forward + backward + the optimizer's step. ``retained``: its set-up (the forward and the
    first backward with ``create_graph=True``) and one product through the retained graph; ``jvp``: one
    forward-over-reverse product (no set-up); both through ``hessian_operator``, as ``HessianSpectrum`` uses it.
    """
    from bnlightning.callbacks.functional.hessian import hessian_operator

    model = make_model(model_name, args.seed).train()
    batch = next(iter(make_loader(model_name, 1, args.seed)))
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.Optimizer)
    times: dict[str, list[float]] = {"step": [], "retained_setup": [], "retained": [], "jvp": []}

    def step() -> None:
        opt.zero_grad()
        model.loss(batch).backward()  # type: ignore[operator]
        opt.step()

    def product(method: str) -> tuple[float, float]:
        t0 = args.timer.now()
        with hessian_operator(model, batch, method=method, loss_fn=lambda m, b: m.loss(b)) as hvp:
            v = {n: torch.randn_like(p) for n, p in hvp.point.items()}
            t1 = args.timer.now()
            hvp(v)
            t2 = args.timer.now()
        return t1 - t0, t2 - t1

    step()  # warm-up: first-call allocations
    for _ in range(repeats):
        times["step"].append(args.timer.timed(step)[0])
        setup, prod = product("retained")
        times["retained_setup"].append(setup)
        times["retained"].append(prod)
        times["jvp"].append(sum(product("jvp")))
    step_s = _timing.median(times["step"])
    row = {
        "model": model_name,
        "step_s": step_s,
        **{k: _timing.median(v) / step_s for k, v in times.items() if k != "step"},
    }
    print(
        f"  {model_name} one HVP in steps: retained set-up {row['retained_setup']:.2f} + {row['retained']:.2f} per "
        f"product; jvp {row['jvp']:.2f}; step {step_s * 1e3:.0f} ms",
        flush=True,
    )
    return row


def parse_args(argv: list[str] | None = None) -> Any:
    p = _cli.bench_parser("bench/cost.py", __doc__, QUICK, FULL)
    p.add_argument(
        "--models",
        type=lambda s: [m for m in s.split(",") if m],
        default=None,
        help=f"comma-separated, of {', '.join(MODELS)}",
    )
    p.add_argument(
        "--callbacks",
        type=lambda s: [m for m in s.split(",") if m],
        default=None,
        help=f"comma-separated, of {', '.join(CALLBACKS)}",
    )
    p.add_argument(
        "--probe-measurements", type=_cli.positive_int, default=None, help="measurements per callback in (1)"
    )
    p.add_argument("--probe-every", type=_cli.positive_int, default=2, help="measure every this many steps in (1)")
    p.add_argument(
        "--steps", type=_cli.nonnegative_int, default=None, help="training steps of the budget runs (2); 0 skips them"
    )
    p.add_argument(
        "--hvp-forms",
        action="store_true",
        help="(3) also time one HVP per form (retained set-up and product, jvp) against a training step",
    )
    p.add_argument(
        "--precision",
        type=_cli.precision_list,
        default=["32-true"],
        help="one of 32-true, bf16-mixed, 16-mixed (training; measurements are float32 whatever it is)",
    )
    args = p.parse_args(argv)
    for m in args.models:
        if m not in MODELS:
            p.error(f"argument --models: unknown model {m!r}; accepted: {', '.join(MODELS)}")
    for c in args.callbacks:
        if c not in CALLBACKS:
            p.error(f"argument --callbacks: unknown callback {c!r}; accepted: {', '.join(CALLBACKS)}")
    args.device = _cli.resolve_device(p, args.device)
    _cli.check_precisions(p, args.precision, args.device)
    args.precision = args.precision[0]
    args.timer = _timing.make_clock(p, args.clock, args.device)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info, started = _report.begin(__file__, args)
    costs: list[dict[str, Any]] = []
    budgets: list[dict[str, Any]] = []
    forms = [bench_hvp_forms(args, m) for m in args.models] if args.hvp_forms else []
    for m in args.models:
        costs += bench_costs(args, m)
        if args.steps:
            budgets.append(bench_budget(args, m))
    print()
    print(
        _report.format_table(
            ["model", "callback", "cost (steps)", "first", "floor (steps)"],
            [[r["model"], r["callback"], r["cost_in_steps"], r["first_in_steps"], r["floor"]] for r in costs],
        )
    )
    if budgets:
        print()
        print(
            _report.format_table(
                ["model", "steps", "overhead at max_overhead=0.1", "measurements"],
                [[b["model"], b["steps"], f"{b['overhead_pct']:.1f}%", b["measurements"]] for b in budgets],
            )
        )
    hess = [r["cost_in_steps"] for r in costs if r["callback"] == "HessianSpectrum"]
    summary = (
        f"HessianSpectrum at its defaults: {max(hess):.1f} steps per measurement at worst"
        if hess
        else "no HessianSpectrum row"
    )
    if budgets:
        summary += "; overhead with max_overhead=0.1: " + ", ".join(
            f"{b['model']} {b['overhead_pct']:.1f}%" for b in budgets
        )
    return _report.finish(
        __file__, argv, args, info, {"costs": costs, "budgets": budgets, "hvp_forms": forms}, summary, started
    )


if __name__ == "__main__":
    main()
