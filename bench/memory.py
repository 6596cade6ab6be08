"""Extra peak memory of each measurement callback, in bytes and in parameter-memory units.

For each model and callback configuration a *child process* trains a few steps with that one
callback attached (measuring on step 1, once Adam's state exists) and reports its peak
resident memory (``ru_maxrss``; on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``); the same training without callbacks is the baseline. Extra peak =
peak with the callback - baseline; one unit = the float32 size of the trainable parameters.

Models: Lightning's demo Transformer at 50 M parameters (vocabulary 20,000, d_model 512, 8 heads,
4+4 layers, feed-forward 2048, Adam, batch 8 x 16 tokens) and VGG-11-BN (width 0.25, SGD,
batch 32 of 32x32 images). The memory budget: every callback at its defaults <= 3 units on the
Transformer.

    python bench/memory.py                       # both models, every configuration
    python bench/memory.py --models transformer --configs ics landscape
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = {
    "none": "training alone (the baseline)",
    "ics": "InternalCovariateShift() at its defaults",
    "landscape": "LossLandscape() at its defaults",
    "ics_one_loop": "InternalCovariateShift(layers=[one layer], mode='loop')",
    "landscape_loop": "LossLandscape(mode='loop')",
    "activations": "ActivationStats() at its defaults",
}
MODELS = ("transformer", "vgg")


def _transformer_lm() -> tuple[Any, list[Any], str]:
    """Lightning's demo Transformer at 50 M parameters with Adam, its batches, and one of its layers."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.demos.transformer import Transformer
    from torch.nn import functional as F

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Transformer(vocab_size=20000, ninp=512, nhead=8, nhid=2048, nlayers=4, dropout=0.1)

        def loss(self, batch: Any) -> Any:
            x, y = batch
            return F.nll_loss(self.net(x, y), y.reshape(-1))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.loss(batch)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    module = LM()
    tokens = torch.randint(0, 20000, (4, 8, 17))
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    return module, batches, "net.transformer.decoder.layers.3.linear2"


def _vgg() -> tuple[Any, list[Any], str]:
    """VGG-11-BN at width 0.25 with SGD, its batches, and one of its layers."""
    import torch

    from bnlightning.models import VGG

    module = VGG(config="A", norm="batch", width=0.25)
    module.optimizer_factory = lambda p: torch.optim.SGD(p, lr=0.05)
    batches = [(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))) for _ in range(4)]
    return module, batches, "net.conv5"


def _callbacks(config: str, one_layer: str) -> list[Any]:
    from bnlightning.callbacks import ActivationStats, InternalCovariateShift, LossLandscape

    return {
        "none": [],
        "ics": [InternalCovariateShift(every_n_steps=2)],
        "landscape": [LossLandscape(every_n_steps=2)],
        "ics_one_loop": [InternalCovariateShift(layers=[one_layer], mode="loop", every_n_steps=2)],
        "landscape_loop": [LossLandscape(mode="loop", every_n_steps=2)],
        "activations": [ActivationStats(every_n_steps=2, histogram=False)],
    }[config]


def _child(model_name: str, config: str, device_name: str) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    device = torch.device(device_name)
    module, batches, one_layer = _transformer_lm() if model_name == "transformer" else _vgg()
    callbacks = _callbacks(config, one_layer)
    params = sum(p.numel() * 4 for p in module.parameters() if p.requires_grad)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    pl.Trainer(
        max_steps=3,
        accelerator=device.type,
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, DataLoader(batches, batch_size=None))  # type: ignore[arg-type]  # a list is a map-style dataset
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    measured = [cb.measurements for cb in callbacks]
    return {
        "model": model_name,
        "config": config,
        "peak": peak,
        "param_bytes": params,
        "seconds": time.perf_counter() - t0,
        "measurements": measured,
    }


def _model_rows(model: str, configs: list[str], device: str) -> list[dict[str, Any]]:
    """Each configuration's extra peak on ``model``: one child process per configuration, the baseline first."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    results = {}
    for config in ["none", *configs]:
        proc = subprocess.run(
            [sys.executable, __file__, "--device", device, "--child", model, config],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            sys.exit(f"bench/memory.py: {model}/{config} failed:\n{proc.stderr[-2000:]}")
        results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
    base, unit = results["none"]["peak"], results["none"]["param_bytes"]
    rows = []
    for config in configs:
        extra = results[config]["peak"] - base
        rows.append(
            {
                "model": model,
                "config": config,
                "what": CONFIGS[config],
                "extra_bytes": extra,
                "units": extra / unit,
                "param_bytes": unit,
                "baseline_peak": base,
                "measurements": results[config]["measurements"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--configs", nargs="+", choices=[c for c in CONFIGS if c != "none"], default=[c for c in CONFIGS if c != "none"]
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--out", type=Path, default=Path("runs", "bench", "memory.json"), help="JSON output path (default: %(default)s)"
    )
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.device)))
        return
    rows = [row for model in args.models for row in _model_rows(model, args.configs, args.device)]
    print(f"{'model':12} {'callback':58} {'extra peak':>12} {'x params':>9}")
    for r in rows:
        print(f"{r['model']:12} {r['what']:58} {r['extra_bytes'] / 2**20:10.0f} MiB {r['units']:8.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=1))
    worst = max(
        (
            r["units"]
            for r in rows
            if r["model"] == "transformer" and r["config"] in ("ics", "landscape", "activations")
        ),
        default=float("nan"),
    )
    print(
        f"largest extra peak of a callback at its defaults on the 50 M Transformer: {worst:.2f}x parameter memory "
        "(budget 3x)"
    )


if __name__ == "__main__":
    main()
