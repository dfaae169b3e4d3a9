"""docs/hooks.md is exactly what docs/gen_hooks.py generates from the bundled model today."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GENERATOR = Path(__file__).resolve().parents[2] / "docs" / "gen_hooks.py"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_hooks", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_hooks", module)
    spec.loader.exec_module(module)
    return module


def test_hook_page_matches_a_fresh_generation():
    gen_hooks = _load_generator()
    fresh = gen_hooks.generate_page()
    committed = gen_hooks.PAGE.read_text()
    assert committed == fresh, (
        "docs/hooks.md is out of date with the model's hook points: run python docs/gen_hooks.py "
        "and commit the page")

