"""The runnable examples of the "coming from" pages run, in order, on the bundled model."""

from __future__ import annotations

import pytest
from test_snippets import python_blocks

PAGES = ("coming-from-transformerlens.md", "coming-from-nnsight.md")


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page: str):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no runnable Python example"
    namespace: dict = {"__name__": f"docs_{page.removesuffix('.md').replace('-', '_')}"}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"docs/{page}, example {number}", "exec"), namespace)
