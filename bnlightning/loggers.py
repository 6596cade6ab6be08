"""Loggers that survive real runs: W&B offline when it must be, CSV logs that resume.

Lightning's ``WandbLogger`` needs credentials and a reachable server; without them
``wandb.init`` fails or blocks. This subclass decides offline mode up front when no
credentials exist (and says so once), falls back to offline mode when ``wandb.init``
fails, and turns errors while logging into one warning, so a run keeps training and
its other loggers (the CSV log the report reads) keep every metric.
"""

from __future__ import annotations

import csv
import netrc
import os
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from bnlightning import _private


def wandb_credentials_found() -> bool:
    """True when an API key is in the environment or in the netrc file wandb reads."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def sync_hint(save_dir: str | os.PathLike[str]) -> str:
    return f"upload later with: wandb sync {os.path.join(os.fspath(save_dir), 'wandb', 'offline-run-*')}"


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that degrades to offline mode instead of failing.

    Args are those of ``lightning.pytorch.loggers.WandbLogger`` and ``wandb.init``
    (``entity``, ``group``, ``job_type``, ``tags``, ``notes``). Offline mode is
    chosen when ``offline: true``, ``WANDB_MODE`` is ``offline``/``dryrun``, or no W&B
    credentials are found; a failing ``wandb.init`` (no network) retries offline; an
    error while logging is reported once and the run goes on.
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = ".",
        project: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        version: str | None = None,
        offline: bool = False,
        log_model: bool | Literal["all"] = False,
        prefix: str = "",
    ) -> None:
        mode = os.environ.get("WANDB_MODE", "")
        self._offline_reason = ""
        if not offline and mode in ("offline", "dryrun"):
            offline, self._offline_reason = True, f"WANDB_MODE={mode}"
        elif not offline and mode != "disabled" and not wandb_credentials_found():
            offline, self._offline_reason = True, "no W&B credentials found"
        if offline:
            log_model = False  # checkpoints cannot be uploaded offline
        extra: dict[str, Any] = {
            k: v
            for k, v in {"entity": entity, "group": group, "job_type": job_type, "tags": tags, "notes": notes}.items()
            if v is not None
        }
        # Absolute: wandb's service process resolves relative paths against its own
        # working directory, which is not ours after a chdir (tests, notebooks).
        save_dir = os.path.abspath(save_dir)
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            version=version,
            offline=offline,
            log_model=log_model,
            prefix=prefix,
            **extra,
        )
        _private.drop_wandb_init_kwarg(self, "anonymous")  # deprecated in wandb; Lightning always passes it
        self._warned_log_error = False
        self._resumed_id: str | None = None
        self._given_name = name
        self._pinned: dict[str, Any] = {}
        self._renamed: dict[str, str] = {}

    @rank_zero_only
    def name_if_unnamed(self, name: str) -> None:
        """Name the W&B run ``name`` unless the config gave it one (W&B leaves it empty offline).

        Starts the run (rank zero only), then sets its name through W&B's public ``Run.name``.
        """
        if self._given_name is None:
            try:
                self.experiment.name = name
            except Exception as err:
                self._warn_log_error(err)

    def pin_hyperparams(self, values: Mapping[str, Any], renames: Mapping[str, str] | None = None) -> None:
        """Keep ``values`` in the run config whatever is logged later under the same keys.

        Lightning logs the module's and the data module's hyper-parameters at the top level of
        the run config, where a data module's ``seed`` (its split) would read as the run's seed.
        ``renames`` moves such keys aside (``{"seed": "data_seed"}``) in everything logged after
        this call; ``values`` (``{"seed": <seed_everything>}``) is logged with it.
        """
        self._pinned = dict(values)
        self._renamed = dict(renames or {})

    def resume(self, run_id: str) -> None:
        """Continue the W&B run ``run_id`` (``wandb.init(id=..., resume="allow")``)."""
        if _private.wandb_run(self) is None:
            self._resumed_id = run_id
            _private.set_wandb_run_id(self, run_id)

    @property
    @override
    def experiment(self) -> Any:
        run = _private.wandb_run(self)
        if run is not None:
            return run
        if _private.wandb_offline(self) and self._offline_reason:
            rank_zero_info(f"bnlightning: W&B offline mode ({self._offline_reason}); {sync_hint(self.save_dir or '.')}")
            self._offline_reason = ""
        try:
            return super().experiment
        except Exception as err:  # wandb raises many types for "cannot reach the server"
            _private.forget_wandb_run(self)
            if self._resumed_id is not None:
                # e.g. "run ID ... is in use": the killed process's wandb service still
                # holds it. The CSV log continues the run; W&B gets a new one.
                rank_zero_warn(
                    f"bnlightning: could not continue W&B run {self._resumed_id} ({type(err).__name__}: {err}); "
                    "starting a new W&B run"
                )
                self._resumed_id = None
                _private.set_wandb_run_id(self, None)
                return self.experiment
            if _private.wandb_offline(self):
                raise
            rank_zero_warn(
                f"bnlightning: wandb.init failed ({type(err).__name__}: {err}); switching to W&B offline mode; "
                f"{sync_hint(self.save_dir or '.')}"
            )
            _private.set_wandb_offline(self)
            return super().experiment

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        try:
            super().log_metrics(metrics, step)
        except Exception as err:
            self._warn_log_error(err)

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if isinstance(params, Mapping) and (self._pinned or self._renamed):
            params = {self._renamed.get(k, k): v for k, v in params.items()} | self._pinned
        try:
            super().log_hyperparams(params)
        except Exception as err:
            self._warn_log_error(err)

    def _warn_log_error(self, err: Exception) -> None:
        if not self._warned_log_error:
            rank_zero_warn(
                f"bnlightning: W&B logging failed ({type(err).__name__}: {err}); training goes on and the local CSV "
                "log keeps every metric."
            )
            self._warned_log_error = True


def _write_rows_atomically(path: str, keys: list[str], rows: list[dict[str, Any]]) -> None:
    """Write a whole ``metrics.csv`` beside ``path``, fsync, then ``os.replace``: a kill at any
    moment leaves the old file or the new one, never a cut history."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _whole_rows(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a ``metrics.csv``, without a last line cut mid-write (no newline)."""
    with open(path, newline="", errors="replace") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(text.splitlines(keepends=True))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


class _AtomicWriter(ExperimentWriter):
    """Lightning's CSV writer, but the whole-file rewrite it does when a new metric appears
    (a new header) goes through a temporary file and ``os.replace``; rows are appended."""

    @override
    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        _, rows = _whole_rows(self.metrics_file_path)
        _write_rows_atomically(self.metrics_file_path, fieldnames, rows)


class _ResumingWriter(_AtomicWriter):
    """A resumed run's CSV writer: it keeps the rows logged before its checkpoint.

    Lightning deletes an existing ``metrics.csv`` in the log folder. On resume from a
    checkpoint taken after ``resume_step`` optimizer steps, the rows of earlier steps are
    the run's history and stay; rows of later steps (written before the crash) are
    dropped, because the resumed run logs them again. The file is replaced atomically.
    """

    def __init__(self, log_dir: str, resume_step: int) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir=log_dir)

    @override
    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        keys, rows = _whole_rows(self.metrics_file_path)
        kept = [r for r in rows if _step_of(r) is not None and _step_of(r) < self._resume_step]  # type: ignore[operator]
        if len(kept) != len(rows):
            _write_rows_atomically(self.metrics_file_path, keys, kept)
        self.metrics_keys = keys


def _step_of(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class _FreshWriter(_AtomicWriter):
    """Lightning's CSV writer, warning only when an old ``metrics.csv`` is really replaced
    (the run's own ``checkpoints/`` and ``run.json`` beside it are not "previous logs")."""

    @override
    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` that claims its folder atomically and continues it on resume.

    Args are those of ``lightning.pytorch.loggers.CSVLogger``.

    * A new run (``version`` not given) claims ``version_N`` with an exclusive
      ``os.mkdir``, trying the next number when another process got there first, so
      runs started together on one machine or a shared file system never share a
      folder (Lightning only lists the folders and picks the next number: a race).
    * ``bnlightning``'s CLI calls :meth:`resume` with the folder of the checkpoint it
      resumes and its step, so a run killed and resumed with ``--ckpt_path last`` has
      one ``metrics.csv`` holding the same rows an uninterrupted run would have.

    Example::

        CSVLogger(save_dir="runs", name="quickstart")   # -> runs/quickstart/version_<first free>
    """

    def __init__(
        self,
        save_dir: str = "runs",
        name: str = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(
            save_dir=save_dir,
            name=name,
            version=version,
            prefix=prefix,
            flush_logs_every_n_steps=flush_logs_every_n_steps,
        )
        self._resume_step: int | None = None
        self.flush_logs_every_n_steps = flush_logs_every_n_steps

    @property
    @override
    def version(self) -> int | str:
        if _private.csv_requested_version(self) is None:
            # Only rank zero claims; other ranks never write here, and Lightning
            # broadcasts rank zero's folders (log_dir, checkpoint dir) to them.
            rank = getattr(rank_zero_only, "rank", 0)  # set by Lightning on the decorator function
            _private.set_csv_version(
                self, claim_version(self.root_dir) if rank == 0 else _private.csv_next_version(self)
            )
        version = _private.csv_requested_version(self)
        assert version is not None, "set just above"
        return version

    @property
    def version_given(self) -> bool:
        """Whether this logger writes into a version chosen for it (``version=`` or :meth:`resume`), not a fresh one."""
        return _private.csv_requested_version(self) is not None

    def resume(self, version: int | str, step: int) -> None:
        """Write into the folder of ``version``, keeping its rows of steps before ``step``."""
        if _private.csv_writer(self) is not None:
            raise RuntimeError("CSVLogger.resume must be called before anything is logged")
        _private.set_csv_version(self, version)
        self._resume_step = step

    @override
    @rank_zero_only
    def save(self) -> None:
        try:
            super().save()
        except OSError as err:
            writer = _private.csv_writer(self)
            if err.filename is None and writer is not None:  # say which file (full disk)
                raise OSError(err.errno, err.strerror, writer.metrics_file_path) from err
            raise

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> Any:
        if _private.csv_writer(self) is None:
            os.makedirs(self.root_dir, exist_ok=True)
            step = self._resume_step
            _private.set_csv_writer(
                self, _ResumingWriter(self.log_dir, step) if step is not None else _FreshWriter(self.log_dir)
            )
        return super().experiment


def claim_version(root: str | os.PathLike[str]) -> int:
    """Create ``root/version_N`` for the first free N with an exclusive ``os.mkdir``; return N.

    ``os.mkdir`` fails if the folder exists, also on NFS, so two processes never get
    the same N.

    Raises:
        OSError: ``root`` cannot be created or written (read-only, full, no permission).

    Example::

        claim_version("runs/quickstart")  # 0 in an empty folder, then 1, 2, ...
    """
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    taken = [
        int(d[len("version_") :])
        for d in os.listdir(root)
        if d.startswith("version_") and d[len("version_") :].isdigit()
    ]
    n = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(os.path.join(root, f"version_{n}"))
            _claimed.append(os.path.join(root, f"version_{n}"))
            return n
        except FileExistsError:
            n += 1


#: Folders claimed by this process (for :func:`discard_unused_claims`).
_claimed: list[str] = []
#: What a folder may hold and still be a run that never started (nothing to keep).
_NOT_A_RUN = {".lock", "config.yaml", "hparams.yaml", "checkpoints", "metrics.csv"}


def discard_unused_claims() -> None:
    """Remove the folders this process claimed for runs that failed before training began.

    A run that started training has a ``run.json`` (its status says how it ended) and
    stays; a folder holding only the lock, the config files, an empty ``checkpoints/``
    or a ``metrics.csv`` without rows is removed, so failed start-ups leave no empty
    ``version_N`` behind.
    """
    import shutil

    while _claimed:
        folder = _claimed.pop()
        try:
            names = set(os.listdir(folder))
        except OSError:
            continue
        ckpts = os.path.join(folder, "checkpoints")
        if not names <= _NOT_A_RUN or (os.path.isdir(ckpts) and os.listdir(ckpts)):
            continue
        metrics = os.path.join(folder, "metrics.csv")
        if os.path.isfile(metrics) and _whole_rows(metrics)[1]:
            continue
        shutil.rmtree(folder, ignore_errors=True)


def csv_logger(loggers: list[Any]) -> _LightningCSVLogger | None:
    """The first CSV logger: its version folder is the run's folder."""
    return next((lg for lg in loggers if isinstance(lg, _LightningCSVLogger)), None)


def logger_identity(loggers: list[Any]) -> dict[str, Any]:
    """What a checkpoint must remember to continue the same runs: CSV version, W&B id."""
    ident: dict[str, Any] = {}
    for logger in loggers:
        if isinstance(logger, _LightningCSVLogger):
            ident["csv_version"] = logger.version
        elif isinstance(logger, _LightningWandbLogger) and _private.wandb_run(logger) is not None:
            ident["wandb_id"] = logger.version
    return ident


def resume_loggers(loggers: list[Any], ident: dict[str, Any], step: int) -> None:
    """Point fresh loggers at the runs a checkpoint came from (see ``logger_identity``)."""
    for logger in loggers:
        if isinstance(logger, CSVLogger) and "csv_version" in ident:
            logger.resume(ident["csv_version"], step)
        elif isinstance(logger, WandbLogger) and "wandb_id" in ident:
            logger.resume(ident["wandb_id"])
