"""Paper presets end to end: empty spans as 0% rows, the paper's lens axis against Hugging
Face's hidden states, and the study with a preset, metrics, controls and provenance."""

import json

import pandas as pd
import pytest
import torch
from PIL import Image
from tiny import IMAGE_TOKEN, tiny_inputs, tiny_llava

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import dropped_examples, information_flow
from mmlens.experiments.emergence import lens_record
from mmlens.experiments.engine import clean_run, single_example
from mmlens.experiments.study import run_study
from mmlens.inputs.batch import MultimodalBatch
from mmlens.zoo import BUNDLED

LAYERS = 4


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_llava(text_layers=LAYERS)
    model = HookedMultimodalTransformer.from_hf_model(hf).eval()
    inputs = tiny_inputs(hf.config, batch=2, suffix=8)
    spans = []
    for row in range(2):
        image = (inputs["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten()
        related = image[[1, 2]] if row == 0 else image[:0]  # row 1: the objects are absent
        spans.append({"image": image, "question": torch.arange(image[-1] + 1, image[-1] + 6),
                      "last": torch.tensor([inputs["input_ids"].shape[1] - 1]),
                      "related": related, "other": image[3:]})
    batch = MultimodalBatch(inputs["input_ids"], inputs["attention_mask"],
                            inputs["pixel_values"], spans)
    return hf, model, batch


def test_empty_spans_block_nothing_under_the_paper_rule_and_are_skipped_otherwise(tiny):
    _, model, batch = tiny
    flows = ["related->question", "image->last"]
    zero = information_flow(model, batch, flows=flows, window=3, only_correct=False,
                            progress=False, empty_spans="zero")
    empty = zero[(zero.example_id == "1") & (zero.flow == "related->question")]
    assert len(empty) == LAYERS
    assert (empty.p_block == empty.p_base).all() and (empty.rel_change == 0).all()
    assert dropped_examples(zero).empty
    skip = information_flow(model, batch, flows=flows, window=3, only_correct=False,
                            progress=False, empty_spans="skip")
    assert not ((skip.example_id == "1") & (skip.flow == "related->question")).any()
    assert dropped_examples(skip).flow.tolist() == ["related->question"]
    # the other rows are the same either way
    same = zero.merge(skip, on=["example_id", "flow", "layer"])
    assert len(same) == len(skip) and (same.p_block_x == same.p_block_y).all()


def test_the_paper_lens_axis_is_hidden_states_times_the_unembedding(tiny):
    hf, model, batch = tiny
    example = single_example(batch, 0)
    token = 7
    record = lens_record(model, clean_run(model, example), {"t": token})
    paper = record["readings"]["paper"]
    assert paper["first_layer"] == 0 and len(paper["prob"]) == LAYERS + 1  # hidden_states[0..L]
    with torch.no_grad():
        out = hf(input_ids=example.input_ids, pixel_values=example.pixel_values,
                 attention_mask=example.attention_mask, output_hidden_states=True)
    unembed = hf.get_output_embeddings().weight
    # hidden_states[0..L-1] are raw residuals; hidden_states[L] is after the final norm
    expected = [(h[0, -1] @ unembed.T).softmax(-1)[token] for h in out.hidden_states]
    ours = torch.tensor([p[0] for p in paper["prob"]])
    torch.testing.assert_close(ours, torch.stack(expected).float(), atol=1e-5, rtol=1e-4)
    # and its last point is the model's own output distribution
    torch.testing.assert_close(ours[-1], out.logits[0, -1].softmax(-1)[token], atol=1e-6,
                               rtol=1e-5)
    no_norm = torch.tensor([p[0] for p in record["readings"]["no_norm"]["prob"]])
    torch.testing.assert_close(ours[1:-1], no_norm[:-1])


needs_bundled = pytest.mark.skipif(not (BUNDLED["shapes-llava"] / "config.json").is_file(),
                                   reason="shapes-llava is not bundled here")

PAPER_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The "
                "assistant gives helpful, detailed, and polite answers to the user's questions. "
                "USER: <image>\n{} \nAnswer the question using a single word or phrase. "
                "ASSISTANT:")


@needs_bundled
def test_a_preset_on_any_model_with_metric_controls_and_provenance(tmp_path):
    folder = tmp_path / "llava-1.5-7b-hf"  # a local copy named like the checkpoint
    folder.symlink_to(BUNDLED["shapes-llava"], target_is_directory=True)
    options = {"model": str(folder), "tasks": ["ChooseAttr", "LogicalObj"], "per_task": 3,
               "progress": False, "metric": "logit-diff", "controls": True}
    out = run_study(tmp_path / "run", **options)
    run = json.loads((out / "run.json").read_text())
    assert run["preset"] == "llava-hf/llava-1.5-7b-hf"
    assert run["preset_source"].startswith("found from the model name")
    assert (run["template"], run["tokenization"], run["related_rule"], run["empty_spans"],
            run["preprocessing"], run["window"]) == (
        "vicuna_v1_paper", "chunks", "paper", "zero", "pad", 7)
    assert run["metric"] == "logit-diff" and len(run["weights_sha256"]) == 64
    assert set(run["versions"]) == {"mmlens", "torch", "transformers"}
    lines = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(lines) == run["n_examples"]
    for line in lines:
        question = line["prompt"][line["prompt"].index("<image>\n") + 8:].split(" \nAnswer")[0]
        assert line["prompt"] == PAPER_PROMPT.format(question)
        assert line["input_ids"].count(1) == 1 and line["input_ids"][0] == 1  # one BOS
        assert line["image_size"] and set(line["spans"]) >= {"image", "question", "related"}
    flow = pd.read_csv(out / "flow.csv")
    assert {"metric_base", "metric_block", "change"} <= set(flow.columns)
    assert "random_related->question" in set(flow.flow)
    # logit-diff where there is a wrong option (ChooseAttr), NaN where there is none
    assert flow[flow.task == "ChooseAttr"].change.notna().all()
    assert flow[flow.task == "LogicalObj"].change.isna().all()
    # the controls are drawn reproducibly: a second run gives the same rows
    again = pd.read_csv(run_study(tmp_path / "again", **options) / "flow.csv")
    pd.testing.assert_frame_equal(flow, again)
    summary = pd.read_csv(out / "summary.csv").dropna(subset=["peak_change"])
    assert len(summary) and summary.peak_layer.between(0, 7).all()
    assert (summary.peak_change_low <= summary.peak_change + 1e-9).all()
    assert (summary.peak_change <= summary.peak_change_high + 1e-9).all()


@needs_bundled
def test_without_a_preset_the_study_says_so(tmp_path, capsys):
    out = run_study(tmp_path / "run", tasks=["ChooseAttr"], per_task=2, progress=False,
                    preset="none")
    run = json.loads((out / "run.json").read_text())
    assert run["preset"] is None and run["related_rule"] == "geometry"
    assert "no preset" in capsys.readouterr().err


@needs_bundled
def test_example_views_outline_the_related_patches_and_hold_attention(tmp_path):
    from mmlens.data.shapes import generate_per_task
    from mmlens.experiments.report.views import example_view
    from mmlens.plotting.views import example_view_figure, view_caption

    model = HookedMultimodalTransformer.from_pretrained("shapes-llava")
    example = generate_per_task(1, seed=3, tasks=["ChooseAttr"])[0]
    view = example_view(model, example, {}, "Red")
    grid = model.cfg.vision.grid_size
    batch = model.prepare(example.load_image(), example.question, boxes=[example.boxes])
    image = batch.positions("image", 0)
    assert view["related"] == (batch.positions("related", 0) - image[0]).tolist()
    assert len(view["attention"]) == grid**2
    # attention of each question token sums to at most 1 over all keys
    assert 0 < sum(view["attention"]) <= 1 + 1e-5
    figure = example_view_figure(view)
    assert len(figure.layout.shapes) == 2 * len(view["related"])  # a border and a line each
    assert f"the {len(view['related'])} related patches of {grid**2}" in view_caption(view)


def test_the_paper_settings_on_an_anyres_model():
    from tiny_next import QUESTIONS, random_image, tiny_next, tiny_processor

    from mmlens.inputs.pixel_rule import pixel_rule_mask
    from mmlens.inputs.templates import VICUNA_V1_PAPER

    processor = tiny_processor()
    model = HookedMultimodalTransformer.from_hf_model(tiny_next(), processor=processor)
    sizes, boxes = [(90, 40), (64, 64)], [[(5, 10, 12, 30)], [(40, 40, 20, 20), (0, 0, 4, 4)]]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    batch = model.prepare(images, QUESTIONS[:2], boxes=boxes, template=VICUNA_V1_PAPER,
                          tokenization="chunks", related_rule="paper")
    for i, (h, w) in enumerate(sizes):
        assert batch.prompts[i] == VICUNA_V1_PAPER.format(QUESTIONS[i])
        image, newline = batch.positions("image", i), batch.positions("image_newline", i)
        related, other = batch.positions("related", i), batch.positions("other", i)
        mask, is_newline = pixel_rule_mask(processor, model.family.image_layout(model), boxes[i],
                                             (w, h), "resize_crop")
        assert torch.equal(related, image[mask]) and torch.equal(newline, image[is_newline])
        assert sorted(related.tolist() + other.tolist() + newline.tolist()) == image.tolist()
        question = batch.positions("question", i)
        decoded = processor.tokenizer.decode(batch.input_ids[i, question])
        assert "".join(decoded.split()) == "".join(QUESTIONS[i].split())  # word-level decode


def test_prepare_pads_a_llava_15_checkpoint_unless_told_otherwise():
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava")
    image = Image.new("RGB", (60, 30), (200, 10, 10))
    mean = model.processor.image_processor.image_mean
    # written from the description: a square of int(mean * 255), the image centred on it
    square = Image.new("RGB", (60, 60), tuple(int(x * 255) for x in mean))
    square.paste(image, (0, 15))
    padded = model.processor.image_processor(square, return_tensors="pt")["pixel_values"]
    plain = model.processor.image_processor(image, return_tensors="pt")["pixel_values"]
    assert not torch.equal(padded, plain)
    assert torch.equal(model.prepare(image, "What is it?").pixel_values, plain)
    model.cfg.hf_config._name_or_path = "/models/llava-1.5-7b-hf"  # a local copy, by its name
    assert torch.equal(model.prepare(image, "What is it?").pixel_values, padded)
    told = model.prepare(image, "What is it?", preprocessing="resize_crop")
    assert torch.equal(told.pixel_values, plain)
