"""The bundled shapes-llava model: loads offline with Hugging Face and answers fresh questions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mmlens.data import TASKS
from mmlens.data.shapes import generate_per_task
from mmlens.zoo import BUNDLED, resolve_bundled
from mmlens.zoo.build import INSTRUCTION, PROMPT_TEMPLATE

TEST_SEED = 3000  # training uses 1000, the model card's evaluation 2000


@pytest.fixture(scope="module")
def bundled():
    path = resolve_bundled("shapes-llava")
    assert path == BUNDLED["shapes-llava"]
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model.eval(), processor


def test_unknown_name_is_not_bundled():
    assert resolve_bundled("no-such-model") is None


def test_weights_are_small_float32(bundled):
    model, _ = bundled
    assert all(p.dtype == torch.float32 for p in model.parameters())
    size = (BUNDLED["shapes-llava"] / "model.safetensors").stat().st_size
    assert size <= 20 * 2**20


def test_processor_expands_image_to_64_tokens(bundled):
    model, processor = bundled
    example = generate_per_task(1, seed=TEST_SEED, tasks=["ChooseAttr"])[0]
    prompt = PROMPT_TEMPLATE.format(question=example.question)
    inputs = processor(images=example.image, text=prompt, return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (inputs.input_ids == image_id).sum().item() == 64
    assert inputs.pixel_values.shape == (1, 3, 112, 112)
    assert inputs.input_ids[0, 0].item() == processor.tokenizer.bos_token_id
    assert processor.tokenizer.unk_token_id not in inputs.input_ids
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs.input_ids.shape[1], len(processor.tokenizer))


def test_chat_template_gives_the_paper_prompt(bundled):
    _, processor = bundled
    question = "Is the circle red or blue?"
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": f"{question}\n{INSTRUCTION}"}],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == PROMPT_TEMPLATE.format(question=question)


def test_offsets_locate_the_question(bundled):
    _, processor = bundled
    question = "Is the small red circle to the left or to the right of the square?"
    prompt = PROMPT_TEMPLATE.format(question=question)
    encoded = processor.tokenizer(prompt, return_offsets_mapping=True)
    start = prompt.index(question)
    inside = [
        prompt[a:b] for a, b in encoded.offset_mapping if start <= a and b <= start + len(question)
    ]
    assert " ".join(inside) == question.replace("?", " ?")


def test_answers_fresh_questions(bundled):
    model, processor = bundled
    examples = generate_per_task(10, seed=TEST_SEED)
    prompts = [PROMPT_TEMPLATE.format(question=e.question) for e in examples]
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        images=[e.image for e in examples], text=prompts, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=1, do_sample=False)[:, -1]
    predicted = [processor.tokenizer.decode([t]).strip().lower() for t in first.tolist()]
    correct = {task: 0 for task in TASKS}
    for example, answer in zip(examples, predicted, strict=True):
        correct[example.task] += answer == example.answer
    accuracy = sum(correct.values()) / len(examples)
    # loose floors on 10 questions per task; the model card has the figure on 200 per task
    assert accuracy >= 0.9, f"accuracy {accuracy:.2f} per task {correct}"
    assert min(correct.values()) >= 7, f"a task is near chance: {correct}"
