"""Metric names as they are logged."""

from __future__ import annotations

import re

_ORIG_MOD = re.compile(r"(?<![^./])_orig_mod\.")


def metric_name(name: str) -> str:
    """``name`` without the ``_orig_mod.`` segments that ``torch.compile`` inserts into module names
    (``act/net._orig_mod.fc1/mean`` -> ``act/net.fc1/mean``)."""
    return _ORIG_MOD.sub("", name)
