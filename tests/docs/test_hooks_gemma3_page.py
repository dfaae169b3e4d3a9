"""docs/hooks_gemma3.md lists exactly the hook points of a Gemma 3 model, with the shapes a run
of the tiny model gives them."""

import re
from pathlib import Path

from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.zoo.tiny import tiny_checkpoint

PAGE = Path(__file__).resolve().parents[2] / "docs" / "hooks_gemma3.md"
ROW = re.compile(r"^\| `([^`]+)` \| `\[([^\]]+)\]` \|", re.MULTILINE)


def test_page_lists_every_hook_with_its_shape(tmp_path):
    model = HookedMultimodalTransformer.from_pretrained(str(tiny_checkpoint("gemma3", tmp_path)))
    batch = model.prepare(Image.new("RGB", (37, 29)), "What color is the square?")
    _, cache = model.run_with_cache(batch)
    vc, tc = model.cfg.vision, model.cfg.text
    sizes = {"1": 1, "batch": 1, "patch": vc.n_patches,
             "token": model.cfg.hf_config.mm_tokens_per_image,
             "pos": batch.input_ids.shape[1], "d_vision": vc.d_model, "v_heads": vc.n_heads,
             "v_d_head": vc.d_head, "v_d_mlp": vc.d_mlp, "d_model": tc.d_model,
             "n_heads": tc.n_heads, "n_kv_heads": tc.n_key_value_heads, "d_head": tc.d_head,
             "d_mlp": tc.d_mlp}
    listed = dict(ROW.findall(PAGE.read_text()))
    actual = {}
    for name in model.hook_dict:
        actual.setdefault(re.sub(r"blocks\.\d+\.", "blocks.{l}.", name, count=1), name)
    assert list(actual) == list(listed)  # every hook, in data-flow order
    for pattern, name in actual.items():
        shape = tuple(sizes[dim.strip()] for dim in listed[pattern].split(","))
        assert tuple(cache[name].shape) == shape, pattern
