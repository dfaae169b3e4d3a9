"""Qwen-VL's processor, composed without a video processor (so without torchvision).

Hugging Face's ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` require a video processor, and
every HF video processor needs torchvision. Images only need the tokenizer, the PIL image
processor class and the chat template, which this class composes from a checkpoint folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BatchFeature, Qwen2VLImageProcessorPil

IMAGE_TOKEN = "<|image_pad|>"


class QwenVLProcessor:
    """``processor(images=[...], text=[...])`` as HF's Qwen-VL processor does it for images.

    Each ``<|image_pad|>`` in a text becomes ``t * h * w / merge_size**2`` copies (one per
    merged token of its image, images taken in order). Returns ``input_ids``,
    ``attention_mask``, ``pixel_values [n_patches, C*T*P*P]`` and ``image_grid_thw [images, 3]``.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no image token {self.image_token!r}: is it a "
                             "Qwen-VL tokenizer?")

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> QwenVLProcessor:
        """Tokenizer, PIL image processor and chat template of a checkpoint folder or hub name.

        Raises when the tokenizer or the image processor cannot be loaded: the model is then
        unusable for ``prepare``, and the error says which piece is missing.
        """
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: no usable tokenizer ({error}); a Qwen-VL checkpoint needs "
                             "tokenizer.json / tokenizer_config.json") from error
        try:
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: no usable image processor ({error}); a Qwen-VL checkpoint "
                             "needs preprocessor_config.json") from error
        return cls(tokenizer, image_processor, _read_chat_template(Path(path)))

    def save_pretrained(self, folder: str | Path) -> None:
        """Tokenizer, image processor and ``chat_template.jinja``: what ``from_pretrained``
        reads back (and HF's own loaders read too)."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        if self.chat_template:
            (folder / "chat_template.jinja").write_text(self.chat_template)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The prompt text of ``messages`` (HF's message format) under the chat template."""
        if not self.chat_template:
            raise ValueError("this processor has no chat template: pass chat_template= or save "
                             "chat_template.jinja with the checkpoint")
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt, **kwargs)

    def __call__(self, images: Any = None, text: str | list[str] | None = None,
                 return_tensors: str = "pt", **kwargs: Any) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        data: dict[str, Any] = {}
        if images is not None:
            image_inputs = self.image_processor(images=images, return_tensors="pt")
            data.update(image_inputs)
            texts = self._expand(texts, image_inputs["image_grid_thw"])
        data.update(self.tokenizer(texts, return_tensors=return_tensors, padding=True, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _expand(self, texts: list[str], grid_thw: torch.Tensor) -> list[str]:
        merge = self.image_processor.merge_size**2
        counts = [int(n) // merge for n in grid_thw.prod(-1).tolist()]
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(counts):
            raise ValueError(f"the texts hold {n_placeholders} {self.image_token} placeholders "
                             f"but {len(counts)} images were given: one placeholder per image")
        out, index = [], 0
        for text in texts:
            pieces = text.split(self.image_token)
            expanded = pieces[0]
            for piece in pieces[1:]:
                expanded += self.image_token * counts[index] + piece
                index += 1
            out.append(expanded)
        return out


def _read_chat_template(path: Path) -> str | None:
    """``chat_template.jinja`` or ``chat_template.json`` of a local folder (None elsewhere;
    the tokenizer may carry one itself)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None
