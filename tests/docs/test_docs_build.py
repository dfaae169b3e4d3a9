"""The documentation site builds in strict mode: broken links, missing pages, bad API refs fail."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing_docs_packages() -> list[str]:
    missing = []
    for name in DOCS_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


@pytest.mark.skipif(bool(_missing_docs_packages()),
                    reason="mkdocs, mkdocs-material or mkdocstrings[python] is not installed: "
                           "pip install -e '.[docs]' to build the documentation")
def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    site = tmp_path / "site"
    assert (site / "index.html").is_file()
    for page in ("installation", "concepts", "hooks", "method", "tutorials", "comparison",
                 "benchmarks", "architecture", "api"):
        assert (site / page / "index.html").is_file(), f"page {page}.md was not built"
