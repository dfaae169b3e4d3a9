"""Prompt templates: the paper's Vicuna v1 prompt, the Llama-3 chat prompt, the Qwen chat
prompt of LLaVA-OneVision, the Qwen-VL, Qwen3-VL and InternVL 3 chat prompts, Gemma 3's,
PaliGemma's, SmolVLM's and Llama-3.2-Vision's."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt with one ``<image>`` and one ``{question}`` placeholder.

    ``prefix`` is everything before the question (image included), ``suffix`` everything after.
    """

    name: str
    text: str

    def __post_init__(self) -> None:
        if self.text.count("{question}") != 1 or self.text.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(f"template {self.name!r} must hold exactly one {{question}} and one "
                             f"{IMAGE_PLACEHOLDER}")

    @property
    def prefix(self) -> str:
        return self.text.split("{question}")[0]

    @property
    def suffix(self) -> str:
        return self.text.split("{question}")[1]

    def format(self, question: str) -> str:
        return self.prefix + question + self.suffix

    def image_prefix(self, n_images: int) -> str:
        """``prefix`` with ``n_images`` image placeholders: the placeholder with what wraps it
        (Qwen-VL's ``<|vision_start|>...<|vision_end|>``) and its newline, repeated, or
        removed for a text-only prompt."""
        unit = IMAGE_PLACEHOLDER
        wrapped = "<|vision_start|>" + unit + "<|vision_end|>"
        if wrapped in self.prefix:
            unit = wrapped
        if unit + "\n" in self.prefix:
            unit += "\n"
        return self.prefix.replace(unit, unit * n_images)


VICUNA_V1 = PromptTemplate(
    "vicuna_v1",
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
    "{question}\nAnswer the question using a single word or phrase. ASSISTANT:",
)

LLAMA3 = PromptTemplate(
    "llama3",
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
    "assistant. You are able to understand the visual content that the user provides, and "
    "assist the user with a variety of tasks using natural language.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n<image>\n{question}\nAnswer the question "
    "using a single word or phrase.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
)

ONEVISION = PromptTemplate(
    "onevision",
    "<|im_start|>user\n<image>\n{question}\nAnswer the question using a single word or phrase."
    "<|im_end|>\n<|im_start|>assistant\n",
)
"""What LLaVA-OneVision's published chat template renders for one image and the question with
the paper's answer instruction, generation prompt added."""

QWEN_VL = PromptTemplate(
    "qwen_vl",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><image><|vision_end|>{question}\nAnswer the question using a single word "
    "or phrase.<|im_end|>\n<|im_start|>assistant\n",
)
"""Qwen2-VL / Qwen2.5-VL's chat template for one image and the paper's instruction; the
processor expands ``<image>`` (its ``<|image_pad|>``) to one token per merged 28x28 px cell."""

QWEN3_VL = PromptTemplate(
    "qwen3_vl",
    "<|im_start|>user\n<|vision_start|><image><|vision_end|>{question}\nAnswer the question "
    "using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n",
)
"""Qwen3-VL's chat template (no default system prompt) for one image and the paper's
instruction."""

INTERNVL = PromptTemplate(
    "internvl",
    "<|im_start|>user\n<image>\n{question}\nAnswer the question using a single word or "
    "phrase.<|im_end|>\n<|im_start|>assistant\n",
)
"""InternVL 3's chat template (``-hf`` checkpoints: no default system prompt; the processor
expands ``<image>``, its ``<IMG_CONTEXT>``, to ``<img>`` + one token per tile's token +
``</img>``) for one image and the paper's instruction."""
IDEFICS3 = PromptTemplate(
    "idefics3",
    "<|im_start|>User:<image>{question}\nAnswer the question using a single word or phrase."
    "<end_of_utterance>\nAssistant:",
)
"""What SmolVLM's (and Idefics3's) chat template renders for one image and the question with
the paper's answer instruction, generation prompt added; the processor expands ``<image>`` to
the tiles' markers and tokens and the global view."""
MLLAMA = PromptTemplate(
    "mllama",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>{question}\nAnswer the "
    "question using a single word or phrase.<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\n",
)
"""Llama-3.2-Vision's chat template (no system prompt; the processor's ``<|image|>`` where
``<image>`` is, an ordinary token the cross-attention mask starts from) with the paper's
instruction."""

PAPER_SUFFIX = " \nAnswer the question using a single word or phrase."
"""What the paper's code appends to every question (note the space before the newline)."""

VICUNA_V1_PAPER = PromptTemplate(
    "vicuna_v1_paper",
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
    "{question}" + PAPER_SUFFIX + " ASSISTANT:",
)
"""The Vicuna v1 conversation as the paper's code builds it: the question with
``PAPER_SUFFIX`` appended, then `` ASSISTANT:``."""

LLAMA3_PAPER = PromptTemplate(
    "llama3_paper",
    LLAMA3.prefix + "{question}" + PAPER_SUFFIX + "<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\n \n",
)
"""The Llama-3 conversation with ``PAPER_SUFFIX`` after the question, followed by ``" \n"``."""

GEMMA3 = PromptTemplate(
    "gemma3",
    "<start_of_turn>user\n\n\n<start_of_image><image><end_of_image>\n\n{question}\nAnswer the "
    "question using a single word or phrase.<end_of_turn>\n<start_of_turn>model\n",
)
"""Gemma 3's chat template for one image and the paper's instruction, generation prompt added,
the image as its processor expands it (``\n\n<start_of_image>``, ``mm_tokens_per_image``
soft tokens, ``<end_of_image>\n\n``); ``<image>`` stands for the soft tokens."""

PALIGEMMA = PromptTemplate("paligemma", "<image><bos>answer en {question}\n")
"""PaliGemma's prompt form (its processor's): the image tokens, then BOS, the task prefix
``answer en`` and the question, ended by a newline; the whole prompt is the prefix that
attends both ways."""

TEMPLATES = {t.name: t for t in (VICUNA_V1, LLAMA3, ONEVISION, QWEN_VL, QWEN3_VL, INTERNVL,
                                 GEMMA3, PALIGEMMA, IDEFICS3, MLLAMA,
                                 VICUNA_V1_PAPER, LLAMA3_PAPER)}


def get_template(template: str | PromptTemplate | None, tokenizer: object = None) -> PromptTemplate:
    """A template by name, or the default for a tokenizer (Llama-3 vocabularies get LLAMA3,
    Qwen-VL ones QWEN_VL, Gemma 3 ones GEMMA3, Qwen chat vocabularies with an ``<image>``
    token ONEVISION)."""
    if isinstance(template, PromptTemplate):
        return template
    if template is None:
        vocab = getattr(tokenizer, "get_vocab", dict)()
        if "<|vision_start|>" in vocab:
            return QWEN_VL
        if "<start_of_image>" in vocab:
            return GEMMA3
        if "<image>" in vocab and "<bos>" in vocab and "<start_of_turn>" not in vocab and (
                getattr(tokenizer, "bos_token", None) == "<bos>"):
            return PALIGEMMA
        if "<|start_header_id|>" in vocab:
            return LLAMA3
        if "<|im_start|>" in vocab and IMAGE_PLACEHOLDER in vocab:
            return ONEVISION
        return VICUNA_V1
    if template not in TEMPLATES:
        raise KeyError(f"unknown template {template!r}: use one of {', '.join(TEMPLATES)} or a "
                       "PromptTemplate")
    return TEMPLATES[template]
