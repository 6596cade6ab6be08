"""A 2-process DDP run on CPU: every rank measures on the same steps and nothing hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from bnlightning.callbacks import ActivationStats, InternalCovariateShift, LossLandscape
    from bnlightning.models import MLP

    class Steps(pl.Callback):
        def __init__(self, cbs):
            self.cbs, self.seen = cbs, []
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append([trainer.global_step, [cb.measurements for cb in self.cbs]])

    if __name__ == "__main__":
        out = sys.argv[1]
        torch.manual_seed(0)
        model = MLP(in_features=16, out_features=10, depth=2, width=16, activation="relu", norm="batch")
        data = DataLoader(TensorDataset(torch.randn(64, 16), torch.randint(0, 10, (64,))), batch_size=8)
        cbs = [InternalCovariateShift(every_n_steps=2), LossLandscape(every_n_steps=2), ActivationStats(every_n_steps=2)]
        steps = Steps(cbs)
        trainer = pl.Trainer(
            max_steps=4, strategy="ddp", accelerator="cpu", devices=2, callbacks=[*cbs, steps],
            enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
        )
        trainer.fit(model, data)
        with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"seen": steps.seen, "last": [cb.last_measured_step for cb in cbs]}, f)
    """
)


def test_ddp_two_processes_measure_on_the_same_steps(tmp_path: Path) -> None:
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["seen"] == ranks[1]["seen"]
    assert ranks[0]["seen"][-1] == [4, [2, 2, 2]]
    assert ranks[0]["last"] == ranks[1]["last"] == [3, 3, 3]
