"""A resumed ``fit`` reads its checkpoint once for all its checks, and forgets it before training.

The checks (readable, of this model, of this run's settings, the step it stores, diverged or not)
used to read the file four times before Lightning read it a fifth time to restore it.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from bnlightning import checkpointing, runstate
from bnlightning.cli import main
from tests.helpers import QUICK, csv_quickstart


def _fit(tmp: Path, steps: int, *extra: str) -> list[str]:
    return ["fit", *csv_quickstart(tmp), "--trainer.max_steps", str(steps), *QUICK, *extra]


def _count_check_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Files loaded by ``read_checkpoint`` (the checks' reader), counted per file; Lightning's own restore is not
    counted."""
    reads: Counter[str] = Counter()
    load = torch.load

    def counting_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        if sys._getframe(1).f_code.co_name == "read_checkpoint":
            reads[str(Path(f).resolve())] += 1
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    return reads


@pytest.mark.parametrize("asked", ["file", "last"])
def test_a_resumed_fit_reads_its_checkpoint_once(in_tmp: Path, monkeypatch: pytest.MonkeyPatch, asked: str) -> None:
    every_2 = ("--checkpoint.every_n_train_steps", "2")
    main(_fit(in_tmp, 4, *every_2))
    run = in_tmp / "runs/quickstart/version_0"
    # As a run killed after its step-2 checkpoint leaves it: that checkpoint, and run.json saying "running".
    for path in (run / "checkpoints").glob("*.ckpt"):
        if torch.load(path, weights_only=True)["global_step"] != 2:
            path.unlink()
    (step2,) = (p.resolve() for p in (run / "checkpoints").glob("*.ckpt"))
    runstate.write_status(run, status="running", step=2)
    reads = _count_check_reads(monkeypatch)
    cli = main(_fit(in_tmp, 4, *every_2, "--ckpt_path", str(step2) if asked == "file" else "last"))
    assert cli.trainer.global_step == 4, "the run resumed from step 2"
    assert reads == {str(step2): 1}
    assert checkpointing._held is None, "what the checks read is forgotten before training"


def test_held_reads_see_a_rewritten_file(tmp_path: Path) -> None:
    """A file rewritten while reads are held is read again (it is known by inode, size and time)."""
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": {}, "global_step": 1}, path)
    checkpointing.hold_reads()
    try:
        assert checkpointing.read_checkpoint(path)["global_step"] == 1
        assert checkpointing.read_checkpoint(path) is checkpointing.read_checkpoint(path)
        torch.save({"state_dict": {}, "global_step": 22}, tmp_path / "b.ckpt")
        (tmp_path / "b.ckpt").replace(path)  # as AtomicCheckpointIO saves: a new file renamed into place
        assert checkpointing.read_checkpoint(path)["global_step"] == 22
    finally:
        checkpointing.drop_reads()
    assert checkpointing._held is None
