"""``MeanShift``: how alike different examples look inside the network (PROTOCOL §10).

Brock et al. (2021) and the article "Batch Normalization… or not?": without normalization, ReLU outputs have a positive
mean per channel, the shift grows with depth, and every example's hidden representation points the same way, until the
network predicts one label for every input at initialisation. BatchNorm removes the per-channel mean at every layer;
scaled weight standardisation removes it from the weights instead.

``mean_shift`` (``functional/meanshift.py``) is the pure function; ``MeanShift`` the callback that
applies it to the outputs of chosen layers during one side-effect-free measurement pass.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from bnlightning.callbacks._layers import ModuleLayersCallback
from bnlightning.callbacks.functional import capture_forward
from bnlightning.callbacks.functional._loss import LossFn
from bnlightning.callbacks.functional.meanshift import (
    looks_like_logits,
    majority_share,
    mean_shift,
    pairwise_cosine_mean,
)
from bnlightning.callbacks.functional.names import MEANSHIFT_MAJORITY_SHARE, meanshift_key

__all__ = ["MeanShift", "majority_share", "mean_shift", "pairwise_cosine_mean"]


class MeanShift(ModuleLayersCallback):
    r"""Log the mean shift of chosen layers' outputs and the majority-prediction share.

    What is read: the *output* of each selected module (default: every activation module,
    i.e. the ReLU outputs, or in a network without any every Conv/Linear output), and for
    ``meanshift/majority_share`` the logits: the LightningModule's own output when its
    ``forward`` runs in the loss and returns (N, classes), else the output of the last module
    call in the pass that returned an (N, classes) floating tensor (a ``training_step`` that
    calls ``self.net(x)``: the net's output). Without either, the share is not logged and a
    warning says why, once. The statistics are computed inside the hooks, when each output is
    produced, so an in-place op later in the pass (``nn.ReLU(inplace=True)`` after a norm,
    ``out += identity``) cannot change them; a module called several times in the pass is read
    at its last call.

    When: as ``ActivationStats`` -- forward hooks live only around the callback's own
    float32, no-grad ``measurement_forward`` of ``loss_method(batch)`` on the measured step's
    training batch (pre-step weights, training mode, buffers cloned, RNG rewound), so
    training is untouched. ``every_n_steps=1`` with ``max_steps=1`` measures the network at
    initialisation, which is where that article's claim lives.

    Logged metrics: see ``mean_shift``.

    Args:
        layers: module names relative to the LightningModule (default: see above).
        every_n_steps: measure on steps t with ``(t + 1) % every_n_steps == 0``.
        loss_fn: ``(module, batch) -> scalar loss`` or its import path (default: see ``loss_method``).
        loss_method: the module's method ``(batch) -> scalar loss`` (default: ``loss`` if it takes one
            batch, else ``training_step``; see ``MeasurementCallback``).
        max_overhead: ``None``, or the fraction in (0, 1) of training time this callback's measurements may
            take: it then times them and skips scheduled steps to stay within it (shared fairly with the
            other budgeted callbacks; ``every_n_steps`` is the densest spacing) and logs ``meanshift/cost_steps``.
        schedule: ``"fixed"`` (every ``every_n_steps`` steps) or ``"log"`` (about 10 steps per decade:
            1, 2, 3, 4, 6, 7, 8, 10, 13, 16, 20, ..., 100, 126, ...).

    Raises:
        ValueError: bad arguments; at setup an unknown layer name (the valid ones are listed).
        MisconfigurationException: at setup, manual optimization or an unsupported strategy.
        AttributeError: at setup, no ``loss_fn``, ``loss_method`` or ``training_step`` to measure with.

    Example::

        trainer = Trainer(max_steps=1, callbacks=[MeanShift(every_n_steps=1)])
    """

    metric_prefix = "meanshift"

    def __init__(
        self,
        layers: list[str] | None = None,
        every_n_steps: int = 100,
        loss_fn: LossFn | str | None = None,
        loss_method: str | None = None,
        max_overhead: float | None = None,
        schedule: str = "fixed",
    ) -> None:
        super().__init__(layers, every_n_steps, loss_fn, loss_method, max_overhead, schedule)
        self._said_no_logits = False

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, optimizer: Any
    ) -> dict[str, Tensor]:
        # Keys: ("layer", name) for the measured layers; ("logits", name) for every module's output, the
        # candidates for the logits (the LightningModule's own is ("logits", "")); see _logits.
        taps: dict[tuple[str, str], Any] = {("layer", n): (pl_module.get_submodule(n), "output") for n in self._layers}
        taps.update({("logits", n): (m, "output") for n, m in pl_module.named_modules()})
        shares: dict[str, Tensor] = {}

        def read(key: tuple[str, str], x: Tensor) -> dict[str, Tensor] | None:
            # Everything is computed here, at hook time: an in-place op (a ReLU(inplace=True) after a
            # norm, `out += identity`) may rewrite x later in the pass.
            kind, name = key
            if kind == "layer":
                return mean_shift({name: x})
            if looks_like_logits(x):
                shares.pop(name, None)
                shares[name] = majority_share(x)  # re-inserted: the last key is the last call to finish
            return None

        seen = capture_forward(pl_module, batch, taps, read=read, loss_fn=self.measured_loss(pl_module))
        metrics = {
            key: value for n in self._layers if seen.get(("layer", n)) for key, value in seen[("layer", n)].items()
        }
        share = self._logits(shares, pl_module)
        if share is not None:
            metrics[MEANSHIFT_MAJORITY_SHARE] = share
        return metrics

    def _logits(self, shares: dict[str, Tensor], pl_module: pl.LightningModule) -> Tensor | None:
        """The majority share of the LightningModule's own (N, classes) output when its ``forward`` ran,
        else of the last module call in the pass that returned one (``training_step`` calling
        ``self.net(x)``: the net's output); else None, said once."""
        if "" in shares:
            return shares[""]
        if shares:
            return shares[next(reversed(shares))]
        if not self._said_no_logits:
            self._said_no_logits = True
            rank_zero_warn(
                f"MeanShift: meanshift/majority_share is not logged: no module of {type(pl_module).__name__} returned "
                "(N, classes) logits in the measured pass (a tuple, a dict or a sequence model's (N, T, V) output is "
                "not read)."
            )
        return None

    @override
    def charts(self) -> dict[str, list[str]]:
        return {"meanshift_cos": [meanshift_key(name, "cos") for name in self._layers]}
