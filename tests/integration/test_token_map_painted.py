"""The image-token map against each family's own image processor, on the tiny configs.

Two checks per family, reading the processor's output the way its tower does (the patch at
tower index ``i`` of a tile is patch ``i - class_offset`` in row-major order, the offset 1 for
CLIP's class token, 0 for SigLIP and Qwen-VL; Qwen-VL's packed rows are the patches):

- every pixel is painted with its own coordinates: each tower patch the map names holds exactly
  pixels of the map's box for that patch (and a patch with a box holds at least one);
- a box is painted in a colour no other pixel has: the tokens the map calls related are
  exactly the tokens made from a patch holding a painted pixel.

The processors resample with ``NEAREST`` and the boxes lie on even pixels, so a painted pixel
stays inside the patch the geometry puts it in (sub-patch arithmetic is checked against HF's
resampling in ``tests/unit``).
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import tiny_next
import tiny_onevision
import torch
from PIL import Image
from tiny import tiny_llava_config
from tiny_qwen import tiny_qwen_config, tiny_qwen_processor
from transformers import CLIPImageProcessorPil

from mmlens.inputs.preprocessing import pad_to_square
from mmlens.model.families import family_for
from mmlens.zoo.tiny import tiny_module

NEAREST = 0
PAINT = (255, 0, 255)


def _llava(strategy, crop=True):
    if crop:  # resize the short side, centre-crop (HF's CLIP processor)
        processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, resample=NEAREST,
                                          crop_size={"height": 32, "width": 32})
    else:  # stretch to the square
        processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, resample=NEAREST,
                                          do_center_crop=False)
    return tiny_llava_config(strategy=strategy), processor


def _next():
    processor = tiny_next.tiny_image_processor()
    processor.resample = NEAREST
    return tiny_next.tiny_next_config(), processor


def _onevision():
    processor = tiny_onevision.tiny_image_processor()
    processor.resample = NEAREST
    return tiny_onevision.tiny_onevision_config(), processor


def _qwen(family):
    processor = tiny_qwen_processor().image_processor
    processor.resample = NEAREST
    return tiny_qwen_config(family), processor


def _internvl():
    from mmlens.zoo.tiny import internvl

    hf_config = internvl.hf_config()
    processor = internvl.processor(hf_config).image_processor
    processor.resample = NEAREST
    return hf_config, processor


def _zoo(family):
    """A family's tiny HF config and image processor from ``mmlens.zoo.tiny``."""
    module = tiny_module(family)
    hf_config = module.hf_config()
    processor = module.image_processor(hf_config)
    processor.resample = NEAREST
    return hf_config, processor


def _idefics3():
    """Idefics3's tiny config and PIL image processor (``image_processor`` takes a class name)."""
    module = tiny_module("idefics3")
    processor = module.image_processor()
    processor.resample = NEAREST
    return module.hf_config(), processor


def _mllama():
    """Llama-3.2-Vision's tiny config and PIL image processor (its tiles' patches are the
    cross-attention keys)."""
    from mmlens.zoo.tiny import mllama

    hf_config = mllama.hf_config()
    processor = mllama.processor(hf_config).image_processor
    processor.resample = NEAREST
    return hf_config, processor


# (family, builder, class_offset of the tower, [(width, height), mode, box (x, y, w, h)])
CASES = [
    ("llava", lambda: _llava("default"), 1, [((16, 8), "pad", (2, 0, 6, 4)),
                                             ((16, 24), "resize_crop", (4, 6, 8, 10))]),
    ("llava", lambda: _llava("full", crop=False), 1, [((16, 24), "resize", (0, 14, 6, 10))]),
    ("llava_next", _next, 1, [((32, 16), None, (10, 2, 20, 6)),
                              ((16, 32), None, (0, 18, 8, 8)), ((16, 16), None, (4, 4, 2, 2)),
                              ((16, 8), "pad", (6, 2, 4, 4))]),
    ("llava_onevision", _onevision, 0, [((64, 64), None, (10, 20, 30, 12)),
                                        ((32, 32), None, (0, 0, 2, 2))]),
    ("qwen2_vl", lambda: _qwen("qwen2_vl"), 0, [((40, 24), None, (6, 2, 10, 12))]),
    ("qwen2_5_vl", lambda: _qwen("qwen2_5_vl"), 0, [((24, 48), None, (12, 30, 8, 8))]),
    ("internvl", _internvl, 1, [((40, 20), None, (10, 4, 12, 8)),
                                ((20, 36), "pad", (2, 6, 8, 10)), ((30, 30), None, (4, 4, 6, 6)),
                                ((16, 16), None, (2, 2, 4, 4))]),
    # Gemma 3: each token pools 2x2 patches; PaliGemma: one token a patch, no class token
    ("gemma3", lambda: _zoo("gemma3"), 0, [((64, 48), "resize", (10, 6, 20, 16)),
                                           ((40, 40), "resize", (0, 0, 8, 8))]),
    ("paligemma", lambda: _zoo("paligemma"), 0, [((48, 64), "resize", (8, 20, 10, 10))]),
    # Idefics3: rows x cols tiles after a longest-edge resize, then the global view
    ("idefics3", _idefics3, 0, [((72, 48), None, (20, 10, 30, 20)),
                                ((45, 29), None, (10, 5, 25, 19)),
                                ((22, 38), None, (0, 20, 12, 10))]),
    # Llama-3.2-Vision: up to 2 tiles, resized keeping the aspect ratio (halved, or kept where
    # it fits the canvas), padded right and bottom
    ("mllama", _mllama, 1, [((64, 32), None, (10, 4, 20, 8)), ((24, 12), None, (4, 2, 10, 6)),
                            ((12, 20), None, (2, 10, 8, 8)), ((32, 32), None, (16, 0, 10, 10))]),
]

every_family = pytest.mark.parametrize("name, build, offset, images", CASES,
                                       ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])


def _layout(name, hf_config, image_processor):
    family = family_for(name)
    model = SimpleNamespace(cfg=family.read_config(hf_config),
                            processor=SimpleNamespace(image_processor=image_processor))
    return family.image_layout(model)


def _process(image_processor, image, mode):
    """Raw 0..255 pixel values as the processor lays them out: ``[tiles, 3, H, W]`` (a
    one-tile image: one tile) or Qwen-VL's packed rows ``[n_patches, dim]``."""
    if mode == "pad":
        image = pad_to_square(image, SimpleNamespace(image_processor=image_processor))
    out = image_processor(image, do_rescale=False, do_normalize=False, return_tensors="pt")
    pixels = torch.as_tensor(np.asarray(out["pixel_values"])).float()
    return pixels if pixels.ndim == 2 else pixels.reshape(-1, *pixels.shape[-3:])


def _patch(pixels, ref, offset, patch, token_map=None):
    """The ``[3, patch, patch]`` pixels at tower position ``ref = (tile, index)`` (where every
    tile of the image is one tower row, ``token_map.one_row``, the tile's frame places it)."""
    tile, index = ref
    if pixels.ndim == 2:  # Qwen-VL: row = patch, (C, temporal, p, p), the still frame twice
        return pixels[index].reshape(3, -1, patch, patch)[:, 0]
    cols = pixels.shape[-1] // patch
    row, col = divmod(index - offset, cols)
    if token_map is not None and token_map.one_row:
        row, col = token_map.frames[tile].place(index)
    return pixels[tile, :, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch]


def _family_case(name, build):
    """The case's image processor, its family's layout and the tower's patch side."""
    hf_config, image_processor = build()
    patch = hf_config.vision_config.patch_size  # InternViT's is (height, width)
    return (image_processor, _layout(name, hf_config, image_processor),
            patch[0] if isinstance(patch, (tuple, list)) else patch)


@every_family
def test_each_patch_holds_the_pixels_of_its_box(name, build, offset, images):
    image_processor, layout, patch = _family_case(name, build)
    for (width, height), mode, _ in images:
        xs, ys = np.meshgrid(np.arange(width), np.arange(height))
        coded = np.stack([xs + 1, ys + 1, np.full_like(xs, 255)], -1).astype(np.uint8)
        token_map = layout.token_map((width, height), mode)
        assert token_map.class_offset == offset
        pixels = _process(image_processor, Image.fromarray(coded), mode)
        for ref, (x0, y0, x1, y1) in token_map.patch_boxes.items():
            region = _patch(pixels, ref, offset, patch, token_map)
            inside = region[2] == 255  # image pixels (padding is never 255 blue)
            x, y = region[0][inside] - 1, region[1][inside] - 1
            if x1 > x0 and y1 > y0:
                assert inside.any(), f"{ref} has box {(x0, y0, x1, y1)} but holds no pixel"
                # a sampled pixel is the one holding a sample point of the box
                x0, y0, x1, y1 = math.floor(x0), math.floor(y0), float(x1), float(y1)
                assert bool(((x >= x0) & (x < x1) & (y >= y0) & (y < y1)).all()), ref
            else:
                assert not inside.any(), f"{ref} only sees padding but holds image pixels"


@every_family
def test_related_tokens_are_those_the_painted_box_reaches(name, build, offset, images):
    image_processor, layout, patch = _family_case(name, build)
    for (width, height), mode, box in images:
        noise = np.random.default_rng(0).integers(20, 230, (height, width, 3), dtype=np.uint8)
        x, y, w, h = box
        noise[y:y + h, x:x + w] = PAINT
        pixels = _process(image_processor, Image.fromarray(noise), mode)
        token_map = layout.token_map((width, height), mode)
        painted = {ref for ref in token_map.patch_boxes
                   if bool((_patch(pixels, ref, offset, patch, token_map)
                            == torch.tensor(PAINT, dtype=torch.float)[:, None, None])
                           .all(0).any())}
        related = token_map.related([box])
        assert related.tolist() == token_map.tokens_of(painted).tolist()
        assert 0 < int(related.sum()) < int(token_map.sees_pixels().sum())
