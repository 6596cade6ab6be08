"""Fully connected networks: Ioffe & Szegedy's sigmoid MLP and the paper's deep linear network."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

from torch import nn

from bnlightning.models.base import BaseModule, NormPosition, check_dropout, check_norm_options
from bnlightning.models.norms import NormKind, make_norm

ActivationKind = Literal["relu", "tanh", "sigmoid", "identity"]
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def build_mlp(
    in_features: int,
    out_features: int,
    depth: int,
    width: int,
    activation: str,
    norm: str,
    norm_position: str = "before",
    norm_affine: bool = True,
    norm_layers: list[int] | None = None,
    bias: bool = True,
    dropout: float = 0.0,
) -> nn.Sequential:
    """A flat ``nn.Sequential`` named ``fc1, norm1, act1, ..., fc{depth+1}``.

    ``depth`` hidden layers of ``width`` units, then the output layer ``fc{depth+1}``.
    ``norm_layers`` holds 0-based indices of hidden layers that get a norm; ``dropout > 0``
    adds ``drop{i}`` (``nn.Dropout``) at the end of every hidden block.
    """
    if depth < 0 or width < 1:
        raise ValueError(f"depth must be >= 0 and width >= 1, got depth={depth}, width={width}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; accepted: {', '.join(ACTIVATIONS)}")
    if norm_position not in ("before", "after"):
        raise ValueError(f"unknown norm_position {norm_position!r}; accepted: before, after")
    check_dropout(dropout)
    with_norm = set(check_norm_options(norm, norm_layers, depth, "hidden")) if depth else set()
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    features = in_features
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(features, width, bias=bias)
        has_norm = norm != "none" and (i - 1) in with_norm
        if has_norm and norm_position == "before":
            layers[f"norm{i}"] = make_norm(norm, width, dims=1, affine=norm_affine)
        if activation != "identity":
            layers[f"act{i}"] = ACTIVATIONS[activation]()
        if has_norm and norm_position == "after":
            layers[f"norm{i}"] = make_norm(norm, width, dims=1, affine=norm_affine)
        if dropout > 0:
            layers[f"drop{i}"] = nn.Dropout(dropout)
        features = width
    layers[f"fc{depth + 1}"] = nn.Linear(features, out_features, bias=bias)
    return nn.Sequential(layers)


class MLP(BaseModule):
    """A multi-layer perceptron; with ``activation=identity`` a deep linear network.

    The paper's deep linear network is ``MLP(in_features=10, out_features=10, depth=24,
    width=10, activation="identity", bias=False, loss="sum_squared")``: 25 layers of
    10x10. Ioffe & Szegedy's MNIST-style net is 3 hidden layers of 100 sigmoid units.
    The architecture arguments are below; the training options (``loss``, ``init``,
    ``init_gain``, ``optimizer``, ``lr_scheduler``, ``compile``,
    ``divergence_check_every_n_steps``) are keyword arguments of ``BaseModule``.

    Args:
        in_features: input size.
        out_features: outputs (classes, or regression targets).
        depth: number of hidden layers.
        width: units per hidden layer.
        activation: relu, tanh, sigmoid or identity.
        norm: none, batch, noisy_batch, l1, l2, linf, layer or group.
        norm_position: the norm ``before`` (as Ioffe & Szegedy) or ``after`` the activation.
        norm_affine: learnable gamma/beta in the norm.
        norm_layers: 0-based hidden-layer indices that get a norm (default: all).
        bias: biases in the Linear layers.
        dropout: dropout probability after every hidden block, in [0, 1) (0: none).
        **kwargs: the training options of ``BaseModule``.

    Example::

        model = MLP(in_features=64, out_features=10, depth=3, width=100, activation="sigmoid", norm="batch")
    """

    def __init__(
        self,
        in_features: int = 64,
        out_features: int = 10,
        depth: int = 3,
        width: int = 100,
        activation: ActivationKind = "sigmoid",
        norm: NormKind = "none",
        norm_position: NormPosition = "before",
        norm_affine: bool = True,
        norm_layers: list[int] | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        net = build_mlp(
            in_features=in_features,
            out_features=out_features,
            depth=depth,
            width=width,
            activation=activation,
            norm=norm,
            norm_position=norm_position,
            norm_affine=norm_affine,
            norm_layers=norm_layers,
            bias=bias,
            dropout=dropout,
        )
        super().__init__(net=net, num_outputs=out_features, **kwargs)
