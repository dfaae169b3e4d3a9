"""Which preset is in force: by name, by config shape, chosen, or none; overrides win."""

from types import SimpleNamespace

import pytest

from mmlens.experiments.presets import resolve_settings
from mmlens.inputs.checkpoints import default_preprocessing, paper_checkpoint


def fake_model(name="", anyres=False, n_layers=32, d_model=4096, d_vocab=32064):
    cfg = SimpleNamespace(hf_config=SimpleNamespace(_name_or_path=name),
                          n_layers=n_layers, d_model=d_model, d_vocab=d_vocab)
    family = SimpleNamespace(fixed_preprocessing="anyres" if anyres else None, pixel_rule=True,
                             name="llava_next" if anyres else "llava")
    return SimpleNamespace(cfg=cfg, processor=None, family=family)


@pytest.mark.parametrize("model,expected", [
    (fake_model("/models/llava-1.5-13b-hf/", n_layers=8, d_model=64, d_vocab=99),
     "llava-hf/llava-1.5-13b-hf"),
    (fake_model("llava-hf/llama3-llava-next-8b-hf", anyres=True),
     "llava-hf/llama3-llava-next-8b-hf"),
    (fake_model("/copy/of/a/model"), "llava-hf/llava-1.5-7b-hf"),  # by config shape
    (fake_model("", anyres=True, d_vocab=128320), "llava-hf/llama3-llava-next-8b-hf"),
    (fake_model("", n_layers=40, d_model=5120), "llava-hf/llava-1.5-13b-hf"),
    (fake_model("my-llava", n_layers=8, d_model=64, d_vocab=99), None),
])
def test_the_paper_checkpoint_is_found_by_name_or_config(model, expected):
    found = paper_checkpoint(model)
    assert (found[0] if found else None) == expected


def test_llava_15_checkpoints_pad_by_default():
    assert default_preprocessing(fake_model("/copy/of/a/model")) == "pad"
    assert default_preprocessing(fake_model("x", n_layers=8, d_model=64, d_vocab=99)) == \
        "resize_crop"


def test_settings_resolve_in_one_place_and_overrides_win():
    model = fake_model("/models/llava-1.5-7b-hf")
    found = resolve_settings(model)
    assert (found.preset, found.template.name, found.tokenization, found.related_rule,
            found.empty_spans, found.preprocessing, found.window) == (
        "llava-hf/llava-1.5-7b-hf", "vicuna_v1_paper", "chunks", "paper", "zero", "pad", 7)
    assert found.preset_source.startswith("found from the model name")
    changed = resolve_settings(model, related_rule="geometry", window=5)
    assert (changed.related_rule, changed.window, changed.tokenization) == ("geometry", 5,
                                                                            "chunks")
    none = resolve_settings(model, "none")
    assert none.preset is None and none.related_rule == "geometry" and none.window == 7
    small = fake_model("x", n_layers=8, d_model=64, d_vocab=99)
    chosen = resolve_settings(small, "llava-hf/llava-1.5-13b-hf")
    assert chosen.preset == "llava-hf/llava-1.5-13b-hf" and chosen.window == 8  # 9 > 8 layers
    with pytest.raises(ValueError, match="no preset named 'llava-2'"):
        resolve_settings(small, "llava-2")
    with pytest.raises(ValueError, match="unknown related_rule"):
        resolve_settings(small, related_rule="pixels")
