"""Inputs on the bundled model: image kinds, box geometry, hook names, positions, CLI lines."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_reproduce import write_paper_subsets

from mmlens import HookedMultimodalTransformer
from mmlens.cli import main
from mmlens.core.errors import MMLensError
from mmlens.data.example import Example
from mmlens.data.shapes import export_gqa, generate_per_task
from mmlens.inputs.prepare import prepare, prepare_examples
from mmlens.methods import block_attention
from mmlens.zoo.registry import BUNDLED

pytestmark = pytest.mark.skipif(not (BUNDLED["shapes-llava"] / "config.json").is_file(),
                                reason="the bundled shapes-llava model is not installed")


@pytest.fixture(scope="module")
def model():
    return HookedMultimodalTransformer.from_pretrained("shapes-llava")


def _with_image_processor(model, **changes):
    """A copy of ``model`` whose processor's image processor has ``changes``."""
    other = copy.copy(model)
    other.processor = copy.deepcopy(model.processor)
    settings = other.processor.image_processor.to_dict()
    settings.pop("image_processor_type", None)
    other.processor.image_processor = type(model.processor.image_processor)(
        **(settings | changes))
    return other


def _patches(batch, span):
    return (batch.span(span)[0] - batch.positions("image", 0)[0]).tolist()


def test_unknown_names_filter_is_refused_with_suggestion(model):
    batch = model.prepare(Image.new("RGB", (112, 112)), "What is it?")
    with pytest.raises(KeyError, match=r"unknown hook name 'blocks.0.hook_resid_pr'. Did you mean "
                       "blocks.0.hook_resid_pre"):
        model.run_with_cache(batch, names_filter=["blocks.0.hook_resid_pr"])
    _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
    assert list(cache.keys()) == ["blocks.0.hook_resid_pre"]


def test_block_attention_position_past_the_run_raises(model):
    batch = model.prepare(Image.new("RGB", (112, 112)), "What is it?")
    n = batch.input_ids.shape[1]
    with pytest.raises(IndexError, match=rf"dst position {n + 3} \(example 0\) is past the end of "
                       rf"this run's {n} positions"):
        model.run_with_hooks(batch, fwd_hooks=block_attention([1], [n - 1, n + 3], [0]))
    with torch.no_grad():  # the positions inside the run block as before
        inside = model.run_with_hooks(batch, fwd_hooks=block_attention([1], [n - 1], [0]))
        same = model.run_with_hooks(batch, fwd_hooks=block_attention([1], [n - 1], [0],
                                                                     batch=batch))
    assert torch.equal(inside, same)


def test_nan_box_given_to_prepare_is_refused(model):
    with pytest.raises(MMLensError, match=r"example 0: box \(1.0, 2.0, nan, 5.0\) holds NaN"):
        prepare(model, Image.new("RGB", (112, 112)), "Is it red?",
                boxes=[[(1.0, 2.0, float("nan"), 5.0)]])
    example = Example("e5", "Is it red?", "yes", "ChooseAttr", "5", boxes=[(1, 2, -3, 4)],
                      image=Image.new("RGB", (112, 112)))
    with pytest.raises(MMLensError, match=r"example 'e5': box \(1, 2, -3, 4\) has a negative"):
        prepare_examples(model, [example])


def test_sixteen_bit_image_gives_the_pixels_of_its_eight_bit_copy(model):
    values = np.random.default_rng(0).integers(0, 256, (112, 112), dtype=np.uint16)
    deep = Image.fromarray(values * 257)
    assert deep.mode.startswith("I;16")
    eight = Image.fromarray(values.astype(np.uint8)).convert("RGB")
    a = prepare(model, deep, "Is it red?")
    b = prepare(model, eight, "Is it red?")
    assert torch.equal(a.pixel_values, b.pixel_values)


def test_processor_that_resizes_without_cropping_maps_boxes_as_a_resize(model):
    resized = _with_image_processor(model, do_center_crop=False,
                                    size={"height": 112, "width": 112})
    pixels = np.zeros((112, 224, 3), dtype=np.uint8)
    pixels[28:56, 56:112] = 255  # x 56..112, y 28..56: patches 2..3 x 2..3 after the resize
    batch = prepare(resized, Image.fromarray(pixels), "Is it red?", boxes=[[(56, 28, 56, 28)]])
    # which patches the processor really lit, from its own output
    image = batch.pixel_values[0, 0]
    per_patch = image.reshape(8, 14, 8, 14).mean((1, 3)).flatten()
    lit = (per_patch > (image.max() + image.min()) / 2).nonzero().flatten().tolist()
    assert _patches(batch, "related") == lit == [18, 19, 26, 27]
    with pytest.raises(MMLensError, match=r"preprocessing='resize_crop' was asked for, but the "
                       r"model's processor does 'resize'"):
        prepare(resized, Image.fromarray(pixels), "Is it red?", boxes=[[(56, 28, 56, 28)]],
                preprocessing="resize_crop")


def test_processor_of_unknown_geometry_is_refused(model):
    odd = _with_image_processor(model, do_center_crop=True, size={"shortest_edge": 128})
    with pytest.raises(MMLensError, match=r"cannot map object boxes through this image processor "
                       r"\(CLIPImageProcessor\w*: do_resize=True, size=.*'shortest_edge': 128"):
        prepare(odd, Image.new("RGB", (150, 112)), "Is it red?", boxes=[[(0, 0, 10, 10)]])


def test_rescaled_boxes_land_on_the_patches_of_the_recorded_image(model, tmp_path):
    rng = np.random.default_rng(1)
    small = Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8))
    small.save(tmp_path / "small.png")
    small.resize((200, 160)).save(tmp_path / "big.png")
    record = dict(question="Is it red?", answer="yes", task="ChooseAttr", image_id="1",
                  boxes=[(30, 20, 25, 30)], image_size=(100, 80))
    reference = prepare_examples(model, [Example("a", image_path=tmp_path / "small.png",
                                                 **record)])
    big = Example("b", image_path=tmp_path / "big.png", **record)
    with pytest.raises(MMLensError, match=r"big\.png of example 'b' is 200x160 but the data "
                       "records 100x80"):
        prepare_examples(model, [big])
    big.rescale_boxes = True
    rescaled = prepare_examples(model, [big])
    assert _patches(rescaled, "related") == _patches(reference, "related")
    assert _patches(reference, "related")


def _one_error_line(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("name, message", [
    ("shapes_llava", "did you mean 'shapes-llava'"),
    ("/no/such/folder", "model folder /no/such/folder does not exist"),
    ("llava-hf/not-cached-anywhere", "not in the local Hugging Face cache"),
])
def test_cli_model_errors_are_one_line(capsys, monkeypatch, name, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _one_error_line(capsys, main(["hooks", "--model", name]))
    assert line.startswith("mmlens hooks: error: ") and message in line


def test_cli_image_size_mismatch_is_one_line_and_rescale_is_recorded(tmp_path, capsys):
    subsets, images, out = tmp_path / "subsets", tmp_path / "images", tmp_path / "run"
    write_paper_subsets(subsets, images, generate_per_task(1, seed=5, tasks=["ChooseAttr"]))
    path = next(images.iterdir())
    with Image.open(path) as image:
        image.resize((image.width * 2, image.height * 2)).save(path, quality=95)
    args = ["reproduce", "--model", "shapes-llava", "--gqa-images", str(images),
            "--subsets", str(subsets), "--out", str(out), "--quiet"]
    line = _one_error_line(capsys, main(args))
    assert f"image {path} of example" in line and "but the data records" in line
    assert main([*args, "--rescale-boxes"]) == 0
    assert json.loads((out / "run.json").read_text())["arguments"]["rescale_boxes"] is True


def test_cli_truncated_image_is_one_line_and_the_run_completes_once_replaced(tmp_path, capsys):
    subsets, images, out = tmp_path / "subsets", tmp_path / "images", tmp_path / "run"
    write_paper_subsets(subsets, images, generate_per_task(1, seed=5,
                                                           tasks=["ChooseAttr", "QueryAttr"]))
    path = sorted(images.iterdir())[-1]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    args = ["reproduce", "--model", "shapes-llava", "--gqa-images", str(images),
            "--subsets", str(subsets), "--out", str(out), "--quiet"]
    line = _one_error_line(capsys, main(args))
    assert f"cannot read the image {path} (example '" in line and "truncated" in line
    path.write_bytes(data)
    # The store's signature holds every image's bytes: rows stored before the failure came
    # from the other bytes, so the same folder refuses them, saying what changed.
    line = _one_error_line(capsys, main(args))
    assert "examples.images" in line and "another --out" in line
    assert main([*args[:-3], "--out", str(tmp_path / "fresh"), "--quiet"]) == 0


def test_box_outside_the_image_is_refused_by_prepare_and_by_flow(model, tmp_path, capsys):
    with pytest.raises(MMLensError, match=r"example 0: box \(120, 5, 10, 10\) \(x, y, w, h\) "
                       r"lies outside the 112x112 image"):
        prepare(model, Image.new("RGB", (112, 112)), "Is it red?", boxes=[[(120, 5, 10, 10)]])
    # under --empty-spans zero such a box used to give rows of exactly 0% change
    folder = export_gqa(generate_per_task(1, seed=5, tasks=["ChooseAttr"]), tmp_path / "gqa")
    graphs = json.loads((folder / "sceneGraphs.json").read_text())
    (graph,) = graphs.values()
    for obj in graph["objects"].values():
        obj["x"] = graph["width"] + 4
    (folder / "sceneGraphs.json").write_text(json.dumps(graphs))
    out = tmp_path / "run"
    line = _one_error_line(capsys, main(["flow", "--data", str(folder), "--empty-spans", "zero",
                                         "--out", str(out), "--quiet"]))
    # every example's box misses its image: nothing to study, and the error names the box
    assert "lies outside the 112x112 image" in line and "example 'shapes5-ChooseAttr" in line
    assert not (out / "flow.csv").exists()


def test_prompt_longer_than_the_context_is_refused_with_the_lengths(model):
    assert model.cfg.n_ctx == 256
    image = Image.new("RGB", (112, 112))
    with pytest.raises(MMLensError, match=r"image 0: the prompt is \d{3} tokens \(image tokens "
                       r"included\) but the model takes at most 256 \(its max_position_embeddings"):
        prepare(model, image, "Is the square red? " * 60)
    assert prepare(model, image, "Is the square red? " * 20).input_ids.shape[1] <= 256


def test_exif_orientation_is_applied_and_recorded_in_examples_jsonl(tmp_path):
    subsets, images, out = tmp_path / "subsets", tmp_path / "images", tmp_path / "run"
    examples = generate_per_task(1, seed=5, tasks=["ChooseAttr"])
    write_paper_subsets(subsets, images, examples)
    (path,) = images.iterdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    examples[0].image.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    # the upright image matches the size the CSV records; the stored one is turned
    assert main(["reproduce", "--model", "shapes-llava", "--gqa-images", str(images),
                 "--subsets", str(subsets), "--out", str(out), "--quiet", "--no-filter"]) == 0
    (line,) = [json.loads(text) for text in (out / "examples.jsonl").read_text().splitlines()]
    assert line["exif_orientation"] == 6
    assert line["image_size"] == list(examples[0].image.size)


def test_study_drops_an_example_whose_box_misses_its_image_instead_of_zero_rows(model):
    from mmlens.experiments.sweep import dropped_examples, information_flow

    examples = generate_per_task(2, seed=3, tasks=["ChooseAttr"])
    size = examples[0].load_image().size
    examples[0].boxes = [(size[0] + 4, 0, 5, 5)]
    frame = information_flow(model, examples, flows=["related->last"], only_correct=False,
                             empty_spans="zero", progress=False)
    dropped = dropped_examples(frame)
    row = dropped[dropped.example_id == examples[0].example_id]
    assert list(row.reason.str.startswith("box outside the image")) == [True]
    assert examples[0].example_id not in set(frame.example_id)
    assert examples[1].example_id in set(frame.example_id)
