"""A WandbLogger that never stops training: offline when it must, local logs always.

Lightning's ``WandbLogger`` needs credentials and a reachable server; without them
``wandb.init`` fails or blocks. This subclass decides offline mode up front when no
credentials exist (and says so once), falls back to offline mode when ``wandb.init``
fails, and turns errors while logging into one warning, so a run keeps training and
its other loggers (the CSV log the report reads) keep every metric.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override


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
        extra = {k: v for k, v in {"entity": entity, "group": group, "job_type": job_type, "tags": tags, "notes": notes}.items() if v is not None}
        super().__init__(
            name=name, save_dir=save_dir, project=project, version=version, offline=offline, log_model=log_model, prefix=prefix, **extra
        )
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb; Lightning always passes it
        self._warned_log_error = False

    @property
    @override
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        if self._offline and self._offline_reason:
            rank_zero_info(f"bnlightning: W&B offline mode ({self._offline_reason}); {sync_hint(self.save_dir or '.')}")
            self._offline_reason = ""
        try:
            return super().experiment
        except Exception as err:  # wandb raises many types for "cannot reach the server"
            if self._offline:
                raise
            rank_zero_warn(f"bnlightning: wandb.init failed ({type(err).__name__}: {err}); switching to W&B offline mode; {sync_hint(self.save_dir or '.')}")
            self._offline = True
            self._experiment = None
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
        try:
            super().log_hyperparams(params)
        except Exception as err:
            self._warn_log_error(err)

    def _warn_log_error(self, err: Exception) -> None:
        if not self._warned_log_error:
            rank_zero_warn(f"bnlightning: W&B logging failed ({type(err).__name__}: {err}); training goes on and the local CSV log keeps every metric.")
            self._warned_log_error = True
