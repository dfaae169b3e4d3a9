"""docs/hooks_qwen.md lists exactly the image-side hooks of Qwen2-VL and Qwen2.5-VL, with the
shapes a run gives them."""

import re
from pathlib import Path

import pytest
from PIL import Image
from tiny_qwen import FAMILIES, tiny_qwen, tiny_qwen_processor

from mmlens import HookedMultimodalTransformer

PAGE = Path(__file__).resolve().parents[2] / "docs" / "hooks_qwen.md"
ROW = re.compile(r"^\| `([^`]+)` \| `\[([^\]]+)\]` \|", re.MULTILINE)


@pytest.mark.parametrize("family", FAMILIES)
def test_page_lists_every_image_side_hook_with_its_shape(family):
    model = HookedMultimodalTransformer.from_hf_model(tiny_qwen(family),
                                                      processor=tiny_qwen_processor())
    batch = model.prepare(Image.new("RGB", (40, 24)), "What color is the circle?")
    _, cache = model.run_with_cache(batch)
    vc = model.cfg.vision
    n_patches = int(batch.image_sizes.prod())
    sizes = {"1": 1, "patch": n_patches, "token": n_patches // 4, "d_vision": vc.d_model,
             "4 d_vision": 4 * vc.d_model, "d_model": model.cfg.d_model, "n_heads": vc.n_heads,
             "d_head": vc.d_head, "d_mlp": vc.d_mlp}
    listed = dict(ROW.findall(PAGE.read_text()))
    actual = {}
    for name in model.hook_dict:
        if name.startswith(("vision.", "merger.")):
            actual.setdefault(re.sub(r"blocks\.\d+\.", "blocks.{l}.", name, count=1), name)
    gated_only = {"vision.blocks.{l}.mlp.hook_pre_linear"}
    expected = set(listed) - (gated_only if family == "qwen2_vl" else set())
    assert set(actual) == expected
    for pattern, name in actual.items():
        shape = tuple(sizes[dim.strip()] for dim in listed[pattern].split(","))
        assert tuple(cache[name].shape) == shape, pattern
