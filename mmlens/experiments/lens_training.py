"""A tuned lens for a model, trained on the bundled shapes questions, as ``mmlens tuned-lens``
makes one for ``mmlens flow --tuned-lens``.

    folder, kl = make_tuned_lens("shapes-llava", "lenses/shapes-llava", steps=300)
    kl["tuned"], kl["logit"]      # held-out KL(final || lens) per layer -1..L-1

The training prompts are the study's (the model's preset template and preprocessing); a second
draw of the questions (another seed) is held out, and the held-out KL to the model's final
distribution per layer, of the tuned lens and of the logit lens, is written into the lens's
metadata (``held_out_kl``) beside the training settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmlens.experiments.presets import resolve_settings
from mmlens.inputs.prepare import prepare_examples
from mmlens.methods.tuned_lens import lens_activations, lens_kl, train_tuned_lens

PROMPTS_PER_BATCH = 8


def make_tuned_lens(model: str, out: str | Path, *, steps: int = 300, per_task: int = 20,
                    seed: int = 0, lr: float = 1e-3, device: str | None = None,
                    dtype: str | None = None) -> tuple[Path, dict[str, list[float]]]:
    """Train a tuned lens for checkpoint ``model`` on ``per_task`` shapes questions per task
    (data seed ``seed``; the held-out draw uses ``seed + 1``), save it into ``out`` and return
    the folder and the held-out KL per layer (``"logit"``, ``"tuned"``)."""
    from mmlens.data.shapes import generate_per_task
    from mmlens.model.hooked import HookedMultimodalTransformer

    if not isinstance(per_task, int) or per_task < 1:
        raise ValueError(f"per_task must be a positive integer, got {per_task!r}")
    hooked = HookedMultimodalTransformer.from_pretrained(model, device=device, dtype=dtype)
    options = resolve_settings(hooked, None).prepare_options()

    def batches(draw_seed: int) -> list[Any]:
        examples = generate_per_task(per_task, seed=draw_seed)
        return [prepare_examples(hooked, examples[i:i + PROMPTS_PER_BATCH], **options)
                for i in range(0, len(examples), PROMPTS_PER_BATCH)]

    lens = train_tuned_lens(hooked, batches(seed), steps=steps, lr=lr, seed=seed)
    resid, target = lens_activations(hooked, batches(seed + 1))
    kl = {"logit": lens_kl(hooked, None, resid, target).tolist(),
          "tuned": lens_kl(hooked, lens.to(resid.device), resid, target).tolist()}
    lens.metadata["training"].update(data="shapes", per_task=per_task)
    lens.metadata["held_out_kl"] = {name: [round(v, 6) for v in values]
                                    for name, values in kl.items()}
    return lens.cpu().save(out), kl
