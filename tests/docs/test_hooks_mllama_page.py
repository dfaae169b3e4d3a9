"""docs/hooks_mllama.md lists exactly the hook points of a Llama-3.2-Vision model, with the
shapes a run of the tiny model gives them."""

import re
from pathlib import Path

from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.zoo.tiny import tiny_checkpoint

PAGE = Path(__file__).resolve().parents[2] / "docs" / "hooks_mllama.md"
ROW = re.compile(r"^\| `([^`]+)` \| `\[([^\]]+)\]` \|", re.MULTILINE)


def test_page_lists_every_hook_with_its_shape(tmp_path):
    model = HookedMultimodalTransformer.from_pretrained(str(tiny_checkpoint("mllama", tmp_path)))
    batch = model.prepare(Image.new("RGB", (37, 29)), "What color is the square?")
    _, cache = model.run_with_cache(batch)
    vc, tc = model.cfg.vision, model.cfg.text
    sizes = {"1": 1, "batch": 1, "image": 1, "tile": vc.max_tiles, "patch": vc.n_tokens - 1,
             "token": vc.n_tokens, "row": vc.max_tiles * vc.n_padded, "key": vc.max_tiles
             * vc.n_tokens, "pos": batch.input_ids.shape[1], "d_vision": vc.d_model,
             "v_heads": vc.n_heads, "v_d_head": vc.d_head, "v_d_mlp": vc.d_mlp, "d_out": vc.d_out,
             "d_model": tc.d_model, "n_heads": tc.n_heads, "n_kv_heads": tc.n_key_value_heads,
             "d_head": tc.d_head, "d_mlp": tc.d_mlp}
    listed = dict(ROW.findall(PAGE.read_text()))
    actual = {}
    for name in model.hook_dict:
        actual.setdefault(re.sub(r"blocks\.\d+\.", "blocks.{l}.", name, count=1), name)
    assert list(actual) == list(listed)  # every hook, in data-flow order
    for pattern, name in actual.items():
        shape = tuple(sizes[dim.strip()] for dim in listed[pattern].split(","))
        assert tuple(cache[name].shape) == shape, pattern
