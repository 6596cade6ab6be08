"""One definition of a run's setting (``bnlightning.settings``), read by the resume policy and the report.

Both leave out the bookkeeping keys; the resume also lets the callbacks change and keeps the
seed, the report counts seeds as repeats and keeps the callbacks (some claims sweep them).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from bnlightning import resume
from bnlightning.report.runs import flatten
from bnlightning.settings import BOOKKEEPING_KEYS, NOT_SETTINGS, RESUME_ONLY_KEYS, is_setting_key, without_keys

CONFIG: dict[str, Any] = {
    "seed_everything": 1,
    "ckpt_path": None,
    "trainer": {
        "max_steps": 100,
        "logger": [{"class_path": "CSVLogger"}],
        "callbacks": [],
        "enable_progress_bar": True,
    },
    "model": {"class_path": "bnlightning.models.MLP", "init_args": {"norm": "batch", "width": 100}},
    "data": {"class_path": "bnlightning.data.DigitsDataModule", "init_args": {"seed": 0, "batch_size": 128}},
    "checkpoint": {"every_n_train_steps": 1000},
}


def _with(dotted: str, value: Any) -> dict[str, Any]:
    config = copy.deepcopy(CONFIG)
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return config


def _resume_same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return resume.first_difference(without_keys(a, RESUME_ONLY_KEYS), without_keys(b, RESUME_ONLY_KEYS)) is None


def _report_same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def setting(c: dict[str, Any]) -> dict[str, str]:
        return {k: repr(v) for k, v in flatten(c).items() if is_setting_key(k, NOT_SETTINGS)}

    return setting(a) == setting(b)


@pytest.mark.parametrize(
    ("key", "value", "resume_same", "report_same"),
    [
        ("trainer.logger", [], True, True),
        ("checkpoint.every_n_train_steps", 5, True, True),
        ("trainer.enable_progress_bar", False, True, True),
        ("trainer.callbacks", [{"class_path": "bnlightning.callbacks.InternalCovariateShift"}], True, False),
        ("seed_everything", 2, False, True),
        ("data.init_args.seed", 3, False, True),
        ("model.init_args.width", 50, False, False),
        ("trainer.max_steps", 200, False, False),
    ],
)
def test_resume_and_report_tell_settings_apart_from_one_definition(
    key: str, value: Any, resume_same: bool, report_same: bool
) -> None:
    changed = _with(key, value)
    assert _resume_same(CONFIG, changed) is resume_same
    assert _report_same(CONFIG, changed) is report_same


def test_both_leave_out_every_bookkeeping_key() -> None:
    assert set(BOOKKEEPING_KEYS) <= set(RESUME_ONLY_KEYS) and set(BOOKKEEPING_KEYS) <= set(NOT_SETTINGS)
    assert resume.RESUME_ONLY_KEYS is RESUME_ONLY_KEYS


def test_without_keys_leaves_the_config_whole() -> None:
    config = copy.deepcopy(CONFIG)
    out = without_keys(config, ("trainer.logger", "data.init_args.seed", "checkpoint", "absent.key"))
    assert config == CONFIG, "the caller's config is not changed"
    assert "logger" not in out["trainer"] and "checkpoint" not in out and "seed" not in out["data"]["init_args"]
    assert out["data"]["init_args"]["batch_size"] == 128 and out["model"] == CONFIG["model"]
