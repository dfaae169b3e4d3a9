"""The Python examples on the runnable documentation pages run, in order, on the bundled model.

Blocks that begin with ``# Not executed here`` (other libraries, GPU-only commands) are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
RUNNABLE_PAGES = ("index.md", "concepts.md", "comparison.md", "causal-maps.md", "saes.md",
                 "free-form.md")
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(page: str) -> list[str]:
    blocks = BLOCK.findall((DOCS / page).read_text())
    return [block for block in blocks if not block.lstrip().startswith("# Not executed here")]


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_page_examples_run(page: str):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no runnable Python example"
    namespace: dict = {"__name__": f"docs_{page.removesuffix('.md')}"}
    for number, block in enumerate(blocks, start=1):
        code = compile(block, f"docs/{page}, example {number}", "exec")
        exec(code, namespace)
