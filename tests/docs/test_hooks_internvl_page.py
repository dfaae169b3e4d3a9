"""docs/hooks_internvl.md lists exactly the image-side hooks of InternVL 3, with the shapes a
run on a prepared tiled image gives."""

import re
from pathlib import Path

from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor

PAGE = Path(__file__).resolve().parents[2] / "docs" / "hooks_internvl.md"
ROW = re.compile(r"^\| `([^`]+)` \| `\[([^\]]+)\]` \|", re.MULTILINE)


def test_page_lists_every_image_side_hook_with_its_shape():
    hf = tiny_hf_model("internvl")
    model = HookedMultimodalTransformer.from_hf_model(hf, tiny_processor("internvl", hf.config))
    batch = model.prepare(Image.new("RGB", (61, 29)), "What color is the square?")
    _, cache = model.run_with_cache(batch)
    vc = model.cfg.vision
    patches = (vc.image_size // vc.patch_size) ** 2
    sizes = {"tiles": int(batch.image_sizes.sum()), "pos_v": patches + 1, "patch": patches,
             "token": vc.tokens_per_tile, "d_vision": vc.d_model, "4 d_vision": 4 * vc.d_model,
             "d_model": model.cfg.d_model, "n_heads": vc.n_heads, "d_head": vc.d_head,
             "d_mlp": vc.d_mlp, "1": 1}
    assert sizes["tiles"] == 3  # 2x1 tiles and the thumbnail
    listed = dict(ROW.findall(PAGE.read_text()))
    actual = {}
    for name in model.hook_dict:
        if name.startswith(("vision.", "projector.")):
            actual.setdefault(re.sub(r"blocks\.\d+\.", "blocks.{l}.", name), name)
    assert set(actual) == set(listed)
    for pattern, name in actual.items():
        shape = tuple(sizes[dim.strip()] for dim in listed[pattern].split(","))
        assert tuple(cache[name].shape) == shape, pattern
