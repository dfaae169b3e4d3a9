"""SAE features over image tokens (language and vision hooks) and the feature-level flow, on
the bundled shapes-llava, against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_saes import numpy_sae, random_weights, write_sae

from mmlens import HookedMultimodalTransformer
from mmlens.core.errors import MMLensError
from mmlens.data.shapes import generate_per_task
from mmlens.inputs.prepare import prepare_examples
from mmlens.methods.sae_features import feature_flow, image_features
from mmlens.methods.saes import load_sae
from mmlens.plotting import feature_map_figure

LANGUAGE_HOOK = "blocks.2.hook_resid_post"
VISION_HOOK = "vision.blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def shapes():
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava").eval()
    examples = generate_per_task(1, seed=9, tasks=["ChooseAttr", "QueryAttr"])
    return model, prepare_examples(model, examples)


@pytest.fixture(scope="module")
def weights():
    return random_weights(128, 96, seed=3)


@pytest.mark.parametrize("hook, offset", [(LANGUAGE_HOOK, None), (VISION_HOOK, 1)])
def test_image_features_read_each_token(shapes, weights, tmp_path, hook, offset):
    model, batch = shapes
    sae = load_sae(write_sae(tmp_path / "sae", weights, hook))
    frame = image_features(model, batch, sae, top=3)
    assert len(frame) == len(batch) * 3 * 64
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=hook)
    for example in range(len(batch)):
        image = batch.positions("image", example)
        # LLaVA-1.5: token k comes from tower patch k + 1 (CLS at 0)
        x = (cache[hook][example, image] if offset is None
             else cache[hook][example, 1:65]).double().numpy()
        acts, _ = numpy_sae(weights, x, "standard")
        top = np.argsort(-acts.sum(0))[:3].tolist()
        rows = frame[frame.example == example]
        assert list(dict.fromkeys(rows.feature)) == top
        for feature in top:
            ours = rows[rows.feature == feature].activation.to_numpy()
            assert np.abs(ours - acts[:, feature]).max() <= 1e-4
        assert rows.position.map(lambda p: p[0]).tolist()[:64] == image.tolist()
    figure = feature_map_figure(frame, batch.examples[0].load_image())
    first = frame[(frame.example == 0) & (frame.feature == top_of(frame))]
    assert len(figure.layout.shapes) == len(first)
    assert f"{first.activation.max():.3g}" in figure.layout.annotations[0].text


def top_of(frame):
    return int(frame[frame.example == 0].feature.iloc[0])


def test_feature_flow_ablates_the_top_features_of_the_span(shapes, weights, tmp_path):
    model, batch = shapes
    sae = load_sae(write_sae(tmp_path / "sae", weights, LANGUAGE_HOOK))
    layers = [1, 2, 3]
    frame = feature_flow(model, batch, [sae], layers=layers, src="related", dst="last", k=4)
    for example in range(len(batch)):
        one = batch.select(example)
        related = one.positions("related", 0)
        row = frame.iloc[example]
        with torch.no_grad():
            _, cache = model.run_with_cache(one, names_filter=LANGUAGE_HOOK)
        acts, _ = numpy_sae(weights, cache[LANGUAGE_HOOK][0, related].double().numpy(),
                            "standard")
        chosen = np.argsort(-acts.sum(0))[:4]
        assert sorted(row.feature_ids[LANGUAGE_HOOK]) == sorted(chosen.tolist())

        def by_hand(resid, hook, related=related, chosen=chosen):  # subtract the chosen
            # features' decoder images at the related positions
            x = resid[0, related].double().numpy()
            a, _ = numpy_sae(weights, x, "standard")
            edit = a[:, chosen] @ weights["W_dec"][chosen].double().numpy()
            resid = resid.clone()
            resid[0, related] -= torch.tensor(edit, dtype=resid.dtype)
            return resid

        with torch.no_grad():
            p = model.run_with_hooks(one, fwd_hooks=[(LANGUAGE_HOOK, by_hand)])[0, -1]
        p = float(p.float().softmax(-1)[int(row.target)])
        assert abs(p - row.p_features) <= 1e-5
        assert row.share == pytest.approx(row.features / row.knockout)
    with pytest.raises(MMLensError, match="vision tower"):
        feature_flow(model, batch, [load_sae(write_sae(tmp_path / "v", weights, VISION_HOOK))],
                     layers=layers)
