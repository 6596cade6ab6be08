"""``LossHarness``: how a measurement evaluates a module's loss without touching the module's tensors.

A harness wraps any ``nn.Module`` for the pure measurement functions:

- **The loss.** One ``ResolvedLoss`` (``_loss.py``: ``loss_fn``, else the module's ``loss(batch)``
  method, else its ``training_step``), called on substitutes; with ``training_step`` its ``self.log``
  is silenced and every torchmetrics state it updates restored (``LossHarness.session``).
- **Substitutes.** Parameters and buffers are replaced, for one call, by tensors of our own in
  every module slot that holds them (``LossHarness.substituted``). The unit is the Parameter object:
  a Parameter registered under several names (weight tying, ``nn.ModuleList([block] * 3)``) is
  one key, its canonical name being the first one ``named_parameters()`` gives, and the same
  substitute goes into each of its slots, so its gradient is the sum over its uses. Each slot is
  visited once and put back as it was (``torch.func.functional_call`` can leave a substitute in
  the slot of a module registered under several names; a known torch.func pitfall).
- **The frame** (``LossHarness.session``): float32 outside autocast, compiled regions eager
  (``_numerics.py``), the RNG captured and rewound, module attributes put back (``_state.py``).
- **Forward order** (``LossHarness.gradient(..., record_order=True)``, ``_order.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnlightning.callbacks.functional._layers import CONV_TYPES
from bnlightning.callbacks.functional._loss import LossFn, ResolvedLoss, as_loss, how_to_pass_loss_fn
from bnlightning.callbacks.functional._numerics import eager, exact_float32, float32, math_attention, to_float32
from bnlightning.callbacks.functional._order import FirstUse
from bnlightning.callbacks.functional._state import (
    RngState,
    metric_states,
    module_attributes,
    restore_metric_states,
    restore_module_attributes,
)


class NotALoss(ValueError):
    """What the loss returned is not a scalar tensor."""


def _described(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return "a dict without 'loss'"
    return type(out).__name__


class _NoLog:
    """Stands in for ``LightningModule.log``/``log_dict`` while a measurement calls ``training_step``."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class LossHarness:
    """A module as a measurement sees it: canonical names, float32 values, the loss on substitutes."""

    def __init__(self, module: nn.Module, loss_fn: LossFn | None = None) -> None:
        self.module = module
        self.loss_fn: ResolvedLoss = as_loss(module, loss_fn)
        self.uses_training_step = self.loss_fn.uses_training_step
        self.params = dict(module.named_parameters())  # canonical names: one per Parameter object
        self.buffers = dict(module.named_buffers())
        self.values = {n: float32(p) for n, p in self.params.items()}
        self.trainable = [n for n, p in self.params.items() if p.requires_grad]
        pname = {id(p): n for n, p in self.params.items()}
        bname = {id(b): n for n, b in self.buffers.items()}
        # every (slot dict, key) holding one of our tensors, each slot once (modules are unique here)
        self.slots: list[tuple[dict[str, Any], str, str]] = []
        self.rnns: list[nn.Module] = []
        for m in module.modules():
            for key, p in m._parameters.items():
                if p is not None and id(p) in pname:
                    self.slots.append((m._parameters, key, pname[id(p)]))
            for key, b in m._buffers.items():
                if b is not None and id(b) in bname:
                    self.slots.append((m._buffers, key, bname[id(b)]))
            if "_flat_weights" in vars(m):  # nn.RNN/LSTM/GRU cache their weights in a list
                self.rnns.append(m)
        self.dropout = False  # set by a pass with record_order: whether the loss ran a dropout
        p0 = next(iter(self.params.values()), None)
        self.device = p0.device if p0 is not None else torch.device("cpu")

    # --- substitution ---
    @contextlib.contextmanager
    def substituted(self, tensors: Mapping[str, Tensor]) -> Iterator[None]:
        """Every slot of a parameter or buffer named in ``tensors`` holds that tensor for the block."""
        saved = []
        rnn = [(m, vars(m).get("_flat_weights"), vars(m).get("_flat_weight_refs")) for m in self.rnns]
        try:
            for slots, key, name in self.slots:
                t = tensors.get(name)
                if t is not None:
                    saved.append((slots, key, slots[key]))
                    slots[key] = t
            yield
        finally:
            for slots, key, original in reversed(saved):
                slots[key] = original
            for m, flat, refs in rnn:
                vars(m)["_flat_weights"] = flat
                vars(m)["_flat_weight_refs"] = refs

    def fresh_buffers(self, n: int | None = None) -> dict[str, Tensor]:
        """Clones of the buffers (float ones in float32), stacked ``n`` times for vmap: a train-mode
        BatchNorm updates these, never the module's own running statistics."""
        out = {}
        for name, b in self.buffers.items():
            b = b.detach()
            b = b.to(torch.float32) if b.is_floating_point() else b
            out[name] = b.clone() if n is None else torch.stack([b] * n)
        return out

    def loss(self, tensors: Mapping[str, Tensor], batch: Any) -> Tensor:
        """The scalar loss with ``tensors`` substituted (parameters and buffers by canonical name)."""
        with self.substituted(tensors):
            out = self.loss_fn(self.module, batch)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise NotALoss(
                f"{self.loss_fn.name} returned {_described(out)}; the measurement needs a scalar loss tensor (or a "
                f"dict with 'loss'). {how_to_pass_loss_fn()}"
            )
        return out.reshape(())

    def loss_problem(self, batch: Any) -> str | None:
        """Why ``self.loss_fn`` is no loss of ``batch`` (``None`` when it is one): it must give a
        scalar tensor that depends on a trainable parameter. One forward pass, inside ``session``."""
        tensors = {**self.values, **self.fresh_buffers()}
        tensors.update({n: tensors[n].detach().requires_grad_(True) for n in self.trainable})
        try:
            loss = self.loss(tensors, to_float32(batch))
        except NotALoss as err:
            return str(err).split(". Pass loss_fn=")[0]
        if not loss.requires_grad:
            return f"{self.loss_fn.name} does not depend on the trainable parameters"
        return None

    # --- a measurement's frame ---
    @contextlib.contextmanager
    def session(self, second_order: bool = False) -> Iterator[RngState]:
        """float32 outside autocast, compiled regions run eagerly; the RNG captured (and rewound after);
        every module attribute a pass sets put back after; with ``training_step`` as the loss,
        ``self.log`` silenced and torchmetrics states restored afterwards. ``second_order``: attention
        through the math kernel, which has a double backward."""
        rng = RngState.capture()
        metrics = metric_states(self.module) if self.uses_training_step else []
        attributes = module_attributes(self.module)
        silenced = self.uses_training_step and "log" not in vars(self.module)
        if silenced:
            vars(self.module)["log"] = vars(self.module)["log_dict"] = _NoLog()
        try:
            with (
                exact_float32(self.device.type),
                eager(),
                math_attention() if second_order else contextlib.nullcontext(),
            ):
                yield rng
        finally:
            if silenced:
                del vars(self.module)["log"], vars(self.module)["log_dict"]
            restore_metric_states(metrics)
            restore_module_attributes(attributes)
            rng.restore()

    def gradient(
        self,
        names: Sequence[str],
        batch: Any,
        rng: RngState,
        overrides: Mapping[str, Tensor] | None = None,
        *,
        record_order: bool = False,
        consume: Callable[[str, Tensor], None] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], list[str]]:
        """Loss and its gradient w.r.t. ``names`` at the current values (with ``overrides``).

        ``record_order``: also return every parameter in the order of its first use. ``consume``:
        hand each gradient to ``consume(name, grad)`` as soon as it is complete and keep none (the
        returned dict is empty): peak memory holds one gradient, not all of them.
        """
        rng.restore()
        tensors = {**self.values, **(overrides or {}), **self.fresh_buffers()}
        leaves = {n: tensors[n].detach().requires_grad_(True) for n in names}
        tensors.update(leaves)
        order: list[str] = []
        if record_order:
            mode = FirstUse({id(t): n for n, t in tensors.items() if n in self.params})
            with mode:
                loss = self.loss(tensors, batch)
            order = mode.order
            self.dropout = mode.dropout or any(
                isinstance(m, nn.MultiheadAttention) and m.training and m.dropout > 0 for m in self.module.modules()
            )
        else:
            loss = self.loss(tensors, batch)
        if consume is None:
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            return (
                loss.detach(),
                {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)},
                order,
            )
        _stream_gradients(loss, leaves, consume)
        return loss.detach(), {}, order

    def has_conv(self) -> bool:
        return any(isinstance(m, CONV_TYPES) for m in self.module.modules())

    def trainable_bytes(self) -> int:
        return sum(self.params[n].numel() * 4 for n in self.trainable)


def _stream_gradients(loss: Tensor, leaves: Mapping[str, Tensor], consume: Callable[[str, Tensor], None]) -> None:
    """Backward from ``loss``, handing each leaf's gradient to ``consume(name, grad)`` as soon as it is
    complete and dropping it (zeros for a leaf the loss does not reach), in ``leaves``' order at the end."""
    done: set[str] = set()

    def hook(leaf: Tensor, n: str) -> None:
        done.add(n)
        assert leaf.grad is not None, "a post-accumulate-grad hook runs after the gradient is set"
        consume(n, leaf.grad)
        leaf.grad = None

    handles = [leaf.register_post_accumulate_grad_hook(lambda t, n=n: hook(t, n)) for n, leaf in leaves.items()]
    try:
        if loss.requires_grad:
            torch.autograd.backward(loss, inputs=list(leaves.values()))
    finally:
        for h in handles:
            h.remove()
    for n in leaves:
        if n not in done:
            consume(n, torch.zeros_like(leaves[n]))


def check_loss(module: nn.Module, batch: Any, candidates: Sequence[ResolvedLoss]) -> tuple[ResolvedLoss, list[str]]:
    """The first of ``candidates`` that is a loss of ``batch`` (a scalar tensor depending on a trainable
    parameter), and why each one before it is not. One forward pass per candidate tried, each inside
    ``LossHarness.session`` (nothing of the module changes; run it inside ``observer_guard`` too).

    Raises:
        ValueError: none is; one line saying why each is not and how to pass ``loss_fn``, chained to
            the exception the last one raised, if any (its traceback is kept).
    """
    reasons: list[str] = []
    error: BaseException | None = None
    for loss in candidates:
        harness = LossHarness(module, loss)
        try:
            with harness.session():
                why = harness.loss_problem(batch)
        except Exception as err:  # the user's loss failed on this batch: say so, keep its traceback
            why, error = (
                f"{loss.name} raised {type(err).__name__}:"
                f" {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
                err,
            )
        if why is None:
            return loss, reasons
        reasons.append(why)
    raise ValueError(
        f"no loss to measure on {type(module).__name__}: {'; '.join(reasons)}. {how_to_pass_loss_fn()}"
    ) from error
