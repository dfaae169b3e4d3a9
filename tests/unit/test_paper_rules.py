"""Each rule of the paper presets against an implementation written here from its description:
the prompt text, chunked tokenization with one BOS, the pixel rule (pad, resize-crop, anyres),
and the pad colour."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil, PreTrainedTokenizerFast

from mmlens.inputs.image_tokens import chunked_encoding
from mmlens.inputs.layouts.anyres import AnyresLayout
from mmlens.inputs.layouts.grid import GridLayout
from mmlens.inputs.pixel_rule import pixel_rule_mask
from mmlens.inputs.preprocessing import pad_colour, pad_to_square
from mmlens.inputs.templates import LLAMA3_PAPER, VICUNA_V1_PAPER
from mmlens.inputs.tiling import AnyresGeometry

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]


def test_paper_prompts_character_for_character():
    system = ("A chat between a curious user and an artificial intelligence assistant. The "
              "assistant gives helpful, detailed, and polite answers to the user's questions.")
    expected = (system + " USER: <image>\nIs the cup red or blue? \nAnswer the question using a "
                "single word or phrase. ASSISTANT:")
    assert VICUNA_V1_PAPER.format("Is the cup red or blue?") == expected
    llama = LLAMA3_PAPER.format("Q?")
    assert llama.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n \n")
    assert "<image>\nQ? \nAnswer the question using a single word or phrase.<|eot_id|>" in llama


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer with a Metaspace pre-tokenizer (word starts marked '▁'), as Llama's."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>",
                                                                  "<image>"])
    corpus = [VICUNA_V1_PAPER.format(q).replace("<image>", " ")
              for q in ("What color is the cup?", "Is the dog left or right?", "\nWhat")] * 5
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"})


def tokenizer_image_token(prompt, tokenizer, image_index):
    """The original LLaVA function, as described: chunks around <image>, one BOS."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(image_index)
        ids.extend(chunk[offset:])
    return ids


def test_chunked_tokenization_matches_llava_and_differs_from_the_whole_string():
    tokenizer = sentencepiece_tokenizer()
    image = tokenizer.convert_tokens_to_ids("<image>")
    prompt = VICUNA_V1_PAPER.format("What color is the cup?")
    ids, offsets = chunked_encoding(tokenizer, prompt, image, 1)
    assert ids == tokenizer_image_token(prompt, tokenizer, image)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    whole = tokenizer(prompt).input_ids
    assert whole != ids  # the second chunk starts a new word: "▁" before "\n"
    after = ids[ids.index(image) + 1]
    assert tokenizer.convert_ids_to_tokens(after).startswith("▁")
    # offsets point into the prompt: the question's tokens spell the question
    start = prompt.index("What")
    question = [t for t, (a, b) in zip(ids, offsets, strict=True)
                if b > a and a < start + 22 and b > start]
    assert tokenizer.decode(question).strip().startswith("What color is the cup?")
    # several image tokens: the placeholder expands in place
    many, _ = chunked_encoding(tokenizer, prompt, image, 5)
    assert many.count(image) == 5 and len(many) == len(ids) + 4


def test_pad_colour_is_the_truncated_clip_mean():
    processor = SimpleNamespace(image_processor=SimpleNamespace(image_mean=CLIP_MEAN))
    expected = tuple(int(x * 255) for x in CLIP_MEAN)
    assert pad_colour(processor) == expected == (122, 116, 104)
    padded = pad_to_square(Image.new("RGB", (40, 20), (0, 0, 0)), processor)
    assert padded.size == (40, 40) and padded.getpixel((0, 0)) == expected
    assert padded.getpixel((20, 20)) == (0, 0, 0)


# ---- the pixel rule, written here from the description --------------------------------------

def mask_image(size, boxes):
    mask = Image.new("RGB", size, (0, 255, 0))
    draw = ImageDraw.Draw(mask)
    for x, y, w, h in boxes:
        draw.rectangle((int(x), int(y), int(x) + int(w), int(y) + int(h)), fill=(255, 0, 0))
    return mask


def red_grid(image, patch):
    pixels = np.asarray(image).astype(int)
    red = (pixels[..., 0] == 255) & (pixels[..., 1] == 0) & (pixels[..., 2] == 0)
    rows, cols = red.shape[0] // patch, red.shape[1] // patch
    return red[:rows * patch, :cols * patch].reshape(rows, patch, cols, patch).any(axis=(1, 3))


def expected_single(size, boxes, crop, patch, pad):
    mask = mask_image(size, boxes)
    if pad:
        side = max(size)
        canvas = Image.new("RGB", (side, side), (122, 116, 104))
        canvas.paste(mask, ((side - size[0]) // 2, (side - size[1]) // 2))
        mask = canvas
    width, height = mask.size
    short, long = min(width, height), max(width, height)
    new_long = int(crop * long / short)
    new = (crop, new_long) if width <= height else (new_long, crop)
    mask = mask.resize(new, Image.BICUBIC)
    left, top = (new[0] - crop) // 2, (new[1] - crop) // 2
    mask = mask.crop((left, top, left + crop, top + crop))
    return red_grid(mask, patch).flatten()


SIZES_AND_BOXES = [
    ((640, 480), [(100, 100, 200, 150)]),
    ((500, 333), [(0, 0, 499, 332)]),               # the whole image, to its last pixel
    ((333, 500), [(13.7, 27.2, 40.9, 12.5), (300, 450, 33, 50)]),  # fractions; at the edge
    ((336, 336), [(14, 14, 14, 14)]),               # on patch borders
    ((800, 200), [(790, 190, 30, 30)]),             # crosses the image border
    ((300, 400), [(150, 10, 0, 0)]),                # a degenerate box still paints one pixel
]


@pytest.mark.parametrize("mode", ["pad", "resize_crop"])
@pytest.mark.parametrize("size,boxes", SIZES_AND_BOXES)
def test_pixel_rule_matches_the_description(size, boxes, mode):
    processor = SimpleNamespace(image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_mean=CLIP_MEAN))
    layout = GridLayout(336, 14, class_token=True)
    related, newline = pixel_rule_mask(processor, layout, boxes, size, mode)
    expected = expected_single(size, boxes, 336, 14, mode == "pad")
    assert related.numpy().tolist() == expected.tolist()
    assert not newline.any()


def best_canvas(size, pinpoints):
    width, height = size
    best, best_fit, best_waste = None, -1, math.inf
    for ch, cw in pinpoints:
        scale = min(cw / width, ch / height)
        fit = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - fit
        if fit > best_fit or (fit == best_fit and waste < best_waste):
            best, best_fit, best_waste = (ch, cw), fit, waste
    return best


def expected_anyres(size, boxes, tile, patch, pinpoints):
    width, height = size
    mask = mask_image(size, boxes)
    base = red_grid(mask.resize((tile, tile), Image.BICUBIC), patch).flatten()
    ch, cw = best_canvas(size, pinpoints)
    if cw / width < ch / height:
        new_w, new_h = cw, min(math.ceil(height * cw / width), ch)
    else:
        new_w, new_h = min(math.ceil(width * ch / height), cw), ch
    canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
    canvas.paste(mask.resize((new_w, new_h), Image.BICUBIC), ((cw - new_w) // 2,
                                                               (ch - new_h) // 2))
    grid = red_grid(canvas, patch)  # tiles cut row by row give the same patches
    rows, cols = grid.shape
    if width / height > cols / rows:
        pad = (rows - int(round(height * cols / width, 7))) // 2
        kept = grid[pad:rows - pad]
    else:
        pad = (cols - int(round(width * rows / height, 7))) // 2
        kept = grid[:, pad:cols - pad]
    with_newlines = np.concatenate([kept, np.zeros((kept.shape[0], 1), bool)], axis=1)
    newline = np.zeros_like(with_newlines)
    newline[:, -1] = True
    return (np.concatenate([base, with_newlines.flatten()]),
            np.concatenate([np.zeros_like(base), newline.flatten()]))


@pytest.mark.parametrize("size,boxes", [
    ((640, 480), [(100, 100, 200, 150)]),
    ((200, 500), [(0, 0, 60, 60), (150, 400, 49, 99)]),
    ((333, 333), [(160.5, 10.2, 3.3, 300)]),
    ((900, 300), [(880, 0, 40, 300)]),
])
def test_pixel_rule_for_anyres_matches_the_description(size, boxes):
    tile, patch, pinpoints = 56, 8, [[56, 112], [112, 56], [112, 112]]
    processor = SimpleNamespace(image_processor=LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints))
    geometry = AnyresGeometry(tile, patch, tuple(tuple(p) for p in pinpoints))
    related, newline = pixel_rule_mask(processor, AnyresLayout(geometry), boxes, size,
                                       "resize_crop")
    expected, expected_newline = expected_anyres(size, boxes, tile, patch, pinpoints)
    assert expected[(tile // patch) ** 2:].any()  # the boxes reach the high-resolution tiles
    assert related.numpy().tolist() == expected.tolist()
    assert newline.numpy().tolist() == expected_newline.tolist()
