"""Qwen-VL's processor composition and box geometry, checked against the pixels it produces."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_qwen import IMAGE_TOKEN, MERGE, PATCH, QWEN_CHAT_TEMPLATE, tiny_qwen_processor

from mmlens.inputs.qwen_geometry import (
    packed_patch_order,
    qwen_box_patches,
    qwen_box_positions,
    resized_size,
)
from mmlens.inputs.templates import QWEN_VL, get_template
from mmlens.model.loading.qwen_processor import load_qwen_processor

SIZES = [(16, 16), (50, 30), (30, 70), (200, 40), (9, 11)]


@pytest.mark.parametrize("size", SIZES)
def test_resized_size_is_what_the_processor_does(size):
    processor = tiny_qwen_processor()
    out = processor(images=[Image.new("RGB", size)], text=["<|image_pad|>"])
    _, grid_h, grid_w = out["image_grid_thw"][0].tolist()
    assert resized_size(size, processor.image_processor) == (grid_w * PATCH, grid_h * PATCH)
    n_tokens = int((out["input_ids"] == IMAGE_TOKEN).sum())
    assert n_tokens == grid_h * grid_w // MERGE**2


def _patch_brightness(processor, image):
    """Mean pixel value of each packed patch, from the processor's own pixel_values."""
    out = processor(images=[image], text=["<|image_pad|>"])
    std = torch.tensor(processor.image_processor.image_std)[:, None]
    mean = torch.tensor(processor.image_processor.image_mean)[:, None]
    patches = out["pixel_values"].reshape(out["pixel_values"].shape[0], 3, -1)
    return (patches * std + mean).mean((1, 2))


@pytest.mark.parametrize("box", [(8, 0, 8, 8), (3, 5, 10, 2), (0, 12, 40, 4), (33, 9, 1, 1)])
def test_box_patches_and_tokens_are_the_pixels_the_box_paints(box):
    # 40x24 is a multiple of 8 within the pixel range: the processor does not resize it, so
    # the box's pixels land exactly where the geometry says.
    processor = tiny_qwen_processor()
    image = np.zeros((24, 40, 3), dtype=np.uint8)
    x, y, w, h = box
    image[y:y + h, x:x + w] = 255
    lit = _patch_brightness(processor, Image.fromarray(image)) > 0
    patches = qwen_box_patches([box], (40, 24), processor.image_processor)
    assert torch.equal(lit.nonzero().flatten(), patches)
    tokens = lit.reshape(-1, MERGE**2).any(-1)  # merged tokens, in image-token order
    positions = torch.arange(100, 100 + tokens.numel())
    related, other = qwen_box_positions([box], (40, 24), processor.image_processor, positions)
    assert torch.equal(related, positions[tokens])
    assert torch.equal(other, positions[~tokens])


def test_box_positions_follow_the_resize():
    # 8x4 is below min_pixels (256): the processor upsizes it to 24x16 (3x2 tokens); a box
    # over the left half of the original covers the left 12 px, i.e. token columns 0 and 1.
    processor = tiny_qwen_processor()
    assert resized_size((8, 4), processor.image_processor) == (24, 16)
    out = processor(images=[Image.new("RGB", (8, 4))], text=["<|image_pad|>"])
    assert out["image_grid_thw"][0].tolist() == [1, 4, 6]
    positions = torch.arange(6)
    related, _ = qwen_box_positions([(0, 0, 4, 4)], (8, 4), processor.image_processor,
                                    positions)
    assert related.tolist() == [0, 1, 3, 4]


def test_box_positions_refuse_a_token_count_that_does_not_fit():
    processor = tiny_qwen_processor()
    with pytest.raises(ValueError, match="resizes to 40x24 px, i.e. 15 tokens"):
        qwen_box_positions([(0, 0, 1, 1)], (40, 24), processor.image_processor, torch.arange(14))


def test_packed_order_groups_merge_blocks():
    order = packed_patch_order(4, 4, 2)
    assert order[:8].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


def test_template_is_the_chat_template_with_the_instruction():
    processor = tiny_qwen_processor()
    question = "What color is the circle?\nAnswer the question using a single word or phrase."
    content = [{"type": "image"}, {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == QWEN_VL.format("What color is the circle?").replace(
        "<image>", "<|image_pad|>")
    assert get_template(None, processor.tokenizer) is QWEN_VL


def test_processor_round_trips_through_a_folder(tmp_path):
    processor = tiny_qwen_processor()
    processor.save_pretrained(tmp_path)
    loaded = load_qwen_processor(tmp_path)
    assert loaded.chat_template == QWEN_CHAT_TEMPLATE
    image = Image.new("RGB", (50, 30), (10, 200, 30))
    a = processor(images=[image], text=["x <|image_pad|> y"])
    b = loaded(images=[image], text=["x <|image_pad|> y"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_processor_errors_name_what_is_missing(tmp_path):
    processor = tiny_qwen_processor()
    processor.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no usable image processor"):
        load_qwen_processor(tmp_path)
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholders but 1 images"):
        processor(images=[Image.new("RGB", (16, 16))], text=["<|image_pad|><|image_pad|>"])
