"""The private Lightning / W&B names bnlightning relies on still exist, and only ``_private.py`` uses them.

An upgrade of lightning or wandb-workspaces that renames one of them fails here, with the name,
instead of silently changing how runs resume, checkpoint or build reports.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from bnlightning import _private

PACKAGE = Path(_private.__file__).resolve().parent


def _owner(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _instance(owner: type, tmp_path: Path) -> Any:
    """A plain instance of ``owner`` (nothing started: no wandb run, no folder written)."""
    name = owner.__name__
    if name == "WandbLogger":
        return owner(save_dir=str(tmp_path), offline=True)
    if name == "CSVLogger":
        return owner(save_dir=str(tmp_path))
    if name == "ModelCheckpoint":
        return owner(dirpath=str(tmp_path))
    if name == "Trainer":
        return owner(
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    return None


@pytest.mark.parametrize(
    ("owner", "attribute"),
    _private.PRIVATE_NAMES,
    ids=[f"{o.rsplit('.', 1)[1]}.{a}" for o, a in _private.PRIVATE_NAMES],
)
def test_private_name_still_exists(owner: str, attribute: str, tmp_path: Path) -> None:
    cls = _owner(owner)
    if hasattr(cls, attribute):
        return
    instance = _instance(cls, tmp_path)
    assert instance is not None and hasattr(instance, attribute), (
        f"{owner}.{attribute} is gone in the installed version: update bnlightning/_private.py (and what calls it)"
    )


def test_trainer_cluster_environment_route() -> None:
    from lightning.fabric.plugins.environments import ClusterEnvironment
    from lightning.pytorch import Trainer

    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    assert isinstance(_private.cluster_environment(trainer), ClusterEnvironment)


def test_overridden_private_methods_are_still_called(tmp_path: Path) -> None:
    calls: list[str] = []

    class Writer(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            calls.append("writer")

    Writer(str(tmp_path / "logs"))
    assert calls == ["writer"], (
        "ExperimentWriter.__init__ no longer calls _check_log_dir_exists: bnlightning.loggers' writers are dead code"
    )
    # ExperimentWriter.save() rewrites the file through _rewrite_with_new_header when a new column appears
    import lightning.fabric.loggers.csv_logs as fabric_csv

    assert "_rewrite_with_new_header" in inspect.getsource(fabric_csv._ExperimentWriter.save)
    # LightningCLI builds the trainer through _instantiate_trainer(config, callbacks) (bnlightning.cli overrides it)
    assert list(inspect.signature(LightningCLI._instantiate_trainer).parameters) == ["self", "config", "callbacks"]
    assert "_instantiate_trainer" in inspect.getsource(LightningCLI.instantiate_trainer)


def test_report_viewspec_route() -> None:
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    spec = _private.report_viewspec(wr.Report(entity="e", project="p", title="t", blocks=[wr.H1("x")]))
    assert isinstance(spec, dict) and spec


def test_no_other_module_touches_the_private_names() -> None:
    names = sorted(
        {a for _, a in _private.PRIVATE_NAMES}
        - {"_instantiate_trainer", "_check_log_dir_exists", "_rewrite_with_new_header"}
    )
    pattern = re.compile(r"\.(" + "|".join(map(re.escape, names)) + r")\b")
    # bnlightning/ only: callbacks/ uses no private Lightning name (and torch's Tensor._version,
    # the version counter the observer guard reads, would match the pattern)
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_private.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}")
    assert not offenders, "use bnlightning._private instead:\n" + "\n".join(offenders)
