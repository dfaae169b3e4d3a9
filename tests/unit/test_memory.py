"""The fast engine's automatic batch: sized from a memory budget, and exact whatever it is."""

import pytest
import torch
from tiny import IMAGE_TOKEN, tiny_inputs, tiny_llava

from mmlens import HookedMultimodalTransformer
from mmlens.experiments.engine import clean_run, fast_knockout_probs
from mmlens.experiments.knockouts import Knockout
from mmlens.experiments.memory import auto_batch_size, bytes_per_row, free_memory, parse_memory
from mmlens.inputs.batch import MultimodalBatch


def test_parse_memory():
    assert parse_memory("24GB") == 24 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("2e9") == 2 * 10**9
    with pytest.raises(ValueError, match="memory '12 parsecs' is not understood"):
        parse_memory("12 parsecs")


def test_budget_sets_the_batch_and_results_do_not_depend_on_it():
    hf = tiny_llava(text_layers=3)
    model = HookedMultimodalTransformer.from_hf_model(hf).eval()
    inputs = tiny_inputs(hf.config, suffix=8)
    ids = inputs["input_ids"]
    image = (ids[0] == IMAGE_TOKEN).nonzero().flatten()
    last = torch.tensor([ids.shape[1] - 1])
    example = MultimodalBatch(ids, inputs["attention_mask"], inputs["pixel_values"],
                              [{"image": image}])
    knockouts = [Knockout(image[i:i + 4], last, (layer,)) for i in (0, 4, 8, 12)
                 for layer in range(3)]
    per_row = bytes_per_row(model.cfg, 1, ids.shape[1], torch.float32)
    assert auto_batch_size(model, 1, ids.shape[1], n_rows=12, max_memory=3 * per_row) == 3
    assert auto_batch_size(model, 1, ids.shape[1], n_rows=12, max_memory=1) == 1
    assert auto_batch_size(model, 1, ids.shape[1], n_rows=12, max_memory=10**12) == 12
    assert bytes_per_row(model.cfg, 8, 64, torch.float32) > bytes_per_row(
        model.cfg, 1, 64, torch.float32)
    assert free_memory(torch.device("cpu")) > 0
    clean = clean_run(model, example)
    token = clean.prediction(exclude=IMAGE_TOKEN)
    one_batch = fast_knockout_probs(model, clean, knockouts, token, batch_size=64)
    for budget in (1, 3 * per_row, None):
        auto = fast_knockout_probs(model, clean, knockouts, token, batch_size="auto",
                                   max_memory=budget)
        assert (auto - one_batch).abs().max() < 1e-6
