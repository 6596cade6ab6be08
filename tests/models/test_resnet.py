"""ResNet-20 with the VGG's norm options, and the residual-branch variance measurement (claim 8)."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bnlightning.callbacks import ResidualVariance, residual_variance
from bnlightning.models import ResNet
from bnlightning.models.norms import NORM_KINDS


@pytest.mark.parametrize("norm", NORM_KINDS)
def test_every_norm_builds_and_trains_a_step(norm: str) -> None:
    torch.manual_seed(0)
    model = ResNet(norm=norm, width=0.25)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    model.loss((x, y)).backward()
    assert all(p.grad is not None for p in model.parameters())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 + 2  # 19 3x3 convs + 2 projection shortcuts; + fc = ResNet-20's 20 weight layers (+2)


def test_full_width_resnet20_has_its_published_size_and_bad_input_is_one_line() -> None:
    assert sum(p.numel() for p in ResNet().parameters()) == pytest.approx(0.27e6, rel=0.03)
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        ResNet(depth=21)
    with pytest.raises(ValueError, match="unknown norm 'bn'"):
        ResNet(norm="bn")  # type: ignore[arg-type]


def test_residual_variance_matches_a_plain_computation_and_bn_downscales_the_branch() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    ratios = {}
    for norm in ("none", "batch"):
        model = ResNet(norm=norm, width=0.5).train()
        block = model.net.stage3.block3
        seen: dict[str, Tensor] = {}
        block.branch.register_forward_hook(lambda m, a, o, seen=seen: seen.__setitem__("b", o))
        block.shortcut.register_forward_hook(lambda m, a, o, seen=seen: seen.__setitem__("s", o))
        with torch.no_grad():
            model(x)
        out = residual_variance({"b": (seen["b"], seen["s"])})
        b, s = seen["b"].double().flatten(), seen["s"].double().flatten()
        vb = float(((b - b.mean()) ** 2).mean())
        vs = float(((s - s.mean()) ** 2).mean())
        assert math.isclose(float(out["resvar/b/branch"]), vb, rel_tol=1e-5)
        assert math.isclose(float(out["resvar/b/ratio"]), vb / vs, rel_tol=1e-5)
        ratios[norm] = vb / vs
    # The last block: with BN the branch is smaller relative to the skip path than without.
    # (ResNet-20's BN projection shortcuts reset the skip variance every stage, so only by ~1.5x here.)
    assert ratios["batch"] < 0.8 * ratios["none"], ratios


class _Rec(Logger):
    name = "m"  # type: ignore[assignment]
    version = 0  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.logged: dict[int, dict[str, float]] = {}

    def log_hyperparams(self, *a: Any, **k: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.setdefault(int(step), {}).update(
            {k: float(v) for k, v in metrics.items() if k.startswith("resvar/")}
        )


def test_callback_measures_every_block_and_leaves_training_unchanged() -> None:
    torch.manual_seed(0)
    model = ResNet(norm="batch", width=0.25)
    plain = copy.deepcopy(model)
    data = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))), batch_size=8)
    kw: dict[str, Any] = {
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "accelerator": "cpu",
        "max_steps": 2,
        "log_every_n_steps": 1,
    }
    rec = _Rec()
    torch.manual_seed(1)
    pl.Trainer(callbacks=[ResidualVariance(every_n_steps=1)], logger=rec, **kw).fit(model, data)
    torch.manual_seed(1)
    pl.Trainer(logger=False, **kw).fit(plain, data)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    blocks = {k.split("/")[1] for k in rec.logged[0]}
    assert blocks == {f"net.stage{s}.block{b}" for s in (1, 2, 3) for b in (1, 2, 3)}
    with pytest.raises(ValueError, match="has no residual block"):
        from bnlightning.models import MLP

        pl.Trainer(callbacks=[ResidualVariance(every_n_steps=1)], logger=False, **kw).fit(
            MLP(in_features=12), DataLoader(TensorDataset(torch.randn(8, 12), torch.randint(0, 10, (8,))), batch_size=4)
        )
