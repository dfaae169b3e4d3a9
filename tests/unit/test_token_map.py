"""The image-token map's own rules: tower order, refusals without a layout or with a prompt
that does not fit the map."""

from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from mmlens.core.errors import MMLensError
from mmlens.inputs.batch import MultimodalBatch
from mmlens.inputs.layouts.grid import GridLayout
from mmlens.inputs.layouts.merged import packed_patch_order
from mmlens.inputs.spans import add_patch_spans
from mmlens.inputs.token_map import TileFrame, build_token_maps
from mmlens.model.families.base import Family


@pytest.mark.parametrize("grid_h, grid_w, merge", [(4, 4, 2), (6, 8, 2), (3, 5, 1), (6, 9, 3)])
def test_frame_order_is_the_processors_patch_packing(grid_h, grid_w, merge):
    frame = TileFrame((Fraction(1), Fraction(1)), (Fraction(0), Fraction(0)), 4, grid_h,
                      grid_w, merge=merge)
    order = packed_patch_order(grid_h, grid_w, merge).tolist()  # packed -> row-major
    assert [frame.index(*divmod(k, grid_w)) for k in order] == list(range(grid_h * grid_w))
    assert [frame.place(i) for i in range(len(order))] == [divmod(k, grid_w) for k in order]


def test_class_token_offsets_the_tower_and_its_feature_comes_first():
    clip = GridLayout(32, 8, class_token=True, class_feature=True).token_map((32, 32))
    siglip = GridLayout(32, 8, class_token=False).token_map((32, 32))
    assert clip.tokens[0].kind == "class" and clip.tower_positions([0, 1]) == [[0, 1]]
    assert not clip.sees_pixels()[0] and clip.box(0) is None
    assert siglip.tower_positions([0, 5]) == [[0, 5]] and siglip.tower_length == 16
    assert clip.box(1) == siglip.box(0) == (0, 0, 8, 8)


def _batch(n_image_tokens):
    ids = torch.zeros(1, n_image_tokens + 2, dtype=torch.long)
    spans = [{"image": torch.arange(1, n_image_tokens + 1)}]
    return MultimodalBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=None, spans=spans)


def test_a_family_without_a_layout_refuses_boxes_and_tower_spans():
    assert Family().image_layout(None) is None
    family = SimpleNamespace(name="newfamily", image_layout=lambda model: None,
                             preprocessing_mode=lambda model, mode: "resize_crop")
    model = SimpleNamespace(family=family, processor=None, cfg=None)
    batch = _batch(4)
    with pytest.raises(MMLensError, match=r"declares no image layout \(Family.image_layout\)"):
        add_patch_spans(model, batch, [torch.zeros(3, 8, 8)], [[(0, 0, 2, 2)]])
    with pytest.raises(ValueError, match="Family.image_layout"):
        batch.vision_positions("image")
    with pytest.raises(ValueError, match="Family.image_layout"):
        batch.vision_positions("image", model)


def test_a_prompt_whose_image_tokens_do_not_fit_the_map_is_refused():
    from PIL import Image

    layout = GridLayout(32, 8, class_token=True)
    with pytest.raises(MMLensError, match="example 0 has 15 image tokens but an image of"):
        build_token_maps(layout, _batch(15), [Image.new("RGB", (40, 30))], "pad")
    (maps,) = build_token_maps(layout, _batch(16), [Image.new("RGB", (40, 30))], "pad")
    assert maps[0].mode == "pad" and len(maps[0]) == 16
