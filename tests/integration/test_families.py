"""The family seam: the registry, and the family's position rule reaching every path.

A test family that doubles LLaVA's position ids (a rule no 1D default can reproduce) shows that
the forward, the key/value cache, ``start_at_layer`` and the fast knockout engine all take
their positions from the family: each must agree with a plain LLaVA model given the doubled
positions explicitly, or with the naive path under the same family.
"""

import dataclasses

import pytest
import torch
from tiny import IMAGE_TOKEN, tiny_inputs, tiny_llava
from tiny_next import tiny_next

from mmlens import HookedMultimodalTransformer, KeyValueCache
from mmlens.experiments.engine import clean_run, fast_knockout_probs
from mmlens.experiments.knockouts import Knockout
from mmlens.experiments.naive import naive_knockout_probs
from mmlens.inputs.batch import MultimodalBatch
from mmlens.model.families import FAMILIES, LlavaFamily, family_for, register


class DoubledPositions(LlavaFamily):
    name = "test_doubled_positions"
    model_types = ("test_doubled_positions",)
    description = "LLaVA-1.5 with every decoder position doubled (tests only)"

    def position_ids(self, cfg, **kwargs):
        return 2 * super().position_ids(cfg, **kwargs)


@pytest.fixture(scope="module")
def models():
    hf = tiny_llava(text_layers=4)
    base = HookedMultimodalTransformer.from_hf_model(hf).eval()
    register(DoubledPositions())
    try:
        cfg = dataclasses.replace(base.cfg, model_type=DoubledPositions.name)
        doubled = HookedMultimodalTransformer(cfg)
        doubled.load_state_dict(base.state_dict())
        yield base, doubled.eval(), hf.config
    finally:
        FAMILIES.pop(DoubledPositions.name)


def test_registry_holds_the_two_llava_families():
    assert family_for("llava").hf_class == "LlavaForConditionalGeneration"
    assert family_for("llava_next").hf_class == "LlavaNextForConditionalGeneration"
    for model_type, family in FAMILIES.items():
        assert model_type in family.model_types
    with pytest.raises(ValueError, match="'qwen9' is not a supported model family: mmlens "
                       "supports llava: LLaVA-1.5.*; llava_next: LLaVA-NeXT"):
        family_for("qwen9")


def test_the_family_builds_the_image_modules_in_data_flow_order():
    llava = HookedMultimodalTransformer.from_hf_model(tiny_llava(text_layers=1))
    nxt = HookedMultimodalTransformer.from_hf_model(tiny_next(text_layers=1))
    assert [n for n, _ in llava.named_children()][:2] == ["vision", "projector"]
    assert [n for n, _ in nxt.named_children()][:3] == ["vision", "projector", "anyres"]
    assert not hasattr(llava, "anyres")
    names = list(nxt.hook_dict)
    assert names.index("projector.hook_out") < names.index("anyres.hook_out") < names.index(
        "hook_embed")


@torch.no_grad()
def test_forward_and_cache_take_the_family_positions(models):
    base, doubled, config = models
    inputs = tiny_inputs(config, batch=2, pad=[0, 2])
    ids, pixels, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    positions = doubled.position_ids(ids, mask)
    assert torch.equal(positions, 2 * base.position_ids(ids, mask))
    logits = doubled(ids, pixels, attention_mask=mask)
    explicit = base(ids, pixels, attention_mask=mask, position_ids=positions)
    assert (logits - explicit).abs().max() < 1e-5
    assert (logits - base(ids, pixels, attention_mask=mask)).abs().max() > 1e-3
    # The cache records the positions used; a continuation goes on with the family's rule.
    cache = KeyValueCache.empty(doubled.cfg.n_layers)
    doubled(ids[:, :-1], pixels, attention_mask=mask[:, :-1], past_kv_cache=cache)
    assert torch.equal(cache.position_ids, positions[:, :-1])
    step = doubled(ids[:, -1:], attention_mask=mask[:, -1:], past_kv_cache=cache)
    assert (step[:, -1] - logits[:, -1]).abs().max() < 1e-5
    assert torch.equal(cache.position_ids, positions)


@torch.no_grad()
def test_fast_engine_recomputes_suffixes_at_the_family_positions(models):
    base, doubled, config = models  # the probabilities of a tiny random model are ~1/60
    inputs = tiny_inputs(config, suffix=8)
    ids = inputs["input_ids"]
    image = (ids[0] == IMAGE_TOKEN).nonzero().flatten()
    question = torch.arange(image[-1] + 1, image[-1] + 6)
    last = torch.tensor([ids.shape[1] - 1])
    example = MultimodalBatch(ids, inputs["attention_mask"], inputs["pixel_values"],
                              [{"image": image, "question": question, "last": last}])
    knockouts = [Knockout(image, question, (0, 1)), Knockout(question, last, (1, 2, 3)),
                 Knockout(image, last, (2,))]
    clean = clean_run(doubled, example)
    assert torch.equal(clean.position_ids, doubled.position_ids(ids))
    token = clean.prediction(exclude=IMAGE_TOKEN)
    fast = fast_knockout_probs(doubled, clean, knockouts, token)
    naive = naive_knockout_probs(doubled, example, knockouts, token)
    assert ((fast - naive).abs() / naive).max() < 1e-5
    # Suffixes recomputed at the default 1D positions would be wrong by far more than that.
    wrong = dataclasses.replace(clean, position_ids=base.position_ids(ids))
    wrong_fast = fast_knockout_probs(doubled, wrong, knockouts, token)
    assert ((wrong_fast - naive).abs() / naive).max() > 1e-3
