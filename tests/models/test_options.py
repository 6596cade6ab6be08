"""The training options live once, on BaseModule; the network classes declare only their architecture.

LightningCLI follows each network class's ``**kwargs`` into ``BaseModule.__init__``, so the
YAML keys, the hyperparameters a run records and the CLI help stay what they were when every
class repeated the options.
"""

from __future__ import annotations

import copy
import inspect
import re
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnlightning.cli import main
from bnlightning.models import MLP, VGG, BaseModule, ResNet
from tests.helpers.callbacks import Recorder

NETWORKS = {"VGG": VGG, "MLP": MLP, "ResNet": ResNet}
#: The training options; BaseModule must keep at least these (it may gain more).
TRAINING_OPTIONS = {
    "loss",
    "init",
    "init_gain",
    "optimizer",
    "lr_scheduler",
    "compile",
    "divergence_check_every_n_steps",
}
#: The hyperparameters (W&B config keys) each class recorded before the options moved to
#: BaseModule: the shared training options (the callables are not recorded) and its own.
TRAINING_RECORDED = {"loss", "init", "init_gain", "compile", "divergence_check_every_n_steps"}
RECORDED = {
    "VGG": TRAINING_RECORDED
    | {
        "config",
        "norm",
        "norm_position",
        "norm_affine",
        "norm_layers",
        "in_channels",
        "num_classes",
        "width",
        "channels_last",
        "weight_standardization",
        "dropout",
    },
    "MLP": TRAINING_RECORDED
    | {
        "in_features",
        "out_features",
        "depth",
        "width",
        "activation",
        "norm",
        "norm_position",
        "norm_affine",
        "norm_layers",
        "bias",
        "dropout",
    },
    "ResNet": TRAINING_RECORDED
    | {
        "depth",
        "norm",
        "norm_affine",
        "width",
        "weight_standardization",
        "skipinit",
        "dropout",
        "in_channels",
        "num_classes",
    },
}
SMALL = {
    "VGG": {"config": "A", "width": 1 / 16},
    "MLP": {"in_features": 12, "depth": 2, "width": 8},
    "ResNet": {"width": 0.25},
}


def _base_options() -> dict[str, inspect.Parameter]:
    return {
        n: p
        for n, p in inspect.signature(BaseModule.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def test_base_module_declares_the_training_options_as_keywords() -> None:
    assert TRAINING_OPTIONS <= set(_base_options())


@pytest.mark.parametrize("name", NETWORKS)
def test_network_classes_declare_only_their_architecture(name: str) -> None:
    params = inspect.signature(NETWORKS[name].__init__).parameters
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()), (
        f"{name} must pass **kwargs on to BaseModule"
    )
    # ResNet re-declares init only to change its default (He et al.'s kaiming)
    redeclared = set(params) & set(_base_options())
    assert redeclared == ({"init"} if name == "ResNet" else set())
    if name == "ResNet":
        assert params["init"].default == "kaiming"


@pytest.mark.parametrize("name", NETWORKS)
def test_hyperparameters_are_the_ones_recorded_before(name: str) -> None:
    model = NETWORKS[name](**SMALL[name])
    assert set(model.hparams) == RECORDED[name]
    assert model.hparams["loss"] == "cross_entropy" and model.hparams["init_gain"] == 1.0
    assert model.hparams["init"] == ("kaiming" if name == "ResNet" else "xavier_uniform")


@pytest.mark.parametrize("name", NETWORKS)
def test_training_options_reach_every_network_class(name: str) -> None:
    def optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=3e-4)

    out = 7
    size = {"num_classes": out} if name != "MLP" else {"out_features": out}
    model = NETWORKS[name](
        **SMALL[name],
        **size,
        loss="mse",
        init="default",
        init_gain=2.0,
        optimizer=optimizer,
        compile=True,
        divergence_check_every_n_steps=3,
    )
    assert (model.loss_kind, model.num_classes, model.compile_net, model.divergence_check_every_n_steps) == (
        "mse",
        out,
        True,
        3,
    )
    assert not hasattr(model, "train_acc"), "accuracy is for cross_entropy only"
    assert isinstance(model.configure_optimizers(), torch.optim.Adam)
    assert {k: model.hparams[k] for k in ("loss", "init", "init_gain", "compile")} == {
        "loss": "mse",
        "init": "default",
        "init_gain": 2.0,
        "compile": True,
    }
    assert "net" not in model.hparams and "num_outputs" not in model.hparams and "optimizer" not in model.hparams


def test_init_gain_through_kwargs_scales_the_same_initial_weights() -> None:
    torch.manual_seed(0)
    plain = MLP(in_features=12, depth=2, width=8)
    torch.manual_seed(0)
    doubled = MLP(in_features=12, depth=2, width=8, init_gain=2.0)
    torch.testing.assert_close(doubled.net.fc1.weight, 2 * plain.net.fc1.weight)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "l2"}, r"unknown loss 'l2'; accepted: cross_entropy, mse, sum_squared"),
        ({"init": "orthogonal"}, r"unknown init 'orthogonal'; accepted: xavier_uniform, kaiming, default"),
        ({"init_gain": 0.0}, r"init_gain must be a positive number, got 0.0"),
        ({"divergence_check_every_n_steps": 0}, r"divergence_check_every_n_steps must be >= 1, got 0"),
    ],
)
def test_bad_training_options_are_one_line_for_every_network(kwargs: dict[str, Any], message: str) -> None:
    for name, cls in NETWORKS.items():
        with pytest.raises(ValueError, match=message):
            cls(**SMALL[name], **kwargs)


def test_a_misspelt_option_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="learning_rate"):
        MLP(learning_rate=0.1)


def _cli_help(name: str, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """``--model.help`` of the real CLI as {option: its help text}."""
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", f"bnlightning.models.{name}"])
    text = capsys.readouterr().out.split("\nHelp for", 1)[1]
    helps: dict[str, str] = {}
    for block in re.split(r"\n  (?=--model\.)", text)[1:]:
        option, *words = block.split()
        name = option.removeprefix("--model.")
        metavar = {name.rsplit(".", 1)[-1].upper(), name.upper() + ",", f"{option}+", f"{option},"}
        while words and (
            words[0] in metavar or re.fullmatch(r"\[?\{[^}]*\}\]?,?", words[0])
        ):  # {true,false}, NORM_LAYERS
            words.pop(0)
        helps[name] = " ".join(words)
    return helps


@pytest.mark.parametrize("name", NETWORKS)
def test_the_cli_lists_every_option_once_with_its_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    helps = _cli_help(name, capsys)
    own = {
        n
        for n, p in inspect.signature(NETWORKS[name].__init__).parameters.items()
        if p.kind is not inspect.Parameter.VAR_KEYWORD and n != "self"
    }
    options = {o for o in helps if "." not in o}  # optimizer.help / lr_scheduler.help are sub-entries
    assert options == own | set(_base_options())
    assert "net" not in options and "num_outputs" not in options
    missing = sorted(o for o in options if helps[o].startswith("(type:"))
    assert not missing, f"options without help text (document them in the class docstring's Args): {missing}"
    assert helps["loss"].startswith("``cross_entropy`` (classification, logs accuracy)")


def _fit_logged(model: BaseModule, every: int) -> dict[int, dict[str, float]]:
    torch.manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(56, 12), torch.randint(0, 10, (56,))), batch_size=8)
    rec = Recorder(prefixes=("train",))
    kw: dict[str, Any] = {
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "accelerator": "cpu",
    }
    pl.Trainer(max_steps=7, logger=rec, log_every_n_steps=every, **kw).fit(model, data)
    return rec.logged


class _LogsEveryStep(MLP):
    """Computes and logs the step metrics on every step, as Lightning's own modules do."""

    def _logs_this_step(self) -> bool:
        return True


def test_skipping_unlogged_steps_changes_no_logged_number() -> None:
    torch.manual_seed(0)
    model = MLP(in_features=12, depth=2, width=8, norm="batch")
    reference = _LogsEveryStep(in_features=12, depth=2, width=8, norm="batch")
    reference.load_state_dict(copy.deepcopy(model.state_dict()))
    got, want = _fit_logged(model, every=3), _fit_logged(reference, every=3)
    assert sorted(got) == [2, 5] and got == want
    assert {"train/loss", "train/acc"} <= set(got[2])


def test_base_module_trains_a_network_nobody_here_wrote() -> None:
    """The system takes any network: torchvision's ResNet-18, its own initial weights kept."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18(num_classes=3)
    untouched = copy.deepcopy(net)
    model = BaseModule(net=net, num_outputs=3, init="default", optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    assert all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(), untouched.state_dict().values()))
    assert set(model.hparams) == TRAINING_RECORDED
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    torch.testing.assert_close(model.loss((x, y)), nn.functional.cross_entropy(untouched(x), y))
    assert isinstance(model.configure_optimizers(), torch.optim.SGD)
