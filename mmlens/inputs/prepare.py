"""``prepare``: images and questions -> a MultimodalBatch with named spans.

Spans come from the tokenizer's character offsets, never from string search over decoded
tokens: the question span is exactly the tokens whose characters overlap the question string.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from PIL import Image

from mmlens.core.errors import MMLensError
from mmlens.core.images import to_rgb
from mmlens.core.sizes import ImageSize
from mmlens.inputs.batch import MultimodalBatch
from mmlens.inputs.checkpoints import default_preprocessing
from mmlens.inputs.image_tokens import TOKENIZATIONS, chunked_encoding
from mmlens.inputs.preprocessing import pad_to_square
from mmlens.inputs.protocol import InputsModel
from mmlens.inputs.templates import IMAGE_PLACEHOLDER, PromptTemplate, get_template
from mmlens.inputs.token_map import build_token_maps


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _images_of(entry: Any) -> list:
    """One prompt's images: none (``None`` or ``[]``), one, or a list of several."""
    if entry is None:
        return []
    return list(entry) if isinstance(entry, list | tuple) else [entry]


def _spans_for(ids: list[int], offsets: list[tuple[int, int]], question_range: tuple[int, int],
               image_token_id: int, bos_id: int | None, counts: Sequence[int] | None = None,
               ) -> dict[str, torch.Tensor]:
    """The named spans of one prompt; ``counts``: its images' image-token counts, in order
    (None: one image)."""
    n_images = 1 if counts is None else len(counts)
    q_start, q_end = question_range
    image = [i for i, t in enumerate(ids) if t == image_token_id]
    if n_images and not image:
        raise ValueError("the prompt holds no image token after processing: does the template "
                         "contain <image>?")
    if image and not n_images:
        raise MMLensError("a prompt without an image holds image tokens: remove the image token "
                          "from its text")
    question = [i for i, (a, b) in enumerate(offsets)
                if b > a and a < q_end and b > q_start and ids[i] != image_token_id]
    if not question:
        raise ValueError("no token of the question was found in the prompt: is it empty?")
    last = len(ids) - 1
    has_bos = bos_id is not None and ids[0] == bos_id
    spans = {
        "image": image,
        "question": question,
        "last": [last],
        "bos": [0] if has_bos else [],
        "system": list(range(1 if has_bos else 0, image[0] if image else question[0])),
        "suffix": list(range(question[-1] + 1, last)),
        "text": [i for i, t in enumerate(ids) if t != image_token_id],
    }
    if n_images > 1:  # one span per image: its image tokens, images in order
        ends = torch.tensor(list(counts)).cumsum(0).tolist()
        spans |= {f"image_{k}": image[end - n:end]
                  for k, (n, end) in enumerate(zip(counts, ends, strict=True))}
    return {k: torch.tensor(v, dtype=torch.long) for k, v in spans.items()}


def encode_prompt(processor: Any, images: Image.Image | Sequence[Image.Image] | None,
                  question: str, template: PromptTemplate, image_token_id: int,
                  tokenization: str = "whole",
                  image_text: Callable[[Image.Image, str, int], str] | None = None,
                  ) -> tuple[Mapping[str, Any], dict[str, torch.Tensor], str]:
    """Process one prompt (no image, one, or several) + question; returns processor outputs,
    spans and the prompt.

    ``tokenization="chunks"`` tokenizes the text around ``<image>`` separately, as the original
    LLaVA code does (``mmlens.inputs.image_tokens``; one image only); ``"whole"`` keeps the
    processor's ids. The returned prompt holds the image placeholder once per image, as
    ``<image>``. ``image_text(image, image_token, n_image_tokens)``: the text the processor
    writes for one image (the family's ``image_text``; by default the image token repeated).
    """
    if tokenization not in TOKENIZATIONS:
        raise MMLensError(f"unknown tokenization {tokenization!r}: use one of {TOKENIZATIONS}")
    images = _images_of(images)
    prefix = template.image_prefix(len(images))
    prompt = prefix + question + template.suffix
    # The processor expands its own image token (``<image>``, Qwen's ``<|image_pad|>``...).
    image_str = processor.tokenizer.convert_ids_to_tokens(image_token_id)
    text = prefix.replace(IMAGE_PLACEHOLDER, image_str) + question + template.suffix
    out = processor(images=images or None, text=[text], return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    n_image = sum(1 for t in ids if t == image_token_id)
    if tokenization == "chunks":
        if len(images) != 1:
            raise MMLensError(f"tokenization='chunks' takes one image per prompt, not "
                              f"{len(images)}: use tokenization='whole'")
        ids, offsets = chunked_encoding(processor.tokenizer, prompt, image_token_id, n_image)
        out = dict(out)
        out["input_ids"] = torch.tensor([ids], dtype=torch.long)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        q_start = len(prefix)
        spans = _spans_for(ids, offsets, (q_start, q_start + len(question)), image_token_id,
                           processor.tokenizer.bos_token_id)
        return out, spans, prompt
    if image_text is None:
        def image_text(_image: Image.Image, token: str, count: int) -> str:
            return token * count

    # Each image's tokens, in order, where its placeholder was.
    pieces = prefix.split(IMAGE_PLACEHOLDER)
    counts = [n_image] if len(images) == 1 else [
        int((processor(images=[img], text=[image_str], return_tensors="pt")["input_ids"]
             == image_token_id).sum()) for img in images]
    if sum(counts) != n_image or len(counts) != len(pieces) - 1:
        raise MMLensError(f"the processor gave {n_image} image tokens for {len(images)} images "
                          f"of {counts} tokens each alone: is the template's {IMAGE_PLACEHOLDER} "
                          "a placeholder the processor expands?")
    expanded_prefix = pieces[0] + "".join(
        image_text(img, image_str, count) + piece
        for img, count, piece in zip(images, counts, pieces[1:], strict=True))
    expanded = expanded_prefix + question + template.suffix
    tok = processor.tokenizer(expanded, return_offsets_mapping=True)
    if tok["input_ids"] != ids:
        raise ValueError("the tokenizer's offsets do not match the processor's tokens for this "
                         "prompt; spans cannot be located exactly")
    q_range = (len(expanded_prefix), len(expanded_prefix) + len(question))
    spans = _spans_for(ids, tok["offset_mapping"], q_range, image_token_id,
                       processor.tokenizer.bos_token_id,
                       counts=None if len(images) == 1 else counts)
    return out, spans, prompt


def _check_context(model: InputsModel, length: int, name: str) -> None:
    """Refuse a prompt longer than the model's context: past it, positions were never trained."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and length > n_ctx:
        raise MMLensError(f"{name}: the prompt is {length} tokens (image tokens included) but "
                          f"the model takes at most {n_ctx} (its max_position_embeddings): "
                          "shorten the question, use a smaller image, or a model with a "
                          "longer context")


def prepare(model: InputsModel, images: Any, questions: Any, *,
            template: str | PromptTemplate | None = None,
            boxes: Sequence[Sequence[tuple[float, float, float, float]]] | None = None,
            examples: Sequence[Any] | None = None,
            preprocessing: str | None = None, tokenization: str = "whole",
            related_rule: str = "geometry") -> MultimodalBatch:
    """Build a left-padded batch with spans from images and question strings.

    ``images`` holds one entry per question: an image, a list of several images (their
    placeholders follow each other in the template, each image gets a span ``image_{k}``
    beside ``image``), or ``None`` for a text-only prompt. Images may be PIL images, numpy
    arrays or tensors of any bit depth (see ``to_rgb``).
    ``boxes`` (per example, ``(x, y, w, h)`` in original-image pixels; one image per prompt)
    add the spans ``related`` and ``other`` image patches, mapped through ``preprocessing``
    (``"resize_crop"``, ``"resize"`` or ``"pad"``; default: what the checkpoint was trained
    with, ``"pad"`` for LLaVA-1.5, else what its processor does, refused where mmlens does not
    know its geometry) by ``related_rule`` (``"geometry"``: exact box arithmetic; ``"paper"``:
    the paper's red-pixel mask, ``mmlens.inputs.pixel_rule``).
    ``tokenization``: ``"whole"`` (the processor's) or ``"chunks"`` (the original LLaVA's).
    The family's image spans and vision-tower spans need one image per prompt; batches with
    several images or none leave them out.
    """
    processor = model.processor
    if processor is None:
        raise MMLensError("this model has no processor: load it with from_pretrained, or pass "
                          "processor= to from_hf_model")
    questions = _as_list(questions)
    entries = list(images) if isinstance(images, list | tuple) else [images]
    if len(entries) != len(questions):
        raise ValueError(f"got {len(entries)} images but {len(questions)} questions: give one "
                         "entry per question (an image, a list of images, or None for none)")
    if template is None:  # the family's own prompt, else one chosen from the vocabulary
        template = getattr(getattr(model, "family", None), "prompt_template", None)
    template = get_template(template, processor.tokenizer)
    image_token_id = model.cfg.image_token_id
    records = list(examples) if examples is not None else []
    names = [f"example {getattr(records[i], 'example_id', i)!r}" if i < len(records)
             else f"image {i}" for i in range(len(entries))]
    per_prompt = [[to_rgb(img, source=name if len(_images_of(entry)) == 1 else f"{name}.{k}")
                   for k, img in enumerate(_images_of(entry))]
                  for entry, name in zip(entries, names, strict=True)]
    one_each = all(len(imgs) == 1 for imgs in per_prompt)
    if boxes is not None and not one_each:
        raise MMLensError("boxes need exactly one image per prompt: prepare prompts with "
                          "several images or none without boxes")
    if preprocessing is not None or boxes is not None:
        preprocessing = model.family.preprocessing_mode(model, preprocessing)
    elif model.family.fixed_preprocessing not in ("anyres", "tiles", "dynamic_tiles"):
        preprocessing = default_preprocessing(model)
    model_images = per_prompt
    if preprocessing == "pad":
        model_images = [[pad_to_square(img, processor) for img in imgs] for imgs in per_prompt]
    image_text = partial(model.family.image_text, processor)
    encoded = [encode_prompt(processor, imgs, q, template, image_token_id, tokenization,
                             image_text)
               for imgs, q in zip(model_images, questions, strict=True)]
    for name, (out, _, _) in zip(names, encoded, strict=True):
        _check_context(model, out["input_ids"].shape[1], name)
    batch = _assemble(model, encoded, examples, one_each)
    if not one_each:
        return batch
    images = [imgs[0] for imgs in per_prompt]
    # What every image token is made from: tower patches, pixels (mmlens.inputs.token_map).
    batch.token_maps = build_token_maps(batch.image_layout, batch, images, preprocessing)
    model.family.add_image_spans(model, batch)
    if boxes is not None:
        from mmlens.inputs.spans import add_patch_spans

        add_patch_spans(model, batch, images, boxes, mode=preprocessing, rule=related_rule)
    return batch


def _assemble(model: InputsModel, encoded: list, examples: Sequence[Any] | None,
              one_each: bool) -> MultimodalBatch:
    """Left-pad the encoded prompts into one batch; pixel values and geometry per image."""
    processor = model.processor
    width = max(out["input_ids"].shape[1] for out, _, _ in encoded)
    pad_id = processor.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    spans = []
    for row, (out, span, _) in enumerate(encoded):
        n = out["input_ids"].shape[1]
        input_ids[row, width - n:] = out["input_ids"][0]
        attention_mask[row, width - n:] = 1
        spans.append({k: v + (width - n) for k, v in span.items()})
    # The per-image geometry the family reads: LLaVA-NeXT's image_sizes, Qwen's image_grid_thw,
    # InternVL's tile counts.
    with_images = [out for out, _, _ in encoded if "pixel_values" in out]
    pixel_values = image_sizes = None
    if with_images:
        sizes = [model.family.processor_sizes(model, out) for out in with_images]
        per_image = [p for out, size in zip(with_images, sizes, strict=True)
                     for p in model.family.split_pixel_values(out["pixel_values"], size)]
        # The family knows its processor's layout (LLaVA-NeXT pads the tile axis).
        pixel_values = model.family.stack_pixel_values(per_image)
        if all(size is not None for size in sizes):
            image_sizes = model.family.stack_image_sizes(sizes)
    return MultimodalBatch(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
        spans=spans, image_sizes=image_sizes, prompts=[p for _, _, p in encoded],
        examples=list(examples) if examples is not None else None,
        tokenizer=processor.tokenizer,
        image_layout=model.family.image_layout(model) if one_each else None,
    )


def prepare_examples(model: InputsModel, examples: Sequence[Any], *,
                     template: str | PromptTemplate | None = None,
                     preprocessing: str | None = None, tokenization: str = "whole",
                     related_rule: str = "geometry") -> MultimodalBatch:
    """``prepare`` for dataset examples: their images, questions and object boxes."""
    examples = list(examples)
    images = [e.load_image() for e in examples]
    boxes = [e.boxes_for(ImageSize.of(image)) for e, image in zip(examples, images, strict=True)]
    return prepare(model, images, [e.question for e in examples], boxes=boxes,
                   examples=examples, template=template, preprocessing=preprocessing,
                   tokenization=tokenization, related_rule=related_rule)
