"""DDP on 2 CPU processes (gloo): every rank measures on the same steps, nothing hangs, and the logged
numbers are those of the global batch: the same as 1 process on the concatenated batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import Logger
    from torch.utils.data import DataLoader, TensorDataset
    from bnlightning.callbacks import ActivationStats, HessianSpectrum, InternalCovariateShift, LossLandscape
    from bnlightning.models import MLP

    class Steps(pl.Callback):
        def __init__(self, cbs):
            self.cbs, self.seen = cbs, []
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append([trainer.global_step, [cb.measurements for cb in self.cbs]])

    class Recorder(Logger):
        name, version = "memory", 0
        def __init__(self):
            super().__init__()
            self.logged = {}
        def log_hyperparams(self, *a, **k):
            pass
        def log_metrics(self, metrics, step=None):
            ours = {k: float(v) for k, v in metrics.items() if k.split("/")[0] in ("ics", "landscape", "hessian")}
            if ours:
                self.logged.setdefault(str(step), {}).update(ours)

    if __name__ == "__main__":
        out, world, norm = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        torch.manual_seed(0)
        model = MLP(in_features=16, out_features=10, depth=2, width=16, activation="tanh", norm=norm)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
        # each global batch of 8 split into contiguous rank shards: 1 process sees their concatenation
        rank, n = int(os.environ.get("LOCAL_RANK", 0)), 8 // world
        shard = torch.cat([torch.arange(8 * k + rank * n, 8 * k + (rank + 1) * n) for k in range(4)])
        data = DataLoader(TensorDataset(x[shard], y[shard]), batch_size=n)
        cbs = [
            InternalCovariateShift(every_n_steps=2), LossLandscape(every_n_steps=2), ActivationStats(every_n_steps=2),
            HessianSpectrum(k=2, every_n_steps=2, n_probes=4, tol=1e-4),
        ]
        if len(sys.argv) > 4:  # budgeted: rank 1's clock stands still, so alone it would never measure a second time
            cbs = [
                cls(every_n_steps=1, max_overhead=0.9)
                for cls in (InternalCovariateShift, LossLandscape, ActivationStats)
            ]
            for cb in cbs:
                cb.clock = (lambda: 0.0) if rank == 1 else time.process_time
        steps, rec = Steps(cbs), Recorder()
        kw = dict(strategy="ddp", devices=world) if world > 1 else dict(devices=1)
        trainer = pl.Trainer(
            max_steps=4 if len(sys.argv) <= 4 else 8, accelerator="cpu", callbacks=[*cbs, steps], logger=rec,
            log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            use_distributed_sampler=False, **kw,
        )
        reduce_s, calls = [0.0], [0]
        original = trainer.strategy.reduce
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                reduce_s[0] += time.perf_counter() - t0
                calls[0] += 1
        trainer.strategy.reduce = timed
        t0 = time.perf_counter()
        trainer.fit(model, data)
        with open(os.path.join(out, f"w{world}-{norm}-rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"seen": steps.seen, "last": [cb.last_measured_step for cb in cbs], "logged": rec.logged,
                       "reduce_s": reduce_s[0], "reduce_calls": calls[0], "fit_s": time.perf_counter() - t0}, f)
        if torch.distributed.is_initialized():  # Lightning destroys only NCCL groups; gloo's can abort the exit
            torch.distributed.destroy_process_group()
    """
)


def _run(tmp_path: Path, world: int, norm: str, *extra: str) -> list[dict]:
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(world), norm, *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"w{world}-{norm}-rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_ddp_two_processes_log_the_global_batch_numbers(tmp_path: Path, norm: str) -> None:
    two = _run(tmp_path, 2, norm)
    assert two[0]["seen"] == two[1]["seen"]  # same steps on every rank, no hang
    assert two[0]["seen"][-1] == [4, [2, 2, 2, 2]]
    assert two[0]["last"] == two[1]["last"] == [3, 3, 3, 3]
    assert not two[1]["logged"]  # only rank zero logs
    assert two[0]["reduce_calls"] > 0
    one = _run(tmp_path, 1, norm)[0]
    assert sorted(two[0]["logged"]) == sorted(one["logged"]) == ["1", "3"]
    for step, want in one["logged"].items():
        got = two[0]["logged"][step]
        assert set(got) == set(want)
        for k, w in want.items():
            if norm == "none":  # the mean over ranks of shard gradients (and HVPs) is the full-batch one
                tol = (
                    1e-4 if k.startswith("hessian/") else 1e-5
                )  # Lanczos stops at tol: rounding can move its last digits
                assert abs(got[k] - w) <= tol * abs(w) + 1e-7, (
                    f"step {step} {k}: 2 ranks {got[k]:.8g}, 1 process {w:.8g}"
                )
    if norm == "batch":
        # with BatchNorm each rank normalises with its own shard's statistics (as in training), so the
        # numbers are those of the averaged per-shard losses, not of one batch of 8: they differ
        diffs = [
            abs(two[0]["logged"][s][k] - w) / (abs(w) + 1e-12) for s, m in one["logged"].items() for k, w in m.items()
        ]
        assert max(diffs) > 1e-4


def test_ddp_budgeted_callbacks_measure_on_the_same_steps_on_every_rank(tmp_path: Path) -> None:
    """max_overhead: rank zero decides and every rank follows, whatever its own clock says."""
    two = _run(tmp_path, 2, "batch", "budget")
    assert two[0]["seen"] == two[1]["seen"]  # the same decisions on both ranks (a differing one would hang)
    assert two[0]["last"] == two[1]["last"]
    counts = two[0]["seen"][-1][1]
    assert min(counts) >= 1 and max(counts) >= 2  # rank 1, whose clock stands still, followed rank 0 past the first
