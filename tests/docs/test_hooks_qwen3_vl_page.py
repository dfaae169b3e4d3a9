"""docs/hooks_qwen3_vl.md, with hooks_qwen.md for the vision blocks and merger, lists exactly
the image-side hooks of Qwen3-VL and the decoder hooks it adds, with the shapes a run gives."""

import re
from pathlib import Path

from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor

DOCS = Path(__file__).resolve().parents[2] / "docs"
ROW = re.compile(r"^\| `([^`]+)` \| `\[([^\]]+)\]` \|", re.MULTILINE)
NEW = re.compile(r"^(vision\.hook_|deepstack\.|blocks\.\{l\}\.(hook_deepstack|attn\.[qk]_norm|"
                 r"attn\.hook_[qk]_normed))")


def test_pages_list_every_image_side_and_new_decoder_hook_with_its_shape():
    hf = tiny_hf_model("qwen3_vl")
    model = HookedMultimodalTransformer.from_hf_model(hf, tiny_processor("qwen3_vl", hf.config))
    batch = model.prepare(Image.new("RGB", (45, 29)), "What color is the square?")
    _, cache = model.run_with_cache(batch)
    vc, tc = model.cfg.vision, model.cfg.text
    n_patches = int(batch.image_sizes.prod())
    sizes = {"1": 1, "patch": n_patches, "token": n_patches // 4, "d_vision": vc.d_model,
             "4 d_vision": 4 * vc.d_model, "d_model": tc.d_model, "n_heads": vc.n_heads,
             "d_head": vc.d_head, "d_mlp": vc.d_mlp, "batch": 1,
             "pos": batch.input_ids.shape[1], "q_heads": tc.n_heads,
             "kv_heads": tc.n_key_value_heads, "text_d_head": tc.d_head}
    own = dict(ROW.findall((DOCS / "hooks_qwen3_vl.md").read_text()))
    qwen2 = dict(ROW.findall((DOCS / "hooks_qwen.md").read_text()))
    qwen2.pop("vision.hook_embed")  # Qwen3-VL's page describes its own
    qwen2.pop("vision.blocks.{l}.mlp.hook_pre_linear")  # Qwen2.5-VL's gated MLP only
    actual = {}
    for name in model.hook_dict:
        pattern = re.sub(r"^deepstack\.\d+\.", "deepstack.{j}.", name)
        pattern = re.sub(r"blocks\.\d+\.", "blocks.{l}.", pattern, count=1)
        if name.startswith(("vision.", "merger.", "deepstack.")) or NEW.match(pattern):
            actual.setdefault(pattern, name)
    assert set(actual) == set(own) | set(qwen2)
    assert all(NEW.match(p) for p in own)
    for pattern, name in actual.items():
        listed = own.get(pattern) or qwen2[pattern]
        shape = tuple(sizes[dim.strip()] for dim in listed.split(","))
        assert tuple(cache[name].shape) == shape, pattern
