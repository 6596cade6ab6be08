"""The callbacks install alone, from ``bnlightning-callbacks/``, into an environment that has only torch and lightning.

The wheel is built from a copy of the sources without build isolation (no network; the
setuptools of the dev extra), installed with ``--no-deps`` into a fresh virtual environment
that sees the installed torch and lightning *and their own dependencies only* (a folder of
links to exactly those distributions, named by a ``.pth`` file), and a measurement runs there.
wandb, timm, scikit-learn and matplotlib are not importable in it, so a stray import of one
fails the test.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import REPO, build_wheel

HEAVY = ("wandb", "timm", "sklearn", "matplotlib")


@pytest.fixture(scope="module")
def light_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("light")
    src = tmp / "src"
    for name in ("callbacks", "bnlightning-callbacks"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    return build_wheel(src / "bnlightning-callbacks", tmp / "dist", "bnlightning_callbacks-*.whl", timeout=180)


def _closure(names: list[str]) -> set[str]:
    """The installed distributions ``names`` need, themselves included (requested extras followed)."""
    seen: set[str] = set()
    todo = [(n, frozenset()) for n in names]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in seen and not extras:
            continue
        seen.add(key)
        for text in md.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                try:
                    md.distribution(req.name)
                except md.PackageNotFoundError:
                    continue  # optional on this platform (e.g. triton elsewhere): not installed, not needed
                todo.append((req.name, frozenset(req.extras)))
    return seen


def _link_only(dists: set[str], folder: Path) -> None:
    """``folder`` holds links to the files of ``dists`` alone (their packages, modules and metadata)."""
    folder.mkdir()
    for name in dists:
        dist = md.distribution(name)
        site = Path(dist.locate_file("")).resolve()
        for top in {
            f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".." and not f.name.endswith(".pth")
        }:
            if (site / top).exists() and not (folder / top).exists():
                (folder / top).symlink_to(site / top)


def test_the_light_wheel_needs_only_torch_and_lightning(light_wheel: Path) -> None:
    with zipfile.ZipFile(light_wheel) as whl:
        names = whl.namelist()
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = {
        canonicalize_name(Requirement(line.split(":", 1)[1]).name)
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:")
    }
    assert requires == {"torch", "lightning"}
    assert "License-Expression: MIT" in meta
    shipped = {n for n in names if n.endswith(".py")}
    expected = {
        "bnlightning/callbacks/" + p.relative_to(REPO / "callbacks").as_posix()
        for p in (REPO / "callbacks").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert shipped == expected, (
        "the light wheel ships the callbacks, and nothing else (no bnlightning/__init__.py: a namespace package)"
    )


def test_callbacks_measure_in_a_fresh_venv_with_only_torch_and_lightning(light_wheel: Path, tmp_path: Path) -> None:
    dists = _closure(["torch", "lightning"])
    assert not {canonicalize_name(d) for d in ("wandb", "timm", "scikit-learn", "matplotlib", "bnlightning")} & dists
    _link_only(dists, tmp_path / "deps")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "torch-and-lightning.pth").write_text(str(tmp_path / "deps") + "\n")
    pip_env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(light_wheel)],
        capture_output=True,
        text=True,
        env=pip_env,
        timeout=180,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        missing = [m for m in {HEAVY!r} if importlib.util.find_spec(m) is None]
        assert missing == list({HEAVY!r}), f"importable here: {{set({HEAVY!r}) - set(missing)}}"
        import lightning.pytorch as pl
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
        import bnlightning.callbacks as cb
        assert cb.__file__.startswith({str(site)!r}), cb.__file__

        class Model(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
            def training_step(self, batch, batch_idx):
                x, y = batch
                return nn.functional.cross_entropy(self.net(x), y)
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        torch.manual_seed(0)
        data = DataLoader(TensorDataset(torch.randn(32, 6), torch.randint(0, 2, (32,))), batch_size=8)
        trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=pl.loggers.CSVLogger("runs"),
                             callbacks=[cb.InternalCovariateShift(every_n_steps=1)],
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(Model(), data)
        header = open(trainer.logger.log_dir + "/metrics.csv").readline().strip().split(",")
        print(sorted(h for h in header if h.startswith("ics/")))
        """
    )
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([python, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        done.stdout.strip().splitlines()[-1]
        == "['ics/cos/net.0', 'ics/cos/net.3', 'ics/l2/net.0', 'ics/l2/net.3', 'ics/rel/net.0', 'ics/rel/net.3']"
    )
