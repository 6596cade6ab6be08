"""The "use the callbacks in your own project" snippet in docs/callbacks.md (and README) runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO


def _snippet(path: Path) -> str:
    text = path.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    blocks = [b for b in blocks if "bnlightning.callbacks" in b and "trainer.fit" in b]
    assert blocks, f"no runnable callbacks snippet in {path}"
    return blocks[0]


@pytest.mark.parametrize("doc", ["README.md", "docs/callbacks.md"])
def test_docs_snippet_runs(in_tmp: Path, doc: str) -> None:
    namespace: dict = {"__name__": "snippet"}
    exec(compile(_snippet(REPO / doc), doc, "exec"), namespace)
    header = next((in_tmp / "runs").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"ics/l2/net.0", "ics/cos/net.3", "landscape/beta_eff", "act/net.2/saturated"} <= set(header)


def test_protocol_copy_is_in_step_with_the_shared_protocol() -> None:
    shared = REPO.parent / "shared" / "PROTOCOL.md"
    if not shared.exists():
        pytest.skip("no shared/PROTOCOL.md beside this checkout")
    assert shared.read_text() in (REPO / "docs" / "protocol.md").read_text()
