"""Loading refuses what it cannot load faithfully, and says why, quickly."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from tiny import tiny_inputs, tiny_llava

from mmlens import HookedMultimodalTransformer
from mmlens.core.errors import MMLensError
from mmlens.zoo.registry import BUNDLED

PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja")


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    hf = tiny_llava()
    folder = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(folder)
    # A model loads only with a processor; the bundled model's serves here, since the tests
    # feed tensors to the model directly.
    for name in PROCESSOR_FILES:
        if (Path(BUNDLED['shapes-llava']) / name).is_file():
            shutil.copy(Path(BUNDLED['shapes-llava']) / name, folder / name)
    return hf, folder


def _with_layers(source, target, delta):
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] += delta
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_intact_checkpoint_loads_and_matches_hf(saved_tiny):
    hf, folder = saved_tiny
    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    inputs = tiny_inputs(hf.config)
    with torch.no_grad():
        ours = model(inputs["input_ids"], inputs["pixel_values"])
        theirs = hf(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_config_with_more_layers_than_weights_is_refused(saved_tiny, tmp_path):
    _, folder = saved_tiny
    bad = _with_layers(folder, tmp_path / "more", 2)
    n = json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"]
    with pytest.raises(MMLensError, match=rf"weights missing from the checkpoint: "
                       rf"model\.language_model\.layers\.{n}\.\* \(\d+\), "
                       rf"model\.language_model\.layers\.{n + 1}\.\*.*fix config\.json"):
        HookedMultimodalTransformer.from_pretrained(str(bad))


def test_config_with_fewer_layers_than_weights_is_refused(saved_tiny, tmp_path):
    _, folder = saved_tiny
    bad = _with_layers(folder, tmp_path / "fewer", -1)
    with pytest.raises(MMLensError, match=r"in the checkpoint the config has no place for: "
                       r"model\.language_model\.layers\.\d+\.\*"):
        HookedMultimodalTransformer.from_pretrained(str(bad))


def test_hub_name_offline_fails_fast_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(MMLensError, match=r"'llava-hf/no-such-model-here' is no local folder, not "
                       r"in the local Hugging Face cache.*HF_HUB_OFFLINE=1.*--model DIR"):
        HookedMultimodalTransformer.from_pretrained("llava-hf/no-such-model-here")
    assert time.perf_counter() - started < 2


def test_hub_name_without_network_fails_fast(monkeypatch):
    from mmlens.model.loading import sources

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(MMLensError, match="there is no network"):
        HookedMultimodalTransformer.from_pretrained("llava-hf/no-such-model-here")


def test_missing_local_folder_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "not-here" / "model"
    with pytest.raises(FileNotFoundError, match=r"model folder .*not-here/model does not exist"):
        HookedMultimodalTransformer.from_pretrained(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HookedMultimodalTransformer.from_pretrained("./not-here")


def test_misspelt_bundled_name_suggests_it():
    with pytest.raises(MMLensError, match="did you mean 'shapes-llava'"):
        HookedMultimodalTransformer.from_pretrained("shapes_llava")


def test_corrupt_tokenizer_is_reported_as_such(tmp_path):
    folder = shutil.copytree(BUNDLED["shapes-llava"], tmp_path / "shapes")
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:500])  # a truncated copy
    with pytest.raises(MMLensError, match=r"the tokenizer of .*shapes failed to load: "
                       r"\w+: .*tokenizer\.json"):
        HookedMultimodalTransformer.from_pretrained(str(folder))


def test_folder_without_weights_names_what_is_missing(saved_tiny, tmp_path):
    _, folder = saved_tiny
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "config.json", bare)
    with pytest.raises(MMLensError, match=r"cannot load the model .*bare: .*safetensors"):
        HookedMultimodalTransformer.from_pretrained(str(bare))
    (bare / "config.json").write_text("{not json")
    with pytest.raises(MMLensError, match=r"bare/config\.json is not valid JSON \(Expecting"):
        HookedMultimodalTransformer.from_pretrained(str(bare))
