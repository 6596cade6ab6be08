"""Forward order: the order in which each parameter is first *used* by a torch operation.

Recorded with a ``TorchFunctionMode`` (``LossHarness.gradient(..., record_order=True)``); this sees
uses that module hooks miss (``nn.MultiheadAttention``'s ``out_proj.weight``, a tied decoder weight
first used by its embedding). The same mode notes whether a dropout ran: vmap draws dropout masks
differently from an unbatched pass, so ``mode="auto"`` loops then.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


class FirstUse(TorchFunctionMode):
    """Records, in order, the names of watched tensors (by id) as torch operations first receive them,
    and whether a dropout ran."""

    def __init__(self, watched: Mapping[int, str]) -> None:
        super().__init__()
        self.watched = watched
        self.order: list[str] = []
        self._seen: set[str] = set()
        self.dropout = False

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
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
