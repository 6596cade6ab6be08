"""The LightningModule every bnlightning architecture shares.

A subclass builds ``self.net`` (an ``nn.Sequential`` whose children carry readable
names such as ``conv5`` or ``fc9``) and says which loss it trains with. This class
holds what is common: the ``loss(batch)`` method the measurement callbacks call, the
training/validation/test steps, torchmetrics accuracy, the optimizer injected from
YAML, and divergence detection.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from bnlightning._private import logs_this_step
from bnlightning.models.norms import NORM_KINDS

LossKind = Literal["cross_entropy", "mse", "sum_squared"]
InitKind = Literal["xavier_uniform", "kaiming", "default"]
NormPosition = Literal["before", "after"]


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """The paper's optimizer: plain SGD, no momentum, no weight decay, eta = 0.1."""
    return torch.optim.SGD(params, lr=0.1)


def init_weights(net: nn.Module, init: str, gain: float = 1.0) -> None:
    """Initialise every Conv/Linear weight (biases to zero) with the named scheme.

    ``gain`` multiplies every initial weight (the scheme's own gain times ``gain``), so a
    sweep over it asks how careful the initialisation must be (Ioffe & Szegedy); with
    ``init="default"`` PyTorch's own initial weights are scaled.

    Raises:
        ValueError: an unknown scheme or a gain that is not a positive finite number.
    """
    if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 < gain < float("inf"):
        raise ValueError(f"init_gain must be a positive number, got {gain!r}")
    if init not in ("xavier_uniform", "kaiming", "default"):
        raise ValueError(f"unknown init {init!r}; accepted: xavier_uniform, kaiming, default")
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if init == "xavier_uniform":
                nn.init.xavier_uniform_(m.weight, gain=gain)
            elif init == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.weight.data.mul_(gain)
            else:
                m.weight.data.mul_(gain)
            if init != "default" and m.bias is not None:
                nn.init.zeros_(m.bias)


def check_dropout(p: float) -> None:
    """Raise ``ValueError`` unless ``0 <= p < 1`` (p = 1 would zero every activation)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {p!r}")


def check_norm_options(norm: str, norm_layers: list[int] | None, num_layers: int, what: str) -> list[int]:
    """Validate the norm name and layer indices; return the indices that get a norm."""
    if norm not in NORM_KINDS:
        raise ValueError(f"unknown norm {norm!r}; accepted: {', '.join(NORM_KINDS)}")
    if norm_layers is None:
        return list(range(num_layers))
    bad = [i for i in norm_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"norm_layers index {bad[0]} out of range: this network has {num_layers} {what} layers, so indices run "
            f"from 0 to {num_layers - 1}"
        )
    return sorted(set(norm_layers))


class BaseModule(pl.LightningModule):
    """The training system every bnlightning network shares; the network itself is handed in.

    A network class (``VGG``, ``MLP``, ``ResNet``) declares only its architecture arguments,
    builds its ``nn.Sequential`` and passes it here as ``net``, with every other keyword
    argument (``**kwargs``) passed on unchanged. The training options below are therefore
    declared once, here: LightningCLI follows ``**kwargs`` into this signature, so
    ``model.init_args.loss`` or ``model.init_args.optimizer`` in a YAML file, ``--print_config``
    and ``--model.help`` list them for every network class, with the help text below.

    The one thing the measurement callbacks need from a module is ``loss(batch)``: the
    scalar training objective on a batch, computed with the module's current parameters.

    Args:
        net: the network (handed in by the network class; any ``nn.Module`` works).
        num_outputs: the network's output width: the classes accuracy counts under
            ``cross_entropy`` (handed in by the network class, which records it under its
            own name: ``num_classes`` for VGG and ResNet, ``out_features`` for MLP).
        loss: ``cross_entropy`` (classification, logs accuracy), ``mse`` (mean squared
            error) or ``sum_squared`` (squared error summed over samples and outputs, the
            deep linear network's loss).
        init: initialisation of every Conv/Linear weight: xavier_uniform (the paper's),
            kaiming or default (PyTorch's own); biases start at zero except with default.
        init_gain: multiplies every initial weight (see ``init_weights``; > 0).
        optimizer: a callable from parameters to an optimizer; in YAML a ``class_path``
            such as ``torch.optim.SGD`` with ``init_args``. Default: SGD, lr 0.1.
        lr_scheduler: optional callable from optimizer to scheduler (stepped every step).
        compile: compile the network with ``torch.compile`` (parameter names are kept).
        divergence_check_every_n_steps: how often the host reads the non-finite-loss flag;
            the step of divergence is exact whatever the value (it is tracked on device).

    Raises:
        ValueError: an unknown loss or init, a gain that is not a positive number, a
            divergence check interval below 1 (one line naming the value).

    Example::

        from torchvision.models import resnet18

        model = BaseModule(net=resnet18(num_classes=10), num_outputs=10, init="default")
    """

    _first_bad_step: Tensor  # a registered buffer: the first step whose loss was not finite (-1: none)

    net: nn.Module

    def __init__(
        self,
        net: nn.Module,
        num_outputs: int,
        *,
        loss: LossKind = "cross_entropy",
        init: InitKind = "xavier_uniform",
        init_gain: float = 1.0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,
        divergence_check_every_n_steps: int = 10,
    ) -> None:
        super().__init__()
        if loss not in LossKind.__args__:  # type: ignore[attr-defined]
            raise ValueError(f"unknown loss {loss!r}; accepted: {', '.join(LossKind.__args__)}")  # type: ignore[attr-defined]
        if divergence_check_every_n_steps < 1:
            raise ValueError(f"divergence_check_every_n_steps must be >= 1, got {divergence_check_every_n_steps}")
        # Lightning collects this frame's arguments and the network class's (whose **kwargs
        # hold the options above that the caller set). net and num_outputs are left out: the
        # network class records the user's own setting under its own name; the optimizer and
        # scheduler are callables (the CLI config records their class_path and init_args).
        self.save_hyperparameters(ignore=["net", "num_outputs", "optimizer", "lr_scheduler"])
        self.loss_kind = loss
        self.num_classes = num_outputs
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.compile_net = compile
        self.divergence_check_every_n_steps = divergence_check_every_n_steps
        self.diverged_at_step: int | None = None
        if loss == "cross_entropy":
            self.train_acc = MulticlassAccuracy(num_outputs, average="micro")
            self.val_acc = MulticlassAccuracy(num_outputs, average="micro")
            self.test_acc = MulticlassAccuracy(num_outputs, average="micro")
        # First step whose loss was non-finite, kept on device so no step waits on the host.
        self.register_buffer("_first_bad_step", torch.tensor(-1, dtype=torch.long), persistent=False)
        init_weights(net, init, init_gain)
        self.net = net

    # --- the measurement contract -------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def criterion(self, out: Tensor, y: Tensor) -> Tensor:
        if self.loss_kind == "cross_entropy":
            return F.cross_entropy(out, y)
        if self.loss_kind == "mse":
            return F.mse_loss(out, y)
        return (out - y).pow(2).sum()

    def loss(self, batch: Any) -> Tensor:
        """The training objective on ``batch`` with the current parameters."""
        x, y = batch
        return self.criterion(self(x), y)

    # --- steps --------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.compile_net and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch
        out = self(x)
        loss = self.criterion(out, y)
        on_step = stage == "train"
        if on_step and not self._logs_this_step():
            return loss
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=not on_step, prog_bar=True, sync_dist=not on_step)
        if self.loss_kind == "cross_entropy":
            metric = getattr(self, f"{stage}_acc")
            metric(out.detach(), y)
            self.log(f"{stage}/acc", metric, on_step=on_step, on_epoch=not on_step, prog_bar=stage != "train")
        return loss

    def _logs_this_step(self) -> bool:
        """Whether Lightning hands this step's metrics to the loggers.

        Per-step values are only written every ``log_every_n_steps`` steps (each is the
        value of its own batch), so computing and logging them on the other steps is
        pure overhead: skipping them changes no logged number.
        """
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer (a plain forward in a test or notebook)
            return True
        return logs_this_step(trainer)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._shared_step(batch, "train")
        self._track_divergence(loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- divergence ---------------------------------------------------------------
    def _track_divergence(self, loss: Tensor) -> None:
        step = self.global_step
        bad = ~torch.isfinite(loss.detach())
        unset = self._first_bad_step < 0
        self._first_bad_step.copy_(
            torch.where(bad & unset, torch.full_like(self._first_bad_step, step), self._first_bad_step)
        )
        if (step + 1) % self.divergence_check_every_n_steps == 0:
            self._stop_if_diverged()

    def on_train_end(self) -> None:
        if self.diverged_at_step is None:
            self._stop_if_diverged()

    def _stop_if_diverged(self) -> None:
        first_bad = int(self._first_bad_step.item())
        # Every rank reaches this line on the same steps, so the all-reduce cannot hang.
        diverged = self.trainer.strategy.reduce_boolean_decision(first_bad >= 0, all=False)
        if not diverged or self.diverged_at_step is not None:
            return
        step = int(
            self.trainer.strategy.reduce(
                torch.tensor(first_bad if first_bad >= 0 else 2**62, device=self.device), reduce_op="min"
            ).item()
        )
        self.diverged_at_step = step
        self.trainer.should_stop = True
        for logger in self.loggers:
            logger.log_metrics({"diverged_at_step": float(step)}, step=self.global_step)
        rank_zero_info(f"bnlightning: training diverged (non-finite loss) at step {step}; stopping this run cleanly.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["diverged_at_step"] = self.diverged_at_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.diverged_at_step = checkpoint.get("diverged_at_step")
