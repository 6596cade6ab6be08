"""Private plumbing shared by every measurement: the loss, substitute tensors, float32, order, DDP.

``Model`` wraps any ``nn.Module`` for the pure measurement functions:

- **The loss.** One ``ResolvedLoss`` (``_loss.py``: ``loss_fn``, else the module's ``loss(batch)``
  method, else its ``training_step``), called on substitutes; with ``training_step`` its ``self.log``
  is silenced and every torchmetrics state it updates restored (``Model.session``).
- **Eager, and second order where needed.** Measurements run the module's own Python code:
  ``torch.compile`` regions run eagerly (``torch.compiler.set_stance("force_eager")``, the same
  function without the compiled kernels, whose backward has no double backward); passes that
  differentiate twice (Hessian-vector products) run attention through the math kernel of
  ``F.scaled_dot_product_attention`` (the CPU flash kernel has no double backward).
- **Substitutes.** Parameters and buffers are replaced, for one call, by tensors of our own in
  every module slot that holds them (``Model.substituted``). The unit is the Parameter object:
  a Parameter registered under several names (weight tying, ``nn.ModuleList([block] * 3)``) is
  one key, its canonical name being the first one ``named_parameters()`` gives, and the same
  substitute goes into each of its slots, so its gradient is the sum over its uses. Each slot is
  visited once and put back as it was (``torch.func.functional_call`` can leave a substitute in
  the slot of a module registered under several names; a known torch.func pitfall).
- **Float32** outside autocast with TF32 off (``exact_float32``), whatever precision trains.
- **Forward order** (``Model.gradient(..., record_order=True)``): the order in which each
  parameter is first *used* by a torch operation, recorded with a ``TorchFunctionMode``; this
  sees uses that module hooks miss (``nn.MultiheadAttention``'s ``out_proj.weight``, a tied
  decoder weight first used by its embedding).
- **Ranks** (``reduce_dict``): under DDP every gradient and loss is averaged over ranks before
  any norm, in one collective per call.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from bnlightning.callbacks.functional._loss import LossFn, ResolvedLoss, as_loss, how_to_pass_loss_fn
from bnlightning.callbacks.guard import RngState, metric_states, module_attributes, restore_metric_states, restore_module_attributes

Reduce = Callable[[Tensor], Tensor]

log = logging.getLogger("bnlightning.callbacks")

#: Modules whose ``weight`` is a "layer" by default (PROTOCOL §1): every Conv and Linear.
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
CONV_TYPES = WEIGHT_LAYER_TYPES[1:]


# --- numerics ------------------------------------------------------------------------
@contextlib.contextmanager
def exact_float32(device_type: str = "cpu") -> Iterator[None]:
    """Autocast off (for ``device_type`` and CPU), TF32 off, gradients on; restored after."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if device_type != "cpu":
                stack.enter_context(torch.autocast(device_type, enabled=False))
            stack.enter_context(torch.enable_grad())
            yield
    finally:
        torch.set_float32_matmul_precision(prev[2])
        torch.backends.cuda.matmul.allow_tf32 = prev[0]
        torch.backends.cudnn.allow_tf32 = prev[1]


_ORIG_MOD = re.compile(r"(?<![^./])_orig_mod\.")


def metric_name(name: str) -> str:
    """``name`` without the ``_orig_mod.`` segments that ``torch.compile`` inserts into module names
    (``act/net._orig_mod.fc1/mean`` -> ``act/net.fc1/mean``)."""
    return _ORIG_MOD.sub("", name)


def to_float32(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.float() if t.is_floating_point() else t)


def float32(t: Tensor) -> Tensor:
    """``t`` detached, as float32: no copy when it already is float32 (the measurement never writes it)."""
    return t.detach().to(torch.float32)


def reduce_dict(tensors: Mapping[str, Tensor], reduce: Reduce | None) -> dict[str, Tensor]:
    """Every tensor of ``tensors`` passed through ``reduce`` (a mean over ranks) in one call."""
    if reduce is None or not tensors:
        return dict(tensors)
    names = list(tensors)
    flat = reduce(torch.cat([tensors[n].reshape(-1) for n in names]))
    out, i = {}, 0
    for n in names:
        k = tensors[n].numel()
        out[n] = flat[i : i + k].view_as(tensors[n])
        i += k
    return out


def eager() -> contextlib.AbstractContextManager[Any]:
    """``torch.compile`` regions (``torch.compile(m)``, ``m.compile()``) run as plain eager code in the
    block: the same function, none of the compiled backward's limits (no double backward, donated
    buffers), no recompilation for the measurement's substitutes and vmap. Needs torch >= 2.6
    (``torch.compiler.set_stance``); older versions run the compiled code (the callbacks warn)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def can_run_eager() -> bool:
    return hasattr(torch.compiler, "set_stance")


def math_attention() -> contextlib.AbstractContextManager[Any]:
    """``F.scaled_dot_product_attention`` through its math kernel, the one with a double backward (CPU's
    flash kernel has none); the same function, as plain matrix products."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class NotALoss(ValueError):
    """What the loss returned is not a scalar tensor."""


def _described(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return "a dict without 'loss'"
    return type(out).__name__


# --- the loss's frame -----------------------------------------------------------------
class _NoLog:
    """Stands in for ``LightningModule.log``/``log_dict`` while a measurement calls ``training_step``."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class _FirstUse(TorchFunctionMode):
    """Records, in order, the ids of watched tensors as torch operations first receive them, and
    whether a dropout ran (vmap draws dropout masks differently from an unbatched pass)."""

    def __init__(self, watched: Mapping[int, str]) -> None:
        super().__init__()
        self.watched = watched
        self.order: list[str] = []
        self._seen: set[str] = set()
        self.dropout = False

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if "dropout" in name or "bernoulli" in name:
            p = (kwargs or {}).get("p", args[1] if len(args) > 1 and isinstance(args[1], float) else 0.5)
            train = (kwargs or {}).get("training", args[2] if len(args) > 2 and isinstance(args[2], bool) else True)
            self.dropout |= bool(p) and bool(train)
        elif name == "scaled_dot_product_attention":
            self.dropout |= bool((kwargs or {}).get("dropout_p", args[4] if len(args) > 4 else 0.0))
        for t in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(t, Tensor):
                name = self.watched.get(id(t))
                if name is not None and name not in self._seen:
                    self._seen.add(name)
                    self.order.append(name)
        return func(*args, **(kwargs or {}))


# --- the wrapped module --------------------------------------------------------------
class Model:
    """A module as seen by a measurement: canonical names, float32 values, the loss on substitutes."""

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
            raise NotALoss(f"{self.loss_fn.name} returned {_described(out)}; the measurement needs a scalar loss tensor (or a dict with 'loss'). {how_to_pass_loss_fn()}")
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
            with exact_float32(self.device.type), eager(), math_attention() if second_order else contextlib.nullcontext():
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
            mode = _FirstUse({id(t): n for n, t in tensors.items() if n in self.params})
            with mode:
                loss = self.loss(tensors, batch)
            order = mode.order
            self.dropout = mode.dropout or any(isinstance(m, nn.MultiheadAttention) and m.training and m.dropout > 0 for m in self.module.modules())
        else:
            loss = self.loss(tensors, batch)
        if consume is None:
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            return loss.detach(), {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}, order
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
        for n in names:
            if n not in done:
                consume(n, torch.zeros_like(leaves[n]))
        return loss.detach(), {}, order

    def has_conv(self) -> bool:
        return any(isinstance(m, CONV_TYPES) for m in self.module.modules())

    def trainable_bytes(self) -> int:
        return sum(self.params[n].numel() * 4 for n in self.trainable)


def check_loss(module: nn.Module, batch: Any, candidates: Sequence[ResolvedLoss]) -> tuple[ResolvedLoss, list[str]]:
    """The first of ``candidates`` that is a loss of ``batch`` (a scalar tensor depending on a trainable
    parameter), and why each one before it is not. One forward pass per candidate tried, each inside
    ``Model.session`` (nothing of the module changes; run it inside ``observer_guard`` too).

    Raises:
        ValueError: none is; one line saying why each is not and how to pass ``loss_fn``, chained to
            the exception the last one raised, if any (its traceback is kept).
    """
    reasons: list[str] = []
    error: BaseException | None = None
    for loss in candidates:
        model = Model(module, loss)
        try:
            with model.session():
                why = model.loss_problem(batch)
        except Exception as err:  # the user's loss failed on this batch: say so, keep its traceback
            why, error = f"{loss.name} raised {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}", err
        if why is None:
            return loss, reasons
        reasons.append(why)
    raise ValueError(f"no loss to measure on {type(module).__name__}: {'; '.join(reasons)}. {how_to_pass_loss_fn()}") from error


# --- layer selection -----------------------------------------------------------------
def weight_layer_names(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of the Conv/Linear submodules with a trainable weight, one per weight
    Parameter (a module registered under several names, or a weight tied into another layer, counts once,
    under its first name)."""
    out, seen = [], set()
    for n, m in module.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, WEIGHT_LAYER_TYPES) and isinstance(w, nn.Parameter) and w.requires_grad and id(w) not in seen:
            seen.add(id(w))
            out.append(n)
    return out


def resolve_layers(module: nn.Module, layers: Sequence[str] | None, what: str = "layer") -> list[str]:
    """Check module names against ``module``; ``None`` means every Conv/Linear layer.

    Raises:
        ValueError: for a name that is not a submodule with a trainable ``weight`` (the valid names are
            listed), or two names whose weight is one Parameter.
    """
    valid = weight_layer_names(module)
    if layers is None:
        if not valid:
            raise ValueError(f"{type(module).__name__} has no Conv/Linear layer; pass the {what} names explicitly")
        return valid
    modules = dict(module.named_modules(remove_duplicate=False))
    with_weight = [n for n, m in modules.items() if n and isinstance(getattr(m, "weight", None), nn.Parameter)]
    owner: dict[int, str] = {}
    for name in layers:
        m = modules.get(name)
        w = getattr(m, "weight", None) if m is not None else None
        if not isinstance(w, nn.Parameter) or not w.requires_grad:
            raise ValueError(f"unknown {what} {name!r}: not a submodule with a trainable weight. Valid names: {', '.join(with_weight)}")
        if id(w) in owner:
            raise ValueError(f"{what}s {owner[id(w)]!r} and {name!r} share one weight Parameter; name it once")
        owner[id(w)] = name
    return list(layers)


def layer_param(module: nn.Module, layer: str, model: Model) -> str:
    """Canonical parameter name of the ``weight`` of submodule ``layer``."""
    w = module.get_submodule(layer).weight
    for n, p in model.params.items():
        if p is w:
            return n
    raise KeyError(layer)  # pragma: no cover - resolve_layers checked it


# --- memory: how many batched members fit ----------------------------------------------
def default_budget(model: Model) -> int:
    """Bytes a measurement may add by default: on CUDA half the free device memory; on CPU
    twice the trainable parameters' float32 size, at least 256 MiB (small models keep vmap)."""
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return free // 2
    return max(2 * model.trainable_bytes(), 256 << 20)


def saved_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` and count the bytes autograd saved for backward (the activations of one pass)."""
    total, seen = [0], set()

    def pack(t: Tensor) -> Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def members_that_fit(budget: int, per_member: int, n: int) -> int:
    """How many vmap members fit in ``budget`` bytes (0: not even two; use the loop)."""
    k = int(budget // max(per_member, 1))
    return min(k, n) if k >= 2 else 0


_told: set[tuple[str, str, str]] = set()


def auto_choice(size: int, dropout: bool, training_step: bool) -> str:
    """What ``mode="auto"`` chose, in words, for ``tell_choice``."""
    if size:
        return f"vmap in chunks of {size}"
    why = "the loss runs a dropout" if dropout else "the loss is training_step, which may update state" if training_step else "vmap members do not fit the memory budget"
    return f"loop ({why})"


def tell_choice(what: str, module: nn.Module, choice: str) -> None:
    """Say once per function, model class and choice which batching ``mode="auto"`` chose."""
    key = (what, type(module).__name__, choice)
    if key not in _told:
        _told.add(key)
        log.info("%s(mode='auto') on %s: %s", what, type(module).__name__, choice)
