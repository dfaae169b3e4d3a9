"""A processor composed from a checkpoint's parts: tokenizer, PIL image processor, chat template.

Hugging Face's processor classes for LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL (and other
video-capable families) take a video processor, and every HF video processor needs torchvision,
so ``AutoProcessor`` cannot load them beside a CPU-only torch. Images need none of that: this
class does what the HF processor does for images (run the image processor, expand each image
placeholder to the number of image tokens the model will produce, tokenize) with the
checkpoint's own parts. The families say how many tokens an image makes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature


class ComposedProcessor:
    """``processor(images=[...], text=[...], return_tensors="pt")`` as the HF processor does it.

    ``count_image_tokens(row)`` gives the image tokens of one image from its row of the image
    processor's ``sizes_key`` output: ``(height, width)`` of the original image for
    ``image_sizes`` (LLaVA-OneVision), ``(t, h, w)`` patches for ``image_grid_thw`` (Qwen-VL).
    Each ``image_token`` in a prompt is expanded to that many, images taken in order, between
    ``image_wrap`` (InternVL: ``<img>``, ``</img>``); ``image_kwargs`` go to the image processor.
    With ``sizes_key=None`` every image makes the same number of tokens
    (``count_image_tokens(())``, Gemma 3). ``mm_token_type_ids=True`` adds HF's
    ``mm_token_type_ids`` output (1 at image tokens); ``token_type_ids`` adds HF's
    ``token_type_ids`` as Gemma 3's processor gives them (``"image"``: 1 at image tokens) or
    PaliGemma's for a prompt without an answer suffix (``"prefix"``: all 0, the whole prompt is
    the prefix). ``drop``: image-processor outputs the HF processor does not pass on (Gemma 3's
    ``num_crops``, InternVL's ``num_patches``).
    """

    def __init__(self, tokenizer: Any, image_processor: Any, *,
                 count_image_tokens: Callable[[tuple[int, ...]], int],
                 chat_template: str | None = None, image_token: str = "<image>",
                 sizes_key: str | None = "image_sizes", image_wrap: tuple[str, str] = ("", ""),
                 image_kwargs: dict[str, Any] | None = None, mm_token_type_ids: bool = False,
                 token_type_ids: str | None = None, drop: tuple[str, ...] = ()):
        if token_type_ids not in (None, "image", "prefix"):
            raise ValueError(f"token_type_ids={token_type_ids!r}: use 'image', 'prefix' or None")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.image_token = image_token
        self.count_image_tokens = count_image_tokens
        self.sizes_key = sizes_key
        self.image_wrap = image_wrap
        self.image_kwargs = dict(image_kwargs or {})
        self.mm_token_type_ids = mm_token_type_ids
        self.token_type_ids = token_type_ids
        self.drop = drop
        if tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer has no {image_token!r} token: is it the tokenizer of "
                             "this checkpoint?")

    def __call__(self, images: Sequence[Any] | None = None, text: str | Sequence[str] = (),
                 return_tensors: str = "pt", padding: bool = False, **kwargs: Any) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        data: dict[str, Any] = {}
        if images:
            pixels = self.image_processor(list(images), return_tensors="pt", **self.image_kwargs)
            data.update({k: v for k, v in pixels.items() if k not in self.drop})
            if self.sizes_key is None:
                texts = self._expand(texts, [()] * len(pixels["pixel_values"]))
            elif self.sizes_key not in pixels:
                raise ValueError(f"the image processor returned {', '.join(pixels)} but no "
                                 f"{self.sizes_key!r}: is it this checkpoint's image processor?")
            else:  # one row per image (InternVL's num_patches is one number an image)
                rows = torch.as_tensor(pixels[self.sizes_key])
                sizes = [tuple(int(v) for v in row) for row in rows.reshape(len(rows), -1)]
                texts = self._expand(texts, sizes)
        tokens = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kwargs)
        if self.mm_token_type_ids:  # as HF's Qwen-VL processors: 1 at image tokens, else 0
            tokens["mm_token_type_ids"] = self._token_types(tokens["input_ids"], "image")
        if self.token_type_ids is not None:  # as HF's Gemma 3 / PaliGemma processors
            tokens["token_type_ids"] = self._token_types(tokens["input_ids"], self.token_type_ids)
        return BatchFeature({**tokens, **data})

    def _token_types(self, ids: Any, rule: str) -> Any:
        """1 at image tokens (``"image"``) or 0 everywhere (``"prefix"``), as ``ids`` is."""
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if isinstance(ids, torch.Tensor):
            return (ids == image_id).int() if rule == "image" else torch.zeros_like(ids)
        return [[int(rule == "image" and t == image_id) for t in row] for row in ids]

    def _expand(self, texts: list[str], sizes: list[tuple[int, ...]]) -> list[str]:
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(sizes):
            raise ValueError(f"the prompts hold {n_placeholders} {self.image_token} placeholders "
                             f"but {len(sizes)} images were given: put one per image")
        counts = iter(self.count_image_tokens(hw) for hw in sizes)
        expanded = []
        for text in texts:
            pieces = text.split(self.image_token)
            out = pieces[0]
            for piece in pieces[1:]:
                start, end = self.image_wrap
                out += start + self.image_token * next(counts) + end + piece
            expanded.append(out)
        return expanded

    def apply_chat_template(self, conversation: list[dict], **kwargs: Any) -> str:
        """Render a conversation with the checkpoint's chat template (text, not tokens)."""
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template: write the prompt yourself or "
                             "use an mmlens PromptTemplate")
        return self.tokenizer.apply_chat_template(
            conversation, chat_template=self.chat_template, tokenize=False, **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        """Tokenizer, image processor and ``chat_template.jinja``, as HF lays a processor out."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        if self.chat_template is not None:
            (folder / "chat_template.jinja").write_text(self.chat_template)


def load_parts(path: str | Path, image_processor_class: type, family: str,
               **kwargs: Any) -> tuple[Any, Any]:
    """A checkpoint's tokenizer (``AutoTokenizer``) and its image processor of
    ``image_processor_class``; raises saying which piece is missing (a model without them is
    unusable for ``prepare``)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: no usable tokenizer ({error}); a {family} checkpoint needs "
                         "tokenizer.json / tokenizer_config.json") from error
    try:
        image_processor = image_processor_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: no usable image processor ({error}); a {family} checkpoint "
                         "needs preprocessor_config.json") from error
    return tokenizer, image_processor


def read_chat_template(name_or_path: str, tokenizer: Any = None) -> str | None:
    """The checkpoint's chat template: ``chat_template.jinja``, ``chat_template.json``, then the
    tokenizer's own; None when there is none."""
    import json

    for name in ("chat_template.jinja", "chat_template.json"):
        path = checkpoint_file(name_or_path, name)
        if path is None:
            continue
        text = path.read_text()
        return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None)


def checkpoint_file(name_or_path: str, filename: str) -> Path | None:
    """A file of a local checkpoint folder or of a hub checkpoint (cache or download)."""
    folder = Path(name_or_path)
    if folder.is_dir():
        path = folder / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(name_or_path, filename))
    except (EntryNotFoundError, OSError):  # absent file, offline, no such repository
        return None
