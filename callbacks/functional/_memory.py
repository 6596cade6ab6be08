"""Memory: how many batched (vmap) members of a measurement fit in its budget."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from bnlightning.callbacks.functional._harness import LossHarness


def default_budget(harness: LossHarness) -> int:
    """Bytes a measurement may add by default: on CUDA half the free device memory; on CPU
    twice the trainable parameters' float32 size, at least 256 MiB (small models keep vmap)."""
    if harness.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(harness.device)
        return free // 2
    return max(2 * harness.trainable_bytes(), 256 << 20)


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
