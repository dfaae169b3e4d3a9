"""docs/hooks_<family>.md lists exactly the hook points of that family's model, in data-flow
order, with the shapes a run of its tiny model gives them."""

import re
from pathlib import Path

import pytest
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.zoo.tiny import tiny_checkpoint

DOCS = Path(__file__).resolve().parents[2] / "docs"
ROW = re.compile(r"^\| `([^`]+)` \| `\[([^\]]+)\]` \|", re.MULTILINE)


def _text_sizes(model, batch) -> dict[str, int]:
    vc, tc = model.cfg.vision, model.cfg.text
    return {"1": 1, "batch": 1, "pos": batch.input_ids.shape[1], "d_vision": vc.d_model,
            "v_heads": vc.n_heads, "v_d_head": vc.d_head, "v_d_mlp": vc.d_mlp,
            "d_model": tc.d_model, "n_heads": tc.n_heads, "n_kv_heads": tc.n_key_value_heads,
            "d_head": tc.d_head, "d_mlp": tc.d_mlp}


def _gemma3_sizes(model) -> dict[str, int]:
    return {"patch": model.cfg.vision.n_patches,
            "token": model.cfg.hf_config.mm_tokens_per_image}


def _mllama_sizes(model) -> dict[str, int]:
    vc = model.cfg.vision
    return {"image": 1, "tile": vc.max_tiles, "patch": vc.n_tokens - 1, "token": vc.n_tokens,
            "row": vc.max_tiles * vc.n_padded, "key": vc.max_tiles * vc.n_tokens,
            "d_out": vc.d_out}


@pytest.mark.parametrize("family, sizes", [("gemma3", _gemma3_sizes),
                                           ("mllama", _mllama_sizes)])
def test_page_lists_every_hook_with_its_shape(family, sizes, tmp_path):
    model = HookedMultimodalTransformer.from_pretrained(str(tiny_checkpoint(family, tmp_path)))
    batch = model.prepare(Image.new("RGB", (37, 29)), "What color is the square?")
    _, cache = model.run_with_cache(batch)
    dims = {**_text_sizes(model, batch), **sizes(model)}
    listed = dict(ROW.findall((DOCS / f"hooks_{family}.md").read_text()))
    actual = {}
    for name in model.hook_dict:
        actual.setdefault(re.sub(r"blocks\.\d+\.", "blocks.{l}.", name, count=1), name)
    assert list(actual) == list(listed)  # every hook, in data-flow order
    for pattern, name in actual.items():
        shape = tuple(dims[dim.strip()] for dim in listed[pattern].split(","))
        assert tuple(cache[name].shape) == shape, pattern
