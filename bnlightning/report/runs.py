"""Finished runs read back from their local logs: no W&B, no pandas, no network.

A *run directory* is any folder holding a ``metrics.csv`` (Lightning's ``CSVLogger``)
and a ``config.yaml`` (the full LightningCLI config). ``hparams.yaml`` beside them is
read too when present: it carries ``cli.dataset_name``, the data module's own label
(e.g. "sklearn digits resized to 32x32 RGB (substitute, not CIFAR-10)"), which every
figure and table shows so a substitute data set is never taken for the real one.

Runs are grouped into *settings* (``bnlightning.settings``, the definition the resume policy
uses too): a run's setting is its whole configuration except the seed and the keys that only
say where it logs or how it resumes (:data:`~bnlightning.settings.NOT_SETTINGS`), so two runs
are one setting exactly when they differ by seed alone. A table or legend names
a setting by the keys that differ between the runs shown (:func:`varying_keys`): norm and
learning rate for the paper's grids, batch size, init gain, BN placement ... for others.
The seeds of one setting are repeats and become the band around a curve. The same seed
run twice (a re-run in another folder) is one seed: :func:`drop_repeated_seeds` keeps the
newest finished run of it and lists the others apart.

Only finished runs are averaged: ``run.json`` (written by every ``fit``) must say
``completed`` or ``diverged``. A run that was interrupted, failed, or killed (still
``running``) is *incomplete*: :func:`split_runs` keeps it apart, and the report lists it
on its own. Folders from before ``run.json`` existed count as finished. A ``metrics.csv``
with no rows is not a run, and a last line cut short (a crash mid-write) is dropped,
each with a warning. A run whose files cannot be read (a ``metrics.csv`` that is not
UTF-8, a ``config.yaml`` cut short or not YAML) is skipped with a warning naming the file:
one bad folder never stops the report.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bnlightning.callbacks.functional.names import ACT
from bnlightning.settings import is_setting_key

#: A metric's history: the steps it was logged at and its values there (NaN/inf kept).
Series = tuple[np.ndarray, np.ndarray]

NORM_LABELS: dict[str, str] = {
    "none": "standard",
    "batch": "BN",
    "noisy_batch": "noisy BN",
    "l1": "l1 norm",
    "l2": "l2 norm",
    "linf": "linf norm",
    "layer": "LayerNorm",
    "group": "GroupNorm",
}


def _get(tree: Any, dotted: str, default: Any = None) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``; ``default`` when any level is missing."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


#: Short names of keys in tables and legends (others: the last part of the dotted key).
SHORT_KEYS = {
    "model.init_args.optimizer.init_args.lr": "lr",
    "trainer.callbacks": "callbacks",
    "data.init_args.batch_size": "batch_size",
}
LR_KEY = "model.init_args.optimizer.init_args.lr"
NORM_KEY = "model.init_args.norm"


class UnreadableRun(ValueError):
    """A run folder whose files cannot be read; the report skips it with this message."""


def _read_yaml(path: Path, required: bool = False) -> dict[str, Any]:
    """The mapping in a YAML file; ``{}`` when it is absent (and not ``required``).

    Raises:
        UnreadableRun: the file is not UTF-8 or not YAML (cut short mid-write), or holds no mapping.
    """
    if not path.is_file():
        if required:
            raise UnreadableRun(f"{path}: missing")
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UnreadableRun(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if text and not text.endswith("\n"):
        # yaml.safe_dump and LightningCLI end the file with a newline: without one the writer
        # was killed mid-line, and what is left may still parse (``norm: bat``).
        raise UnreadableRun(f"{path}: cut short mid-write (its last line has no newline)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        # Lightning writes some hparams with python tags; the safe loader refuses them,
        # and nothing the report needs lives behind such a tag.
        try:
            data = yaml.load(text, Loader=_TolerantLoader)
        except yaml.YAMLError as err:
            where = f" (line {err.problem_mark.line + 1})" if getattr(err, "problem_mark", None) else ""
            raise UnreadableRun(f"{path}: not valid YAML{where}; cut short mid-write?") from None
    if data is None and not required:
        return {}
    if not isinstance(data, dict):
        raise UnreadableRun(f"{path}: holds {type(data).__name__}, not a mapping of settings; cut short mid-write?")
    return data


class _TolerantLoader(yaml.SafeLoader):
    """A safe loader that turns unknown ``!!python/...`` tags into ``None``."""


_TolerantLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def read_metrics(path: Path) -> dict[str, Series]:
    """Every column of a Lightning ``metrics.csv`` as ``name -> (steps, values)``.

    Lightning writes one row per logging call with empty cells for the other metrics;
    only filled cells are kept. ``nan``/``inf`` cells are kept: they are how a
    diverging run looks, and the plots decide what to do with them.

    Raises:
        UnreadableRun: the file is not UTF-8 text.
    """
    columns: dict[str, tuple[list[int], list[float]]] = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise UnreadableRun(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if text and not text.endswith("\n"):
        # Lightning ends every row with a newline: a last line without one was cut short
        # (a kill or a full disk mid-write), and "0.9" of "0.9375" must not become a result.
        cut = text.rsplit("\n", 1)[-1]
        warnings.warn(f"{path}: ignoring its last line, which was cut short: {cut[:60]!r}", stacklevel=2)
        text = text[: len(text) - len(cut)]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            continue  # a row with more or fewer cells than the header is not trustworthy
        step_text = row.get("step") or ""
        try:
            step = int(float(step_text))
        except ValueError:
            continue
        for name, cell in row.items():
            if name in ("step", "epoch") or name is None or cell in (None, ""):
                continue
            try:
                value = float(cell)
            except ValueError:
                continue
            steps, values = columns.setdefault(name, ([], []))
            steps.append(step)
            values.append(value)
    return {name: (np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64)) for name, (s, v) in columns.items()}


@dataclass
class Run:
    """One finished (or diverged, or interrupted) run read from its log folder."""

    path: Path
    config: dict[str, Any]
    hparams: dict[str, Any]
    metrics: dict[str, Series] = field(repr=False)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``completed``, ``diverged``, ``interrupted``, ``failed``, ``running`` (killed), or ``unknown`` (no
        run.json)."""
        return str(self.state.get("status", "unknown"))

    @property
    def complete(self) -> bool:
        """Whether the run ended on its own; only complete runs are averaged."""
        return self.status in ("completed", "diverged", "unknown")

    # --- settings -----------------------------------------------------------------
    @property
    def model_args(self) -> dict[str, Any]:
        return _get(self.config, "model.init_args", {}) or {}

    @property
    def model_class(self) -> str:
        return str(_get(self.config, "model.class_path", "?")).rsplit(".", 1)[-1]

    @property
    def model_label(self) -> str:
        """A short readable name of the architecture (not of the normalization)."""
        a = self.model_args
        if self.model_class == "MLP":
            depth = a.get("depth", "?")
            if a.get("activation") == "identity":
                layers = depth + 1 if isinstance(depth, int) else "?"
                return f"deep linear network ({layers} layers of {a.get('width', '?')})"
            return f"MLP {depth}x{a.get('width', '?')} {a.get('activation', '?')}"
        if self.model_class == "VGG":
            width = a.get("width", 1.0)
            scaled = "" if width in (None, 1, 1.0) else f", width x{width:g}"
            return f"VGG-{a.get('config', '?')}{scaled}"
        return self.model_class

    @property
    def norm(self) -> str:
        return str(self.model_args.get("norm", "none"))

    @property
    def norm_label(self) -> str:
        label = NORM_LABELS.get(self.norm, self.norm)
        if self.norm != "none" and self.model_args.get("norm_layers") is not None:
            label += f" @{','.join(str(i) for i in self.model_args['norm_layers'])}"
        return label

    @property
    def lr(self) -> float | None:
        lr = _get(self.model_args, "optimizer.init_args.lr")
        return float(lr) if isinstance(lr, (int, float)) else None

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed_everything")
        return int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None

    @property
    def dataset(self) -> str:
        """The data module's own label; falls back to its class name."""
        name = _get(self.hparams, "cli.dataset_name") or self.config.get("dataset_name")
        if name:
            return str(name)
        cls = str(_get(self.config, "data.class_path", "unknown data")).rsplit(".", 1)[-1]
        return cls

    @property
    def family(self) -> tuple[str, str]:
        """Runs of one family share a figure: same architecture on the same data."""
        return (self.model_label, self.dataset)

    @cached_property
    def flat_config(self) -> dict[str, Any]:
        """The config as ``{"model.init_args.norm": "batch", ...}`` (see :func:`flatten`)."""
        return flatten(self.config)

    @property
    def setting(self) -> tuple[tuple[str, str], ...]:
        """Every config value but the seeds and bookkeeping (:data:`bnlightning.settings.NOT_SETTINGS`): runs of one
        setting differ only by seed."""
        return tuple((k, repr(v)) for k, v in sorted(self.flat_config.items()) if is_setting_key(k))

    def value(self, key: str) -> Any:
        """The run's value of a dotted config key (None when it has none)."""
        return self.flat_config.get(key)

    @property
    def repeat_id(self) -> tuple[Any, ...] | None:
        """Setting and seeds: two finished runs with the same id are one seed run twice. None when unseeded."""
        if self.seed is None:
            return None
        return (self.setting, self.seed, self.value("data.init_args.seed"))

    @property
    def lr_ran(self) -> float | None:
        """The learning rate the run trained with: the scaled one when a rule (``LinearLRScaling``) logged it."""
        scaled = self.final("lr_scaled")
        return scaled if scaled is not None and math.isfinite(scaled) else self.lr

    @property
    def steps(self) -> int:
        """Optimizer steps taken: ``run.json``'s step, else one past the last logged (0-based) step."""
        step = self.state.get("step")
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            return step
        return self.last_step + 1 if self.metrics else 0

    @property
    def finished_at(self) -> str:
        """When the run last wrote ``run.json`` (ISO time), else its ``metrics.csv``'s modification time: newest wins a
        repeat."""
        updated = self.state.get("updated")
        if isinstance(updated, str):
            return updated
        try:
            mtime = (self.path / "metrics.csv").stat().st_mtime
        except OSError:
            return ""
        return datetime.fromtimestamp(mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z")

    # --- results ------------------------------------------------------------------
    def series(self, name: str) -> Series | None:
        return self.metrics.get(name)

    @property
    def diverged_at_step(self) -> int | None:
        """The step of the first non-finite loss, if the run diverged.

        Read from ``diverged_at_step`` (logged by the module); a run that logged a
        non-finite ``train/loss`` without it (killed before the check) counts too.
        """
        s = self.series("diverged_at_step")
        if s is not None and len(s[1]):
            return int(s[1][0])
        loss = self.series("train/loss")
        if loss is not None:
            bad = ~np.isfinite(loss[1])
            if bad.any():
                return int(loss[0][np.argmax(bad)])
        return None

    @property
    def last_step(self) -> int:
        return max((int(s[0].max()) for s in self.metrics.values() if len(s[0])), default=0)

    def final(self, name: str) -> float | None:
        """The last logged value of ``name`` (None if never logged)."""
        s = self.series(name)
        return float(s[1][-1]) if s is not None and len(s[1]) else None

    def best(self, name: str) -> float | None:
        s = self.series(name)
        if s is None or not len(s[1]):
            return None
        finite = s[1][np.isfinite(s[1])]
        return float(finite.max()) if len(finite) else None

    def layers(self, prefix: str) -> list[str]:
        """Layer names logged under ``prefix`` (``ics/l2/`` -> ``net.conv5``...), in network order.

        Works for both ``<prefix><layer>`` (ICS) and ``act/<layer>/<stat>`` names.
        """
        found: set[str] = set()
        for name in self.metrics:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if prefix == f"{ACT}/":
                rest = rest.rsplit("/", 1)[0]
            found.add(rest)
        return sorted(found, key=layer_sort_key)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; a callbacks list becomes its class names and arguments."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if key.endswith("callbacks") and isinstance(tree, list):
        out[key] = " + ".join(_callback_label(c) for c in tree) or "none"
    else:
        out[key] = tree if not isinstance(tree, list) else tuple(map(str, tree))
    return out


def _callback_label(spec: Any) -> str:
    if not isinstance(spec, dict):
        return str(spec)
    name = str(spec.get("class_path", "?")).rsplit(".", 1)[-1]
    args = spec.get("init_args") or {}
    return name + (f"({', '.join(f'{k}={v}' for k, v in args.items())})" if args else "")


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys (dotted) whose values differ between ``runs``: what tells their settings apart.

    Seeds and bookkeeping (:data:`bnlightning.settings.NOT_SETTINGS`) are left out; so two runs that differ only by
    seed give ``[]``.
    """
    keys = sorted({k for r in runs for k in r.flat_config if is_setting_key(k)})
    return [k for k in keys if len({repr(r.value(k)) for r in runs}) > 1]


def short_key(key: str) -> str:
    return SHORT_KEYS.get(key, key.rsplit(".", 1)[-1])


def format_value(key: str, value: Any) -> str:
    """A config value as tables and legends show it: norms by their names (standard, BN ...)."""
    if key == NORM_KEY:
        return NORM_LABELS.get(str(value), str(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting_label(run: Run, keys: Sequence[str]) -> str:
    """``BN, batch_size=8``: the run's values of ``keys`` for legends and table cells.

    The norm is shown by its name, first; callback arguments are left out (the claims table keeps
    them): they made legends too long to read.
    """
    parts = []
    for k in sorted(keys, key=lambda k: k != NORM_KEY):  # "BN, batch_size=8": the norm leads
        text = format_value(k, run.value(k))
        parts.append(text if k == NORM_KEY else f"{short_key(k)}={re.sub(r'[(][^)]*[)]', '', text)}")
    return ", ".join(parts) or "all runs"


def group_settings(runs: Iterable[Run], keys: Sequence[str] | None = None) -> dict[tuple[Any, ...], list[Run]]:
    """Runs grouped by their values of ``keys`` (default: their whole setting), in a stable order.

    Numbers sort numerically and norms as in the paper's legends (standard, BN, noisy BN ...);
    inside a group runs are ordered by seed.
    """
    runs = list(runs)
    keys = varying_keys(runs) if keys is None else list(keys)
    groups: dict[tuple[Any, ...], list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(repr(r.value(k)) for k in keys) if keys else ("",), []).append(r)

    def order(rs: list[Run]) -> tuple[Any, ...]:
        out: list[Any] = []
        for k in keys:
            v = rs[0].value(k)
            if k == NORM_KEY:
                out.append((0, norm_order(format_value(k, v)), str(v)))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append((0, float(v), ""))
            else:
                out.append((1, 0, str(v)))
        return tuple(out)

    return {
        k: sorted(rs, key=lambda r: (r.seed if r.seed is not None else -1, str(r.path)))
        for k, rs in sorted(groups.items(), key=lambda kv: order(kv[1]))
    }


def layer_sort_key(name: str) -> tuple[int, str]:
    """Order ``conv2`` before ``conv10`` and by position in the network."""
    digits = "".join(ch if ch.isdigit() else " " for ch in name).split()
    return (int(digits[-1]) if digits else 10**9, name)


def layer_order(name: str) -> tuple[int, ...]:
    """Natural order by every number in the name: ``net.stage2.block10`` -> (2, 10); ``relu13`` -> (13,)."""
    return tuple(
        int("".join(c for c in part if c.isdigit()) or 0) for part in name.split(".") if any(c.isdigit() for c in part)
    )


def short_layer(name: str) -> str:
    """``net.conv5`` -> ``conv5``: the callbacks may name layers either way."""
    return name.removeprefix("net.")


def find_run_dirs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every folder under ``paths`` (searched recursively) holding metrics.csv and config.yaml.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run folder: {p}")
        if p.is_file():
            p = p.parent
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if d != "wandb")  # W&B's own files are never runs
            if "metrics.csv" in files and "config.yaml" in files:
                found.append(Path(root))
    return sorted(set(found))


def _read_state(path: Path) -> dict[str, Any]:
    """``run.json``; ``{}`` when absent (a run from before it existed), status ``unreadable`` when it cannot be read."""
    file = path / "run.json"
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"status": "unreadable"}  # never averaged: whether it finished is unknown
    return data if isinstance(data, dict) else {"status": "unreadable"}


def load_run(path: Path) -> Run:
    """The run in ``path``.

    Raises:
        UnreadableRun: one of its files cannot be read (the message names it).
    """
    config = _read_yaml(path / "config.yaml", required=True)
    if "model" not in config:  # LightningCLI always writes it: the file ends before its section
        raise UnreadableRun(f"{path / 'config.yaml'}: no model section; cut short mid-write?")
    return Run(
        path=path,
        config=config,
        hparams=_read_yaml(path / "hparams.yaml"),
        metrics=read_metrics(path / "metrics.csv"),
        state=_read_state(path),
    )


def load_runs(paths: Sequence[str | os.PathLike[str]]) -> list[Run]:
    """Load every run under ``paths`` (complete or not; see :func:`split_runs`).

    A folder whose ``metrics.csv`` holds no rows, or whose files cannot be read (not UTF-8,
    a cut ``config.yaml``), is skipped with a warning naming the file.

    Raises:
        FileNotFoundError: a path does not exist, or no run folder is found under them.
    """
    dirs = find_run_dirs(paths)
    if not dirs:
        raise FileNotFoundError(f"no run folders (metrics.csv + config.yaml) under: {' '.join(map(str, paths))}")
    runs = []
    for d in dirs:
        try:
            run = load_run(d)
        except UnreadableRun as err:
            warnings.warn(f"{err}; run skipped", stacklevel=2)
            continue
        if not run.metrics:
            warnings.warn(f"{d}: metrics.csv holds no rows; not a run, skipped", stacklevel=2)
            continue
        runs.append(run)
    if not runs:
        raise FileNotFoundError(f"no run folder with logged metrics under: {' '.join(map(str, paths))}")
    return runs


def split_runs(runs: Iterable[Run]) -> tuple[list[Run], list[Run]]:
    """``(complete, incomplete)``: only the first are averaged, the second are listed apart.

    Example::

        done, unfinished = split_runs(load_runs(["runs/quickstart"]))
    """
    runs = list(runs)
    return [r for r in runs if r.complete], [r for r in runs if not r.complete]


def drop_repeated_seeds(runs: Iterable[Run]) -> tuple[list[Run], list[Run]]:
    """``(kept, repeats)``: of the finished runs sharing setting and seed, only the newest is kept.

    The same seed run twice (a re-run in another folder) is one seed, not two: averaging both
    would weigh it double and narrow the band. The newest (by ``run.json``'s last update,
    else ``metrics.csv``'s time) is kept; the others are returned to be listed apart, each
    with a warning naming it and the run kept. Unseeded runs are never repeats.
    """
    newest: dict[Any, Run] = {}
    for r in runs:
        if (rid := r.repeat_id) is None:
            newest[id(r)] = r
        elif rid not in newest or (r.finished_at, str(r.path)) > (newest[rid].finished_at, str(newest[rid].path)):
            newest[rid] = r
    kept_ids = {id(r) for r in newest.values()}
    runs = list(runs)
    repeats = [r for r in runs if id(r) not in kept_ids]
    for r in repeats:
        keep = newest[r.repeat_id]
        warnings.warn(
            f"{r.path}: seed {r.seed} of this setting was run again in {keep.path}; counting only the newer run",
            stacklevel=2,
        )
    return [r for r in runs if id(r) in kept_ids], repeats


def group_by(runs: Iterable[Run], key: str) -> dict[Any, list[Run]]:
    """Runs grouped by the attribute ``key`` (e.g. ``family``), in a stable order (settings: :func:`group_settings`)."""
    groups: dict[Any, list[Run]] = {}
    for run in runs:
        groups.setdefault(getattr(run, key), []).append(run)
    order = sorted(
        groups,
        key=lambda k: tuple(
            (0, x) if isinstance(x, (int, float)) else (1, str(x)) for x in (k if isinstance(k, tuple) else (k,))
        ),
    )
    return {k: sorted(groups[k], key=lambda r: (r.seed if r.seed is not None else -1, str(r.path))) for k in order}


def norm_order(label: str) -> int:
    """Sort key putting standard, BN, noisy BN first, as in the paper's legends."""
    order = list(NORM_LABELS.values())
    base = label.split(" @")[0]
    return order.index(base) if base in order else len(order)


def aggregate(runs: Sequence[Run], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean, min and max of ``name`` over the runs at each logged step.

    Steps are the union over runs; a run that stopped early (diverged) simply stops
    contributing. Non-finite values are left out of the statistics (a diverged run's
    last loss is shown by a marker, not by an infinite band).
    Returns ``(steps, mean, lo, hi)`` or None if no run logged ``name``.
    """
    per_run = [s for s in (r.series(name) for r in runs) if s is not None and len(s[0])]
    if not per_run:
        return None
    steps = np.unique(np.concatenate([s[0] for s in per_run]))
    table = np.full((len(per_run), len(steps)), np.nan)
    for i, (s, v) in enumerate(per_run):
        # Several rows may share a step (e.g. two logging calls); keep the last.
        table[i, np.searchsorted(steps, s)] = v
    table[~np.isfinite(table)] = np.nan
    keep = ~np.all(np.isnan(table), axis=0)
    if not keep.any():
        return None
    table, steps = table[:, keep], steps[keep]
    with np.errstate(all="ignore"):
        return steps, np.nanmean(table, axis=0), np.nanmin(table, axis=0), np.nanmax(table, axis=0)
