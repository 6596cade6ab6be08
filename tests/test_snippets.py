"""Every fenced Python snippet in README.md and docs/*.md runs as written.

A snippet that cannot run here (it needs a GPU, the network or hours of training) says so
with a comment on the line before its fence, ``<!-- skip-snippet: needs a CUDA GPU -->``;
every other one runs, each in a fresh namespace from an empty folder, W&B offline.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?:python|py)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
SKIP = re.compile(r"<!--\s*skip-snippet:\s*(.*?)\s*-->\s*$")


def snippets(path: Path, root: Path = REPO) -> list[tuple[str, str, str | None]]:
    """``(id, code, skip reason or None)`` of every fenced Python block in ``path``; ids are
    ``<path from root>:<line>``."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        found.append((f"{path.relative_to(root)}:{line}", match.group(1), skip.group(1) if skip else None))
    return found


SNIPPETS = [s for path in DOCS for s in snippets(path)]


def test_the_docs_have_snippets_and_every_skip_gives_a_reason() -> None:
    ids = [i for i, _, _ in SNIPPETS]
    assert any(i.startswith("README.md:") for i in ids) and any(i.startswith("docs/curvature.md:") for i in ids), ids
    assert all(reason for _, _, reason in SNIPPETS if reason is not None), "a skip-snippet comment must say why"


def test_a_skip_comment_is_read_from_the_line_before_the_fence(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n<!-- skip-snippet: needs a CUDA GPU -->\n```python\nimport torch\n```\n\n```py\nx = 1\n```\n",
        encoding="utf-8",
    )
    assert snippets(doc, root=tmp_path) == [
        ("x.md:3", "import torch\n", "needs a CUDA GPU"),
        ("x.md:7", "x = 1\n", None),
    ]


@pytest.mark.parametrize(("where", "code", "skip"), SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_snippet_runs(where: str, code: str, skip: str | None, in_tmp: Path) -> None:
    if skip is not None:
        pytest.skip(f"{where}: {skip}")
    exec(compile(code, where, "exec"), {"__name__": "__snippet__"})
