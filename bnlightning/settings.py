"""What makes two runs the same experiment: one definition for the resume policy and the report.

A run's *setting* is its whole LightningCLI config (``config.yaml``) except the
:data:`BOOKKEEPING_KEYS`: where it resumes from and how that file is loaded, which files
configured it, where it logs, how often it checkpoints and what the console shows. None of
them changes what a run trains. The two readers of a setting each set one more group aside,
for a reason of their own:

* ``--ckpt_path`` (``bnlightning.resume``) also lets the measurements change
  (:data:`OBSERVER_KEYS`: they observe, they do not train, so the same command with a
  measurement or fault-injection callback added still continues its run). A run with
  another seed is another run: :data:`RESUME_ONLY_KEYS`.
* The report (``bnlightning.report.runs``) counts the seeds as repeats of one setting
  (:data:`SEED_KEYS`) and keeps the callbacks, which some claims sweep: :data:`NOT_SETTINGS`.

Keys are dotted paths into the config; a key also covers everything below it
(``checkpoint`` covers ``checkpoint.every_n_train_steps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Keys that never make two runs different experiments: where a run resumes from and how the
#: file is loaded, which files configured it, where it logs (its folder decides which run the
#: loggers continue), how often it checkpoints, and console output. ``dataset_name`` is the
#: data module's label that the loggers record beside the config.
BOOKKEEPING_KEYS: tuple[str, ...] = (
    "ckpt_path",
    "weights_only",
    "config",
    "dataset_name",
    "checkpoint",
    "trainer.logger",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)

#: The seeds: the report's repeats of one setting; for a resume, part of the run.
SEED_KEYS: tuple[str, ...] = ("seed_everything", "data.init_args.seed")

#: The measurements: a resume may add or drop them; the report tells settings apart by them.
OBSERVER_KEYS: tuple[str, ...] = ("trainer.callbacks",)

#: What may differ between a run and the command that resumes it.
RESUME_ONLY_KEYS: tuple[str, ...] = BOOKKEEPING_KEYS + OBSERVER_KEYS

#: What never makes two runs different settings in the report: runs of one setting differ by seed alone.
NOT_SETTINGS: tuple[str, ...] = BOOKKEEPING_KEYS + SEED_KEYS


def covers(ignored: str, key: str) -> bool:
    """Whether the dotted key ``ignored`` is ``key`` or a section holding it."""
    return key == ignored or key.startswith(ignored + ".")


def is_setting_key(key: str, ignored: Sequence[str] = NOT_SETTINGS) -> bool:
    """Whether the flattened config key ``key`` (``"model.init_args.norm"``) is part of a setting.

    Example:
        >>> is_setting_key("model.init_args.norm"), is_setting_key("checkpoint.every_n_train_steps")
        (True, False)
    """
    return not any(covers(i, key) for i in ignored)


def without_keys(config: dict[str, Any], keys: Sequence[str] = RESUME_ONLY_KEYS) -> dict[str, Any]:
    """``config`` (a nested config, as dumped or saved) without ``keys``; ``config`` itself is left as it was.

    Example:
        >>> without_keys({"ckpt_path": "last", "trainer": {"logger": [], "max_steps": 5}})
        {'trainer': {'max_steps': 5}}
    """
    out = dict(config)
    for key in keys:
        *parents, last = key.split(".")
        node = out
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                break
            node[part] = node = dict(child)  # copied on the way down: the caller's config stays whole
        else:
            node.pop(last, None)
    return out
