"""What the Llama-3.2-Vision test files share: HF's tiny model in eager attention and ours on
its weights, the batches (left-padded, several images in one prompt), HF's run with its vision
blocks and decoder layers recorded (and a cross-attention layer's mask or output edited), and
the cross-attention edits the knockout tests compare against."""

import numpy as np
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor
from mmlens.zoo.tiny.mllama import IMAGE_SIZES

CROSS = (1, 2)



def eager_hf():
    """HF's tiny Llama-3.2-Vision in eager attention."""
    model = tiny_hf_model("mllama")
    model.set_attn_implementation("eager")
    return model



def hooked(hf):
    """Ours on ``hf``'s weights, with the tiny processor."""
    return HookedMultimodalTransformer.from_hf_model(hf, tiny_processor("mllama", hf.config))



def _images():
    return [Image.fromarray(np.random.default_rng(i).integers(
        0, 256, (size.height, size.width, 3), dtype=np.uint8))
        for i, size in enumerate(IMAGE_SIZES)]



def _inputs(model, images, texts):
    return dict(model.processor(images=images, text=texts, padding=True, return_tensors="pt"))



BATCHES = {  # images per prompt (indices into IMAGE_SIZES), prompts
    "wide-and-tall-left-padded": ([[0], [1]], ["<|image|>What color is the square?",
                                               "Which shape <|image|>is red?"]),
    "two-images-and-one": ([[0, 2], [1]], ["<|image|>Which <|image|>shape is red?",
                                           "Is the circle left or right of the square? <|image|>"]),
}



def _hf_run(hf, inputs, positions, edit=None):
    """HF's outputs, vision block outputs and decoder layer outputs; ``edit(layer, module,
    kwargs, output)`` may change a cross-attention layer's mask or output."""
    seen = {"vision": [], "post": []}
    vision = hf.model.vision_model
    layers = [*vision.transformer.layers, *vision.global_transformer.layers]
    handles = [b.register_forward_hook(lambda m, a, out: seen["vision"].append(out))
               for b in layers]
    for index, layer in enumerate(hf.model.language_model.layers):
        handles.append(layer.register_forward_hook(lambda m, a, out: seen["post"].append(out)))
        if edit is not None and index in CROSS:
            handles += edit(index, layer.cross_attn)
    try:
        with torch.no_grad():
            out = hf(**inputs, position_ids=positions)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen



def _ours(model, inputs, hooks=()):
    names = lambda n: n.endswith("resid_post")  # noqa: E731
    with torch.no_grad(), model.hooks(list(hooks)):
        return model.run_with_cache(inputs["input_ids"], inputs.get("pixel_values"),
                                    attention_mask=inputs["attention_mask"],
                                    image_sizes=inputs.get("aspect_ratio_ids"),
                                    names_filter=names)



def left_padded(model):
    """The left-padded batch of a wide and a tall image: ``(inputs, position_ids)``."""
    image_ids, texts = BATCHES["wide-and-tall-left-padded"]
    images = _images()
    inputs = _inputs(model, [[images[i] for i in row] for row in image_ids], texts)
    return inputs, model.position_ids(inputs["input_ids"], inputs["attention_mask"])



def _close(model, inputs, logits, theirs):
    real = inputs["attention_mask"].bool()
    return (logits - theirs)[real].abs().max() <= 1e-4



def _blocked(inputs, model, rows, keys):
    """``[batch, 1, text, keys]``: True at the (prompt, text position) rows and key slice."""
    n_keys = model.cfg.vision.max_tiles * model.cfg.vision.n_tokens
    block = torch.zeros(inputs["input_ids"].shape[0], 1, inputs["input_ids"].shape[1],
                        n_keys, dtype=torch.bool)
    for b, t in rows:
        block[b, 0, t, keys] = True
    return block



def _hf_edit(block, zero_rows):
    """HF with ``block`` added to its own cross-attention mask and, for ``zero_rows``
    ``[batch, text]``, the cross-attention output zeroed."""
    def edit(layer, module):
        def pre(m, args, kwargs):
            mask = kwargs["attention_mask"]
            kwargs["attention_mask"] = mask.masked_fill(block, torch.finfo(mask.dtype).min)
            return args, kwargs

        def post(m, args, out):
            return (out[0].masked_fill(zero_rows[..., None], 0), *out[1:])

        return [module.register_forward_pre_hook(pre, with_kwargs=True),
                module.register_forward_hook(post)]
    return edit



def _in_layer(index, edit):
    """``edit`` applied in decoder layer ``index`` only."""
    return lambda layer, module: edit(layer, module) if layer == index else []



def _mask_hooks(block):
    return [(f"blocks.{layer}.cross_attn.hook_mask", lambda m, hook: m & ~block)
            for layer in CROSS]



def _hf_self_edit(block):
    """HF with ``block`` ``[batch, 1, q, k]`` added to its self-attention layers' masks."""
    def edit(module):
        def pre(m, args, kwargs):
            mask = kwargs["attention_mask"]
            kwargs["attention_mask"] = mask.masked_fill(block, torch.finfo(mask.dtype).min)
            return args, kwargs
        return module.register_forward_pre_hook(pre, with_kwargs=True)
    return edit



def _cell(frame, example, flow, layer):
    return frame[(frame.example_id == example) & (frame.flow == flow) & (frame.layer == layer)]
