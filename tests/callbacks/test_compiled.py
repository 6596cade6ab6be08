"""A torch.compile'd module: measured eagerly (no warning where torch has ``set_stance``; the documented
warning where it has not), names carry no ``_orig_mod``, values are unchanged.

``backend="eager"`` keeps the tests fast: Dynamo traces and guards as with inductor, without codegen.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bnlightning.callbacks import ActivationStats, InternalCovariateShift, MeanShift
from bnlightning.callbacks.functional._numerics import can_run_eager
from tests.helpers import TRAINER_KW
from tests.helpers.callbacks import Recorder, batch_for, mlp


def _run(model: pl.LightningModule, fit_arg: Any = None) -> dict[int, dict[str, float]]:
    x, y = batch_for(model, n=16, seed=3)
    rec = Recorder()
    callbacks = [
        ActivationStats(every_n_steps=1, histogram=False),
        MeanShift(every_n_steps=1),
        InternalCovariateShift(every_n_steps=1),
    ]
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=2, callbacks=callbacks, logger=rec, log_every_n_steps=1, **TRAINER_KW)
    trainer.fit(fit_arg if fit_arg is not None else model, DataLoader(TensorDataset(x, y), batch_size=8))
    return rec.logged


@pytest.mark.parametrize("how", ["submodule", "fit"])
def test_compiled_module_logs_the_uncompiled_names_and_values(how: str) -> None:
    torch.manual_seed(0)
    plain = mlp("batch")
    compiled = mlp("batch")
    compiled.load_state_dict(plain.state_dict())
    expected = _run(plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "submodule":  # self.net = torch.compile(self.net): names gain `_orig_mod`
            compiled.net = torch.compile(compiled.net, backend="eager")
            got = _run(compiled)
        else:  # trainer.fit(torch.compile(module)): Lightning unwraps it and compiles forward
            got = _run(compiled, torch.compile(compiled, backend="eager"))
    # compiled regions run under set_stance("force_eager"): nothing to warn about; without it, setup warns
    assert any("torch.compile'd" in str(w.message) for w in caught) == (not can_run_eager())
    assert set(got) == set(expected) == {0, 1}
    for step in expected:
        assert set(got[step]) == set(expected[step]), step
        assert not any("_orig_mod" in k for k in got[step])
        for key, value in expected[step].items():
            assert math.isclose(got[step][key], value, rel_tol=1e-4, abs_tol=1e-6), (step, key)
