"""Builders for the bundled shapes-llava model: word-level tokenizer, processor, HF config.

Imports only transformers, tokenizers and the shapes data, so the training script runs on a
machine without the rest of mmlens' dependencies.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from mmlens.data.shapes import ANSWERS, DEFAULT_IMAGE_SIZE, QUESTION_WORDS

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
PATCH_SIZE = 14
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
INSTRUCTION = "Answer the question using a single word or phrase."
PROMPT_TEMPLATE = SYSTEM_PROMPT + " USER: <image>\n{question}\n" + INSTRUCTION + " ASSISTANT:"
"""The paper's prompt for Vicuna-based LLaVA; ``{question}`` is the raw question."""

CHAT_TEMPLATE = (
    "{% set system = '" + SYSTEM_PROMPT.replace("'", "\\'") + "' %}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{{ system }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% else %} ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
"""Vicuna-v1 chat format: ``{system} USER: <image>\\n{text} ASSISTANT: {answer}</s>``."""

WORD_PATTERN = r"\w+|[^\w\s]|\n"
"""Pre-tokenizer: a token is a word, one punctuation mark, or a newline."""


def vocabulary() -> list[str]:
    """Special tokens, then every prompt and question word and every answer in both cases."""
    prompt_words = pre_tokenizers.Split(
        Regex(WORD_PATTERN), behavior="removed", invert=True
    ).pre_tokenize_str(PROMPT_TEMPLATE.replace("<image>", "").replace("{question}", ""))
    answers = {word for task in ANSWERS.values() for a in task for word in a.split()}
    words = {w for w, _ in prompt_words} | set(QUESTION_WORDS) | answers
    words |= {a.capitalize() for a in answers}
    return [*SPECIAL_TOKENS, *sorted(words)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer; prepends ``<s>``, adds no ``</s>``, pads on the left."""
    vocab = {token: i for i, token in enumerate(vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(
        Regex(WORD_PATTERN), behavior="removed", invert=True
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=256,
    )


def build_image_processor(image_size: int = DEFAULT_IMAGE_SIZE) -> CLIPImageProcessor:
    """CLIP preprocessing at ``image_size``: resize the short side, center crop, normalise."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def build_processor(image_size: int = DEFAULT_IMAGE_SIZE) -> LlavaProcessor:
    """LLaVA processor: ``<image>`` expands to ``(image_size // 14) ** 2`` image tokens."""
    return LlavaProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    vocab_size: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    vision_layers: int = 4,
    text_layers: int = 8,
    width: int = 128,
) -> LlavaConfig:
    """LLaVA config: CLIP vision tower, Llama text model with grouped-query attention."""
    vision = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        projection_dim=width,
    )
    ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=344 * width // 128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<image>"],
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )


def _command(log: dict) -> str:
    """The training command that wrote ``log``."""
    return (
        f"python -m mmlens.zoo.train --out <folder> --steps {log['steps']} "
        f"--batch-size {log['batch_size']} --lr {log['lr']} --seed {log['seed']} "
        f"--probe-weight {log.get('probe_weight', 0)} --probe-layer {log.get('probe_layer', 0)}"
        + (f" --ramp {log['ramp']}" if log.get("ramp") else "")
        + (f" --init-from {log['init_from']}" if log.get("init_from") else "")
        + (f" --tasks {log['tasks']}" if log.get("init_from") else "")
        + (f" --max-minutes {log['max_minutes']}" if log.get("max_minutes") else "")
        + (f" --threads {log['threads']}" if log.get("threads") else "")
    )


def _accuracy_text(accuracy: dict) -> str:
    return ", ".join(f"{task} {value:.3f}" for task, value in accuracy.items()) or "not recorded"


def model_card(config: LlavaConfig, n_params: int, log: dict) -> str:
    """The README of a trained shapes-llava folder, from its config and training log."""
    vision, text = config.vision_config, config.text_config
    grid = vision.image_size // vision.patch_size
    rows = "\n".join(f"| {task} | {value:.3f} |" for task, value in log["accuracy"].items())
    prompt = PROMPT_TEMPLATE.replace("\n", "\\n")
    describe = (", and a Describe question with three words (\"Small red circle\")"
                if "Describe" in log["accuracy"] else "")
    first = log.get("base", log)  # a fine-tuned model's log holds its starting point's
    command = _command(first)
    fine_tune = "" if first is log else f"""

Then fine-tuned from those weights on a mix of tasks (one or several words per answer):
`{_command(log)}`

{log["steps_done"]} steps of {log["batch_size"]} ({log["seconds"] / 60:.0f} minutes on
{log["device"]}); held-out accuracy before: {_accuracy_text(log.get("accuracy_before", {}))}."""
    return f"""# shapes-llava

A small LLaVA (`LlavaForConditionalGeneration`) trained from scratch on `mmlens.data.shapes`:
images of coloured circles, squares and triangles with questions of the six task families of
Zhang et al. (CVPR 2025). It exists so that mmlens' tests and tutorials run offline in seconds.

## Sizes ({n_params / 1e6:.2f}M parameters, float32)
- vision tower (CLIP): {vision.num_hidden_layers} layers, width {vision.hidden_size},
  {vision.num_attention_heads} heads, {vision.image_size} px images, patch {vision.patch_size}
  -> {grid}x{grid} = {grid * grid} image tokens (penultimate layer, CLS dropped)
- projector: 2-layer MLP with GELU
- language model (Llama): {text.num_hidden_layers} layers, width {text.hidden_size},
  {text.num_attention_heads} heads with {text.num_key_value_heads} key/value heads,
  MLP {text.intermediate_size}, vocabulary {text.vocab_size} words
  (word-level tokenizer; every answer in lowercase and capitalised)

## Prompt
`{prompt}`

The model answers with one capitalised word and `</s>` ("Yes", "Red", "Left", "Color"){describe}.

## Training
`{command}`

{first["steps_done"]} steps of {first["batch_size"]} fresh questions (training seed
{first["train_seed"]}, scenes of 3 to 5 objects), AdamW, cosine schedule, on {first["device"]}
in {first["seconds"] / 60:.0f} minutes. The loss is the answer tokens' cross-entropy plus
{first.get("probe_weight", 0)} times that of two training-only linear probes, not saved:

- every projected image token is asked for the shape, colour and size of the object covering
  its patch (or "no object") and for its row and column;
- the residual stream after language layer {log.get("probe_layer", 0)} at the last word of each
  phrase naming an object ("the small *circle*") is asked for that object's shape, colour,
  size and side, and whether it exists (the two phrases of LogicalObj questions).

Without them training stalls on a plateau where answers come from the question alone. Note
for interpretation: the second probe asks the question's object words to hold what the image
shows about their object by layer {log.get("probe_layer", 0)}, so this model is *trained* to
route image information through the question positions, the route the paper finds in LLaVA.
Its knockout curves show a trained-in route, not an emergent one.{fine_tune}

## Held-out accuracy
Greedy first token, `strip().lower()` equal to the gold answer, {log["eval_per_task"]} fresh
questions per task (seed {log["eval_seed"]}, scenes of 3 to 5 objects); a free-form task
(Describe) by greedy decoding of the whole answer, and per word of the reference (`/word`):

| task | accuracy |
|---|---|
{rows}
"""
