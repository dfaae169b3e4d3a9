"""The pages that say which models mmlens supports name every family it has."""

from pathlib import Path

import pytest

from mmlens.model.families import FAMILIES

DOCS = Path(__file__).resolve().parents[2] / "docs"
NAMES = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "llava_onevision": "OneVision",
         "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL",
         "internvl": "InternVL 3", "gemma3": "Gemma 3", "paligemma": "PaliGemma",
         "idefics3": "Idefics3", "smolvlm": "SmolVLM", "mllama": "Llama-3.2-Vision"}
"""How the pages name each family (README's model table)."""


def _line(page: str, start: str) -> str:
    (line,) = [text for text in (DOCS / page).read_text().splitlines() if text.startswith(start)]
    return line


@pytest.mark.parametrize("page, start", [("coming-from-nnsight.md", "| another architecture |"),
                                         ("comparison.md", "| models |"),
                                         ("comparison.md", "What mmlens does not do")])
def test_every_family_is_named(page, start):
    text = _line(page, start)
    if start.startswith("What"):  # a paragraph: up to its end
        body = (DOCS / page).read_text()
        text = body[body.index(start):].split("\n\n")[0]
    unnamed = [family for family in FAMILIES if family not in NAMES]
    assert not unnamed, f"add the display names of {unnamed} here and to the docs pages"
    missing = [NAMES[family] for family in FAMILIES if NAMES[family] not in text]
    assert not missing, f"{page} does not name {missing}: {text}"
