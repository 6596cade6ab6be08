"""Mean shift (PROTOCOL §10): the pure function against plain loops, and the callback in a Trainer."""

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

from bnlightning.callbacks import MeanShift, mean_shift
from bnlightning.models import VGG
from tests.helpers.callbacks import batch_for, mlp, vgg

TRAINER_KW: dict[str, Any] = {
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "accelerator": "cpu",
}


def reference_cos(a: Tensor) -> float:
    """Mean cosine over ordered pairs of different examples, with explicit loops (zero vector -> 0)."""
    rows = [r.double().flatten() for r in a]
    total, pairs = 0.0, 0
    for i, u in enumerate(rows):
        for j, v in enumerate(rows):
            if i == j:
                continue
            nu, nv = float(u.norm()), float(v.norm())
            total += 0.0 if nu == 0 or nv == 0 else float(u @ v) / (nu * nv)
            pairs += 1
    return total / pairs


def reference_channel_mean(a: Tensor) -> float:
    channels = [a[:, c].double().mean().item() for c in range(a.shape[1])]
    return sum(channels) / len(channels)


def reference_majority(logits: Tensor) -> float:
    labels = [int(row.argmax()) for row in logits]
    return max(labels.count(k) for k in set(labels)) / len(labels)


@pytest.mark.parametrize("shape", [(7, 5), (6, 3, 4, 4), (2, 9)])
def test_mean_shift_matches_plain_loops(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.relu(torch.randn(*shape, generator=g) + 0.3)
    a[1] = 0.0  # a silent example: cosine 0 with everyone, by definition
    logits = torch.randn(shape[0], 4, generator=g)
    out = mean_shift({"layer": a}, logits)
    assert math.isclose(float(out["meanshift/layer/cos"]), reference_cos(a), rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(float(out["meanshift/layer/channel_mean"]), reference_channel_mean(a), rel_tol=1e-5)
    assert math.isclose(float(out["meanshift/majority_share"]), reference_majority(logits), rel_tol=1e-6)


def test_mean_shift_extremes() -> None:
    same = torch.ones(5, 8) * torch.arange(1.0, 9.0)
    # 12 ordered pairs: 4 opposite (cos -1), 8 orthogonal (cos 0) -> mean -1/3.
    signs = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    out = mean_shift({"same": same, "signs": signs}, logits=torch.tensor([[0.0, 1.0]] * 3 + [[1.0, 0.0]]))
    assert math.isclose(float(out["meanshift/same/cos"]), 1.0, rel_tol=1e-6)
    assert math.isclose(float(out["meanshift/signs/cos"]), -1 / 3, rel_tol=1e-6)
    assert float(out["meanshift/majority_share"]) == 0.75


def test_mean_shift_bad_input_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="at least 2 examples"):
        mean_shift({"x": torch.randn(1, 4)})
    with pytest.raises(ValueError, match="batch first with features"):
        mean_shift({"x": torch.randn(4)})
    with pytest.raises(ValueError, match=r"logits must be \(N, classes\)"):
        mean_shift({}, logits=torch.randn(4))


class Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.logged: dict[int, dict[str, float]] = {}

    name = "memory"  # type: ignore[assignment]
    version = 0  # type: ignore[assignment]

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        ours = {k: float(v) for k, v in metrics.items() if k.startswith("meanshift/")}
        if ours:
            self.logged.setdefault(int(step), {}).update(ours)


def _fit(model: pl.LightningModule, callbacks: list[Any], steps: int) -> None:
    x, y = batch_for(model, n=16, seed=3)
    data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    loggers = [c for c in callbacks if isinstance(c, Logger)]
    callbacks = [c for c in callbacks if not isinstance(c, Logger)]
    torch.manual_seed(0)
    pl.Trainer(max_steps=steps, callbacks=callbacks, logger=loggers or False, log_every_n_steps=1, **TRAINER_KW).fit(
        model, data
    )


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_callback_logs_the_function_of_the_initial_network_and_changes_nothing(norm: str) -> None:
    torch.manual_seed(0)
    model = vgg(norm)
    init = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    rec = Recorder()
    _fit(model, [MeanShift(every_n_steps=1), rec], steps=2)
    # The same training without the callback ends bit-identical: the measurement is side-effect free.
    _fit(plain, [], steps=2)
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), n
    for (n, b), (_, c) in zip(model.named_buffers(), plain.named_buffers()):
        assert torch.equal(b, c), n
    # Step 0 is measured on the initial weights, in training mode, on the first batch.
    x, _ = batch_for(init, n=16, seed=3)
    captured: dict[str, Tensor] = {}
    relus = [n for n, m in init.named_modules() if isinstance(m, nn.ReLU)]
    for name in relus:
        init.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: captured.__setitem__(name, o.detach())
        )
    init.train()
    with torch.no_grad():
        logits = init(x[:8])
    logged = rec.logged[0]
    for name in relus:
        assert math.isclose(
            logged[f"meanshift/{name}/cos"], reference_cos(captured[name]), rel_tol=1e-4, abs_tol=1e-6
        ), name
    assert math.isclose(logged["meanshift/majority_share"], reference_majority(logits), rel_tol=1e-6)
    assert set(rec.logged) == {0, 1}


def test_bn_removes_the_mean_shift_at_initialisation() -> None:
    """The claim in miniature: deep in a ReLU VGG without BN the examples align; with BN they do not."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, 32, 32)
    cos = {}
    for norm in ("none", "batch"):
        model = VGG(config="D", norm=norm, width=0.125).train()
        acts: dict[str, Tensor] = {}
        model.net.relu13.register_forward_hook(lambda m, a, o, acts=acts: acts.__setitem__("last", o))
        with torch.no_grad():
            model(x)
        cos[norm] = float(mean_shift(acts)["meanshift/last/cos"])
    # ReLU outputs are non-negative, so even unrelated examples have cos ~ 1/pi > 0 (independent
    # half-normal vectors); without BN the last block's examples are almost parallel.
    assert cos["none"] > 0.95 and cos["batch"] < 0.7, cos


def test_unknown_layer_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown layer 'nope'. Valid module names: .*net.fc1, net.act1"):
        _fit(mlp("none"), [MeanShift(layers=["nope"], every_n_steps=1)], steps=1)
    with pytest.raises(ValueError, match="non-empty list"):
        MeanShift(layers=[])
