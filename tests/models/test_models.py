"""VGG and MLP: every norm builds and trains a step; the norm options shape the module tree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlightning.models import MLP, VGG, LpNorm, NoisyBatchNorm
from bnlightning.models.norms import NORM_KINDS
from bnlightning.models.vgg import VGG_CONFIGS

NORM_TYPES = {
    "batch": (nn.BatchNorm1d, nn.BatchNorm2d),
    "noisy_batch": (NoisyBatchNorm,),
    "l1": (LpNorm,),
    "l2": (LpNorm,),
    "linf": (LpNorm,),
    "layer": (nn.LayerNorm, nn.GroupNorm),
    "group": (nn.GroupNorm,),
}


def _norm_modules(net: nn.Module) -> list[str]:
    return [name for name, _ in net.named_children() if name.startswith("norm")]


def _forward_backward(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    model.train()
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("config", list(VGG_CONFIGS))
@pytest.mark.parametrize("norm", NORM_KINDS)
def test_every_vgg_and_norm_runs_forward_backward(config: str, norm: str) -> None:
    torch.manual_seed(0)
    model = VGG(config=config, norm=norm, width=1 / 16)
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert model(batch[0]).shape == (4, 10)
    _forward_backward(model, batch)
    convs = [m for m in model.net if isinstance(m, nn.Conv2d)]
    assert len(convs) == sum(v != "M" for v in VGG_CONFIGS[config])
    assert len(_norm_modules(model.net)) == (0 if norm == "none" else len(convs))


@pytest.mark.parametrize("norm", NORM_KINDS)
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "identity"])
def test_every_mlp_and_norm_runs_forward_backward(norm: str, activation: str) -> None:
    torch.manual_seed(0)
    model = MLP(in_features=12, out_features=3, depth=3, width=16, activation=activation, norm=norm)
    _forward_backward(model, (torch.randn(8, 12), torch.randint(0, 3, (8,))))
    for name in _norm_modules(model.net):
        assert isinstance(getattr(model.net, name), NORM_TYPES[norm])


def test_deep_linear_network_is_25_layers_of_10x10() -> None:
    model = MLP(
        in_features=10, out_features=10, depth=24, width=10, activation="identity", bias=False, loss="sum_squared"
    )
    linears = [m for m in model.net if isinstance(m, nn.Linear)]
    assert len(linears) == 25 and all(m.weight.shape == (10, 10) and m.bias is None for m in linears)
    assert all(isinstance(m, nn.Linear) for m in model.net)  # no non-linearity at all
    x, y = torch.randn(7, 10), torch.randn(7, 10)
    torch.testing.assert_close(model.loss((x, y)), ((model(x) - y) ** 2).sum())


def test_norm_layers_selects_conv_layers_by_zero_based_index() -> None:
    model = VGG(config="A", norm="batch", norm_layers=[3], width=1 / 16)
    assert _norm_modules(model.net) == ["norm4"]
    names = list(dict(model.net.named_children()))
    assert names.index("norm4") == names.index("conv4") + 1


def test_norm_position_puts_the_norm_before_or_after_the_activation() -> None:
    before = list(dict(MLP(depth=1, norm="batch", norm_position="before").net.named_children()))
    after = list(dict(MLP(depth=1, norm="batch", norm_position="after").net.named_children()))
    assert before == ["fc1", "norm1", "act1", "fc2"]
    assert after == ["fc1", "act1", "norm1", "fc2"]
    vgg = list(dict(VGG(config="A", norm="batch", norm_position="after", width=1 / 16).net.named_children()))
    assert vgg[:3] == ["conv1", "relu1", "norm1"]


def test_norm_affine_switches_gamma_and_beta() -> None:
    with_affine = VGG(config="A", norm="batch", width=1 / 16)
    without = VGG(config="A", norm="batch", norm_affine=False, width=1 / 16)
    assert with_affine.net.norm1.weight is not None
    assert without.net.norm1.weight is None
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(with_affine) - n_params(without) == 2 * sum(
        m.num_features for m in with_affine.net if isinstance(m, nn.BatchNorm2d)
    )


def test_init_schemes() -> None:
    torch.manual_seed(0)
    model = VGG(config="A", init="xavier_uniform", width=1 / 16)
    w = model.net.conv2.weight
    fan_in, fan_out = w.shape[1] * 9, w.shape[0] * 9
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model.net.conv2.bias) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"norm": "batchnorm"},
            r"unknown norm 'batchnorm'; accepted: none, batch, noisy_batch, l1, l2, linf, layer, group",
        ),
        (
            {"norm": "batch", "norm_layers": [8]},
            r"norm_layers index 8 out of range: this network has 8 conv layers, so indices run from 0 to 7",
        ),
        ({"config": "F"}, r"unknown VGG config 'F'; accepted: A, B, D, E"),
        ({"init": "orthogonal"}, r"unknown init 'orthogonal'"),
    ],
)
def test_bad_vgg_arguments_name_the_value_and_the_choices(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VGG(width=1 / 16, **kwargs)


def test_bad_mlp_activation() -> None:
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'; accepted: relu, tanh, sigmoid, identity"):
        MLP(activation="gelu")  # type: ignore[arg-type]


def test_compile_flag_keeps_names_and_measurements_exact() -> None:
    """`compile: true` compiles the net in place; the measurement passes stay correct."""
    from bnlightning.callbacks import internal_covariate_shift, loss_landscape, sgd_update

    torch.manual_seed(0)
    batch = (torch.randn(30, 64), torch.randint(0, 10, (30,)))
    plain = MLP(depth=2, width=32, norm="batch")
    compiled = MLP(depth=2, width=32, norm="batch", compile=True)
    compiled.load_state_dict(plain.state_dict())
    compiled.configure_model()
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in plain.named_parameters()]
    torch.testing.assert_close(compiled.loss(batch), plain.loss(batch))
    for fn in (
        lambda m: internal_covariate_shift(m, batch, sgd_update(0.1)),
        lambda m: loss_landscape(m, batch, [0.05, 0.1]),
    ):
        want, got = fn(plain), fn(compiled)
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
