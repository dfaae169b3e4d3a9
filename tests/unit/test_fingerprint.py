"""The store's signature: every part that can change a row refuses a resume when it changes."""

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import normalizers, pre_tokenizers, processors

from mmlens import HookedMultimodalTransformer
from mmlens.data.shapes import generate_per_task
from mmlens.experiments import information_flow, sweep
from mmlens.experiments.runfolder import fingerprint
from mmlens.experiments.runfolder.fingerprint import (
    source_digest,
    tensor_checksum,
    weights_checksum,
)
from mmlens.inputs.templates import VICUNA_V1
from mmlens.zoo import BUNDLED

pytestmark = pytest.mark.skipif(not (BUNDLED["shapes-llava"] / "config.json").is_file(),
                                reason="shapes-llava is not bundled here")
RUN = dict(flows=["image->last", "related->question"], window=3, only_correct=False,
           progress=False, template=VICUNA_V1, preprocessing="resize_crop")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_checksum_sees_any_single_element_edit(dtype):
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(300, 70, generator=generator).to(dtype)
    before = tensor_checksum(tensor)
    assert tensor_checksum(tensor.clone()) == before
    for index in torch.randint(0, tensor.numel(), (40,), generator=generator).tolist():
        edited = tensor.clone().reshape(-1)
        edited[index] = torch.nextafter(edited[index].float(), torch.tensor(1e9)).to(dtype)
        if edited[index] == tensor.reshape(-1)[index]:  # rounding kept it: step one more
            edited[index] = edited[index] * 2 + 1
        assert tensor_checksum(edited.reshape(tensor.shape)) != before, index
    swapped = tensor.clone().reshape(-1)
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places: the plain sum is blind
    assert tensor_checksum(swapped.reshape(tensor.shape)) != before


@pytest.fixture(scope="module")
def model():
    return HookedMultimodalTransformer.from_pretrained("shapes-llava").eval()


@pytest.fixture(scope="module")
def examples():
    return generate_per_task(1, seed=3, tasks=["ChooseAttr", "QueryAttr"])


def test_weights_checksum_covers_every_parameter(model):
    before = weights_checksum(model)
    for name, parameter in list(model.named_parameters())[::7]:
        with torch.no_grad():
            flat = parameter.view(-1)
            old = flat[-1].clone()
            flat[-1] += 1e-3
            assert weights_checksum(model) != before, name
            flat[-1] = old
    assert weights_checksum(model) == before


def _edit_image(examples):
    edited = copy.deepcopy(examples)
    image = edited[1].image.copy()
    image.putpixel((5, 5), tuple(255 - v for v in image.getpixel((5, 5))))
    edited[1].image = image
    return edited


def _with(examples, index, **changes):
    edited = list(examples)
    edited[index] = dataclasses.replace(edited[index], **changes)
    return edited


# (what changes, the signature key the refusal must name)
EXAMPLE_CHANGES = {
    "question": (lambda e: _with(e, 0, question=e[0].question + " "), "examples.questions"),
    "answer": (lambda e: _with(e, 1, answer=e[1].answer + "s"), "examples.answers"),
    "boxes": (lambda e: _with(e, 0, boxes=[(b[0] + 1, *b[1:]) for b in e[0].boxes]),
              "examples.boxes"),
    "image": (_edit_image, "examples.images"),
    "ids": (lambda e: _with(e, 0, example_id="other"), "examples.ids"),
    "recorded size": (lambda e: _with(e, 1, image_size=(224, 224)), "examples.image_sizes"),
}


@pytest.mark.parametrize("part", EXAMPLE_CHANGES)
def test_changed_example_data_is_refused(model, examples, tmp_path, part):
    change, key = EXAMPLE_CHANGES[part]
    store = tmp_path / "flow.jsonl"
    examples = [dataclasses.replace(e, image_size=e.image.size) for e in examples]
    information_flow(model, examples, store=store, **RUN)
    with pytest.raises(ValueError, match=rf"{key}: stored .* now .*another --out folder"):
        information_flow(model, change(examples), store=store, **RUN)


OPTION_CHANGES = {
    "flows": ({"flows": ["image->last"]}, "flows"),
    "window": ({"window": 1}, "window"),
    "template": ({"template": dataclasses.replace(VICUNA_V1, text=VICUNA_V1.text + " ")},
                 "template"),
    "preprocessing": ({"preprocessing": "pad"}, "preprocessing"),
    "filter": ({"only_correct": True}, "only_correct"),
    "decoding": ({"max_new_tokens": 3}, "max_new_tokens"),
    "extra spans": ({"spans": {"x": {"mine": [1]}}}, "extra_spans"),
    "preset": ({"preset": "llava-hf/llava-1.5-7b-hf"}, "preset"),
    "tokenization": ({"tokenization": "chunks"}, "tokenization"),
    "related rule": ({"related_rule": "paper"}, "related_rule"),
    "empty spans": ({"empty_spans": "zero"}, "empty_spans"),
    "metric tokens": ({"metric": "logit-diff"}, "metric_tokens"),
    "controls": ({"controls": True}, "controls"),
    "lens": ({"lens": True}, "lens"),
}


@pytest.mark.parametrize("part", OPTION_CHANGES)
def test_changed_options_are_refused(model, examples, tmp_path, part):
    options, key = OPTION_CHANGES[part]
    store = tmp_path / "flow.jsonl"
    information_flow(model, examples, store=store, **RUN)
    with pytest.raises(ValueError, match=rf"{key}: stored"):
        information_flow(model, examples, store=store, **{**RUN, **options})


def _edit_weight(model):
    model.blocks[4].mlp.in_weight.data.view(-1)[123] += 1e-4  # one element, in place


def _edit_config(model):
    model.cfg.hf_config.text_config.rope_theta = 12345.0


def _edit_processor(model):
    model.processor.image_processor.image_mean = [0.5, 0.5, 0.5]


def _edit_normalizer(model):
    model.processor.tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()


def _edit_pre_tokenizer(model):
    model.processor.tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Digits()


def _edit_post_processor(model):
    model.processor.tokenizer.backend_tokenizer.post_processor = processors.ByteLevel()


def _edit_chat_template(model):
    model.processor.chat_template = (model.processor.chat_template or "") + " "


MODEL_EDITS = {
    "weights": (_edit_weight, "weights"), "config": (_edit_config, "config"),
    "processor": (_edit_processor, "processor.image"),
    "normalizer": (_edit_normalizer, "processor.tokenizer"),
    "pre-tokenizer": (_edit_pre_tokenizer, "processor.tokenizer"),
    "post-processor": (_edit_post_processor, "processor.tokenizer"),
    "chat template": (_edit_chat_template, "processor.chat_template"),
}


@pytest.mark.parametrize("edit, key", MODEL_EDITS.values(), ids=list(MODEL_EDITS))
def test_changed_model_is_refused(examples, tmp_path, edit, key):
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava").eval()
    store = tmp_path / "flow.jsonl"
    information_flow(model, examples, store=store, **RUN)
    with torch.no_grad():
        edit(model)
    with pytest.raises(ValueError, match=rf"\({key}: stored"):
        information_flow(model, examples, store=store, **RUN)


def test_the_same_model_from_another_folder_resumes(examples, tmp_path, monkeypatch):
    """Contents, not paths: a copy of the checkpoint elsewhere resumes the store (its folder's
    name picks the preset, so it is kept)."""
    copies = [tmp_path / "a" / "shapes-llava", tmp_path / "b" / "shapes-llava"]
    for folder in copies:
        shutil.copytree(BUNDLED["shapes-llava"], folder)
    store = tmp_path / "flow.jsonl"
    first = HookedMultimodalTransformer.from_pretrained(str(copies[0])).eval()
    reference = information_flow(first, examples, store=store, **RUN)
    second = HookedMultimodalTransformer.from_pretrained(str(copies[1])).eval()
    monkeypatch.setattr(sweep, "clean_run", lambda *args: pytest.fail("recomputed"))
    assert information_flow(second, examples, store=store, **RUN).equals(reference)


def test_the_source_digest_is_content_not_place(tmp_path):
    package = Path(fingerprint.__file__).resolve().parents[2]
    copies = [tmp_path / "site-a" / "mmlens", tmp_path / "site-b" / "mmlens"]
    for folder in copies:
        shutil.copytree(package, folder, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_digest(copies[0]) == source_digest(copies[1])
    spans = copies[1] / "inputs" / "spans.py"
    spans.write_text(spans.read_text() + "\n# one more line\n")
    assert source_digest.__wrapped__(copies[1]) != source_digest(copies[0])


@pytest.mark.parametrize("edit, key", [("source_digest", "mmlens.source"),
                                       ("version_of", "mmlens.version")])
def test_changed_mmlens_code_is_refused(model, examples, tmp_path, monkeypatch, edit, key):
    store = tmp_path / "flow.jsonl"
    information_flow(model, examples, store=store, **RUN)
    monkeypatch.setattr(fingerprint, edit, lambda *args: "0123456789abcdef")
    with pytest.raises(ValueError, match=rf"\({key}: stored"):
        information_flow(model, examples, store=store, **RUN)
