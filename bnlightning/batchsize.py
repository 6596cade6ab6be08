"""Batch-size experiments (claim 1): the learning-rate rule and BN's train/eval discrepancy.

``LinearLRScaling`` makes the learning rate follow the batch size by the linear rule
(Goyal et al. 2017): ``lr = base_lr * B / reference_batch_size``, with ``base_lr`` the
optimizer's configured lr and ``B`` the effective batch (per-process batch x processes x
accumulated micro-batches). A sweep over the batch size then needs one key only, so W&B
grid sweeps can express it.

``TrainModeAccuracy`` measures what BatchNorm's running statistics cost at small batches:
after every validation it evaluates the validation set again with the normalization layers
in *training* mode (batch statistics over chunks of the training batch size) and logs that
accuracy beside the usual eval-mode one.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlightning.data._common import check_positive_int

__all__ = ["LinearLRScaling", "TrainModeAccuracy", "training_batch_size"]


def training_batch_size(trainer: pl.Trainer) -> int:
    """The per-process training batch size: the data module's ``batch_size``, else the loader's.

    Raises:
        ValueError: neither says (give the data module a ``batch_size`` hyper-parameter).
    """
    hparams = getattr(trainer.datamodule, "hparams", None) or {}  # type: ignore[attr-defined]  # set by Lightning's connectors, not declared on Trainer
    for value in (hparams.get("batch_size"), getattr(trainer.train_dataloader, "batch_size", None)):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ValueError(
        "cannot tell the training batch size: the data module has no batch_size and the train loader none either"
    )


class LinearLRScaling(Callback):
    """Scale every optimizer group's lr by ``B / reference_batch_size`` once, at the start of fit.

    ``B`` = per-process batch x ``trainer.world_size`` x ``accumulate_grad_batches``. The
    factor is stored in the param group (``lr_batch_scale``), which is saved with the
    optimizer state, so a resumed run is not scaled twice. The scaled lr is logged as
    ``lr_scaled`` (step 0). Learning-rate schedulers built before the scaling keep their
    own ``base_lrs``; this rule is meant for constant-lr experiments.

    Args:
        reference_batch_size: the batch size at which the configured lr applies (> 0).

    Raises:
        ValueError: a non-positive ``reference_batch_size``.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: bnlightning.batchsize.LinearLRScaling
              init_args: {reference_batch_size: 128}
    """

    def __init__(self, reference_batch_size: int = 128) -> None:
        super().__init__()
        check_positive_int("reference_batch_size", reference_batch_size)
        self.reference_batch_size = reference_batch_size

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batch = training_batch_size(trainer) * trainer.world_size * trainer.accumulate_grad_batches
        factor = batch / self.reference_batch_size
        lrs = []
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                if "lr_batch_scale" not in group:  # not yet scaled (a resumed run already is)
                    group["lr"] = group["lr"] * factor
                    if "initial_lr" in group:
                        group["initial_lr"] = group["initial_lr"] * factor
                    group["lr_batch_scale"] = factor
                lrs.append(float(group["lr"]))
        for logger in trainer.loggers:
            logger.log_metrics({"lr_scaled": lrs[0] if lrs else float("nan")}, step=trainer.global_step)


def _is_batch_norm_like(module: nn.Module) -> bool:
    """Layers whose train mode normalizes with batch statistics (BN, its noisy and l_p variants)."""
    return isinstance(module, _BatchNorm) or hasattr(module, "running_mean")


class TrainModeAccuracy(Callback):
    """After each validation, the validation accuracy with BN layers in training mode.

    The module is put in eval mode except its batch-norm-like layers (those with
    ``running_mean``), which use the statistics of each chunk of ``batch_size`` validation
    examples, as during training; dropout stays off. Modes, running statistics and the RNG
    are restored afterwards (``train_mode_accuracy``), so training is untouched. Logs
    ``val/acc_train_mode`` next to ``val/acc`` (eval mode, running statistics); their
    difference is the cost of the running statistics. Chunks shorter than 2 examples are
    dropped (one example has no batch variance).

    Args:
        batch_size: examples per chunk; default the training batch size.

    Raises:
        ValueError: a non-positive ``batch_size``.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: bnlightning.batchsize.TrainModeAccuracy
    """

    def __init__(self, batch_size: int | None = None) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size, allow_none=True)
        self.batch_size = batch_size

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is None:
            return
        xs, ys = [], []
        for x, y in loader:
            xs.append(x)
            ys.append(y)
        acc = train_mode_accuracy(
            pl_module, torch.cat(xs), torch.cat(ys), self.batch_size or training_batch_size(trainer)
        )
        pl_module.log("val/acc_train_mode", acc, on_step=False, on_epoch=True)


@torch.no_grad()
def train_mode_accuracy(module: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Accuracy of ``module`` on (x, y) with BN-like layers in train mode, chunks of ``batch_size``.

    Every other layer is in eval mode (no dropout). Afterwards the module is exactly as
    before: each submodule's mode, the BN buffers (running statistics, batch counter) and
    the RNG state (noisy BN draws) are restored.

    Example::

        acc = train_mode_accuracy(model, x_val, y_val, batch_size=8)
    """
    modes = {m: m.training for m in module.modules()}
    buffers = {id(b): (b, b.detach().clone()) for m in module.modules() if _is_batch_norm_like(m) for b in m.buffers()}
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            module.eval()
            for m in module.modules():
                if _is_batch_norm_like(m):
                    m.train()
            correct, seen = torch.zeros((), device=x.device), 0
            for start in range(0, len(x), batch_size):
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                if len(xb) < 2:
                    continue
                correct += (module(xb).argmax(1) == yb).sum()
                seen += len(xb)
    finally:
        for m, training in modes.items():
            m.training = training
        for b, saved in buffers.values():
            b.copy_(saved)
    return correct / max(seen, 1)
