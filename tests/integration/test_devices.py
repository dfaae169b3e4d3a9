"""A model split by a device map gives the single-device model's numbers, hooks included.

On the CPU every part of the map is the CPU, which still exercises the placement and the
pre-hooks that move activations; the CUDA test (skipped without a GPU) splits the model between
``cuda:0`` and the CPU and compares with the CPU model.
"""

import copy

import pytest
import torch
from tiny import IMAGE_TOKEN, tiny_inputs, tiny_llava
from tiny_next import next_inputs, tiny_next, tiny_processor

from mmlens import HookedMultimodalTransformer
from mmlens.experiments.engine import clean_run, fast_knockout_probs
from mmlens.experiments.knockouts import Knockout
from mmlens.experiments.naive import naive_knockout_probs
from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods import block_attention

LAYERS = 4


def split_map(first: str, rest: str) -> dict[str, str]:
    return {"vision": first, "projector": first, "embed": first, "blocks.0-1": first,
            "blocks.2-3": rest, "ln_final": rest, "unembed": rest}


@pytest.fixture(scope="module")
def llava():
    hf = tiny_llava(text_layers=LAYERS)
    model = HookedMultimodalTransformer.from_hf_model(hf).eval()
    inputs = tiny_inputs(hf.config, suffix=8)
    ids = inputs["input_ids"]
    image = (ids[0] == IMAGE_TOKEN).nonzero().flatten()
    question = torch.arange(image[-1] + 1, image[-1] + 6)
    last = torch.tensor([ids.shape[1] - 1])
    example = MultimodalBatch(ids, inputs["attention_mask"], inputs["pixel_values"],
                              [{"image": image, "question": question, "last": last}])
    knockouts = [Knockout(image, question, (0, 1)), Knockout(question, last, (1, 2, 3)),
                 Knockout(image, last, (2,))]
    return model, example, knockouts


@torch.no_grad()
def check_same_numbers(reference, placed, example, knockouts, atol):
    ref_logits, placed_logits = reference(example), placed(example)
    assert (placed_logits.cpu() - ref_logits).abs().max() <= atol
    # hooks on the data path on every device: an edit in a later block changes the output
    zeroed = placed.run_with_hooks(example, fwd_hooks=[("blocks.3.hook_resid_pre",
                                                        lambda x, hook: torch.zeros_like(x))])
    assert (zeroed.cpu() - ref_logits).abs().max() > 1e-3
    hooks = block_attention("image", "last", [1, 2], batch=example)
    knocked = placed.run_with_hooks(example, fwd_hooks=hooks)
    assert (knocked.cpu() - reference.run_with_hooks(example, fwd_hooks=hooks)).abs().max() <= atol
    ref_clean, placed_clean = clean_run(reference, example), clean_run(placed, example)
    token = ref_clean.prediction(exclude=IMAGE_TOKEN)
    fast = fast_knockout_probs(placed, placed_clean, knockouts, token)
    assert (fast - fast_knockout_probs(reference, ref_clean, knockouts, token)).abs().max() <= atol
    assert (fast - naive_knockout_probs(placed, example, knockouts, token)).abs().max() <= 1e-5
    tokens = placed.generate(example, max_new_tokens=4)
    assert torch.equal(tokens.cpu(), reference.generate(example, max_new_tokens=4))


def test_explicit_cpu_map_gives_the_same_numbers(llava):
    model, example, knockouts = llava
    placed = copy.deepcopy(model).place(split_map("cpu", "cpu"))
    assert placed.device_map["blocks.3"] == "cpu" and placed.device_map["vision"] == "cpu"
    assert all(hasattr(placed.get_submodule(name), "_mmlens_device_hook")
               for name in placed.device_map)
    check_same_numbers(model, placed, example, knockouts, atol=0.0)


def test_anyres_follows_the_projector():
    model = HookedMultimodalTransformer.from_hf_model(tiny_next(text_layers=2)).eval()
    inputs = next_inputs(tiny_processor(), [(90, 40)])
    with torch.no_grad():
        reference = model(inputs["input_ids"], inputs["pixel_values"],
                          image_sizes=inputs["image_sizes"])
        placed = copy.deepcopy(model).place({"vision": "cpu", "projector": "cpu",
                                             "blocks.0-1": "cpu"})
        assert placed.device_map["anyres"] == "cpu"
        assert torch.equal(placed(inputs["input_ids"], inputs["pixel_values"],
                                  image_sizes=inputs["image_sizes"]), reference)


def test_bad_maps_say_what_is_wrong(llava):
    model, _, _ = llava
    with pytest.raises(ValueError, match="'blocks.2-9': the model has blocks 0-3"):
        copy.deepcopy(model).place({"blocks.2-9": "cpu"})
    with pytest.raises(ValueError, match="'decoder' is not a part of this model: use embed"):
        copy.deepcopy(model).place({"decoder": "cpu"})
    with pytest.raises(ValueError, match="'balanced' is not understood: pass 'auto'"):
        copy.deepcopy(model).place("balanced")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine 'auto' uses the GPUs")
def test_auto_without_a_gpu_keeps_the_cpu(llava):
    model, _, _ = llava
    placed = copy.deepcopy(model).place("auto")
    assert set(placed.device_map.values()) == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_split_between_cuda_and_cpu_gives_the_cpu_numbers(llava):
    model, example, knockouts = llava
    placed = copy.deepcopy(model).place(split_map("cuda:0", "cpu"))
    assert placed.blocks[0].attn.q_weight.device.type == "cuda"
    assert placed.blocks[3].attn.q_weight.device.type == "cpu"
    check_same_numbers(model, placed, example, knockouts, atol=1e-4)
    reverse = copy.deepcopy(model).place(split_map("cpu", "cuda:0"))
    check_same_numbers(model, reverse, example, knockouts, atol=1e-4)
