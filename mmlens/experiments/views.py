"""One example per task as the model saw it: the image, the related patches, and where the
question looks.

    views = example_views(model, examples, records, settings)    # list of plain dicts
    (run_dir / "views.json").write_text(json.dumps(views))        # the report draws them

For the first kept example of each task: the base image as the vision tower receives it
(un-normalised), the question, the gold and the model's answer, the related patches of the
base grid, and the attention from the question positions to each base patch, averaged over
heads, question positions and layers. This is one extra forward per task, with attention
patterns on, outside the sweep.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image


def _image_png(model: Any, pixel_values: torch.Tensor) -> str:
    """The base image the vision tower sees, as a base64 PNG."""
    pixels = pixel_values.reshape(-1, *pixel_values.shape[-3:])[0].float().cpu()
    image_processor = model.processor.image_processor
    mean = torch.tensor(getattr(image_processor, "image_mean", [0.0] * 3))[:, None, None]
    std = torch.tensor(getattr(image_processor, "image_std", [1.0] * 3))[:, None, None]
    array = ((pixels * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@torch.no_grad()
def example_view(model: Any, record: Any, prepare_options: Mapping[str, Any],
                 model_answer: str | None) -> dict[str, Any]:
    """The view of one dataset ``Example`` (see the module docstring)."""
    from mmlens.inputs.prepare import prepare

    image = record.load_image()
    batch = prepare(model, [image], [record.question], boxes=[record.boxes_for(image.size)],
                    **prepare_options)
    batch = batch.to(model.embed.W_E.device)
    grid = model.cfg.vision.grid_size
    image = batch.positions("image", 0)
    if len(image) == grid**2 + 1 or model.cfg.feature_select_strategy == "full":
        image = image[1:]  # CLS first
    base = image[:grid**2]
    question = batch.positions("question", 0)
    total = torch.zeros(grid**2, dtype=torch.float32, device=base.device)

    def keep(pattern: torch.Tensor, hook) -> None:
        total.add_(pattern[0][:, question][:, :, base].float().mean((0, 1)))

    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    with model.hooks(fwd_hooks=[(name, keep) for name in names]):
        model(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask,
              image_sizes=batch.image_sizes, stop_at_layer=model.cfg.n_layers)
    related = torch.isin(base, batch.positions("related", 0)).nonzero().flatten()
    return {"example_id": str(record.example_id), "task": str(record.task),
            "question": record.question, "answer": str(record.answer),
            "model_answer": model_answer, "grid": grid, "image_png": _image_png(
                model, batch.pixel_values), "related": related.tolist(),
            "attention": (total / model.cfg.n_layers).cpu().tolist()}


def example_views(model: Any, examples: Sequence[Any], records: Sequence[Mapping[str, Any]],
                  prepare_options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The first kept example of each task, in task order; none for a family without a fixed
    square patch grid (Qwen-VL's dynamic resolution)."""
    if not hasattr(model.cfg.vision, "grid_size"):
        return []
    by_id = {str(e.example_id): e for e in examples}
    views, seen = [], set()
    for record in records:
        if record.get("dropped") or record["task"] in seen or record["example_id"] not in by_id:
            continue
        seen.add(record["task"])
        views.append(example_view(model, by_id[record["example_id"]], prepare_options,
                                  record.get("model_answer")))
    return sorted(views, key=lambda view: view["task"])
