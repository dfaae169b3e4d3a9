"""Train the bundled shapes-llava model from scratch on freshly generated shapes questions.

    python -m mmlens.zoo.train --out mmlens/zoo/shapes-llava             # CPU, about 40 minutes
    python -m mmlens.zoo.train --out runs/x --device cuda --workers 8    # GPU
    python -m mmlens.zoo.train --out runs/d --init-from mmlens/zoo/shapes-llava \
        --tasks ChooseAttr,ChooseCat,ChooseRel,CompareAttr,LogicalObj,QueryAttr,Describe:3 \
        --steps 700 --lr 5e-4 --probe-weight 0.3 --threads 1               # fine-tune

Every step draws new examples (index ``step * batch_size + j`` of the training seed) and the
weights are initialised from ``--seed``, so a run is reproducible. The prompt is the paper's;
the loss is on the answer tokens (the capitalised answer, one word or several, and ``</s>``)
plus two training-only probes (``Probes``) that give the image pathway a dense signal: without
them, training from scratch stalls where answers come from the question alone. ``--ramp``
optionally grows scenes from one object to five over the first part of training.
``--init-from`` starts from saved weights (a model folder or its ``model.safetensors``;
``--steps 0`` evaluates them and saves them in this transformers version's format).
``--tasks`` sets the task mix, ``Task:k`` (or a task named k times) drawn k times as
often; free-form tasks (``Describe``) are also scored by greedy decoding of the whole answer
(``mmlens.zoo.free_form_eval``). Needs only torch, transformers, tokenizers, PIL and
safetensors from outside
mmlens (but ``import mmlens`` itself must work).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import LlavaForConditionalGeneration

from mmlens.data.example import TASKS
from mmlens.data.shapes_questions import FREE_FORM_TASKS
from mmlens.zoo.build import (
    CLIP_MEAN,
    CLIP_STD,
    build_config,
    build_processor,
    model_card,
)
from mmlens.zoo.free_form_eval import evaluate_free_form
from mmlens.zoo.probes import IGNORE, Probes
from mmlens.zoo.train_data import (  # re-exported: the training script's data
    ShapesQuestions,
    answer_tokens,
    collate,
    task_mix,
    task_slot,
)

__all__ = ["ShapesQuestions", "answer_tokens", "collate", "evaluate", "task_mix", "task_slot",
           "train"]

TRAIN_SEED, EVAL_SEED = 1000, 2000
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # data loader workers are forked


def pixel_values(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP normalisation ``[B, 3, H, W]`` uint8 -> float, as the saved processor does it."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def answer_logits(model, batch: dict, device: str, probe_layer: int | None = None):
    """Logits ``[B, vocab]`` at the answer position (predicting the answer's first token).

    With ``probe_layer``, returns instead the logits at every position ``[B, T, vocab]``, the
    projected image tokens ``[B, n_image, d]`` and the residual stream after that language
    layer ``[B, T, d]``, for the answer loss and the training probes.
    """
    captured = []
    handle = None
    if probe_layer is not None:
        projector = model.model.multi_modal_projector
        handle = projector.register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            pixel_values=pixel_values(batch["pixels"].to(device)),
            output_hidden_states=probe_layer is not None,
        )
    finally:
        if handle is not None:
            handle.remove()
    if probe_layer is None:
        at = batch["answer_at"].to(device)
        return out.logits[torch.arange(len(at), device=device), at]
    return out.logits, captured[0], out.hidden_states[probe_layer]


@torch.no_grad()
def evaluate(
    model, tokenizer, n_per_task: int, device: str, seed: int = EVAL_SEED, tasks=TASKS
) -> dict:
    """Greedy first-token exact match per one-word task on fresh questions of ``seed``.

    Each free-form task among ``tasks`` adds ``{task}`` (whole answer greedily decoded equals
    the reference) and ``{task}/word`` (share of reference words decoded at their place).
    """
    model.eval()
    config = model.config
    n_image = config.image_seq_length
    one_word = tuple(t for t in dict.fromkeys(tasks) if t not in FREE_FORM_TASKS)
    data = ShapesQuestions(tokenizer, seed, config.vision_config.image_size, n_image)
    correct = dict.fromkeys(one_word, 0)
    items = [data[i] for i in range(n_per_task * len(TASKS))]
    items = [item for i, item in enumerate(items) if TASKS[i % len(TASKS)] in one_word]
    for start in range(0, len(items), 64):
        chunk = items[start : start + 64]
        batch = collate(chunk, tokenizer.pad_token_id)
        predicted = answer_logits(model, batch, device).argmax(-1).tolist()
        for item, token in zip(chunk, predicted, strict=True):
            correct[item["task"]] += tokenizer.decode([token]).strip().lower() == item["answer"]
    accuracy = {task: correct[task] / n_per_task for task in one_word}
    for task in dict.fromkeys(t for t in tasks if t in FREE_FORM_TASKS):
        free = ShapesQuestions(tokenizer, seed, config.vision_config.image_size, n_image,
                               tasks=(task,))
        accuracy.update(evaluate_free_form(model, tokenizer, free, n_per_task, device, task))
    model.train()
    return accuracy


def init_position_embeddings(model: LlavaForConditionalGeneration, std: float) -> None:
    """Draw the vision tower's position embeddings ``[n_patches + 1, d_vision]`` with ``std``.

    CLIP's default (0.02) is about 50 times smaller than the patch features (a sum over
    3 * 14 * 14 pixels): a tower trained from scratch then barely knows where a patch is, and
    questions about sides and relations stay at chance for a long time.
    """
    tower = model.model.vision_tower
    embeddings = getattr(tower, "vision_model", tower).embeddings
    torch.nn.init.normal_(embeddings.position_embedding.weight, std=std)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    processor = build_processor(args.image_size)
    tokenizer = processor.tokenizer
    config = build_config(
        len(tokenizer), args.image_size, args.vision_layers, args.text_layers, args.width
    )
    model = LlavaForConditionalGeneration(config)
    probes = Probes(args.width, math.isqrt(config.image_seq_length))
    probe_layer = min(args.probe_layer, args.text_layers)
    init_position_embeddings(model, args.position_std)
    model.to(args.device)
    probes.to(args.device)
    if args.init_from:
        if Path(args.init_from).is_dir():  # a saved model folder, keys as it stores them
            saved = LlavaForConditionalGeneration.from_pretrained(args.init_from)
            model.load_state_dict(saved.state_dict(), strict=True)
        else:
            model.load_state_dict(load_file(args.init_from), strict=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters on {args.device}", flush=True)

    ramp = int(args.ramp * args.steps * args.batch_size)
    tasks = task_mix(args.tasks)
    if args.init_from and args.steps:  # a fine-tune: held-out accuracy before it, to compare
        args.accuracy_before = evaluate(
            model, tokenizer, args.eval_per_task, args.device, tasks=tasks
        )
        print("held-out accuracy before", _fmt(args.accuracy_before), flush=True)
    data = ShapesQuestions(
        tokenizer, TRAIN_SEED, args.image_size, config.image_seq_length, ramp, tasks
    )
    loader = DataLoader(
        data,
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=functools.partial(collate, pad_id=tokenizer.pad_token_id),
        sampler=range(args.steps * args.batch_size),
        persistent_workers=args.workers > 0,
    )
    optimizer = torch.optim.AdamW(
        [*model.parameters(), *probes.parameters()],
        lr=args.lr,
        betas=(0.9, 0.98),
        weight_decay=0.05,
    )
    warmup = max(1, args.steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    start, running, steps_done = time.time(), 0.0, 0
    for step, batch in enumerate(loader):
        logits, image_tokens, hidden = answer_logits(model, batch, args.device, probe_layer)
        targets = batch["targets"].to(args.device)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE
        )
        probe_loss = probes.loss(image_tokens, hidden, batch)
        optimizer.zero_grad(set_to_none=True)
        (loss + args.probe_weight * probe_loss).backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *probes.parameters()], 1.0)
        optimizer.step()
        scheduler.step()
        steps_done = step + 1
        current = torch.stack([loss, probe_loss]).detach()
        running = 0.98 * running + 0.02 * current if step else current
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.time() - start
            print(
                f"step {step + 1}/{args.steps} loss {running[0]:.4f} "
                f"probes {running[1]:.4f} {elapsed:.0f}s",
                flush=True,
            )
        if args.eval_every and (step + 1) % args.eval_every == 0:
            print(
                "  eval",
                _fmt(evaluate(model, tokenizer, args.eval_quick, args.device, tasks=tasks)),
                flush=True,
            )
            model.save_pretrained(Path(args.out) / "checkpoint")
        if args.max_minutes and time.time() - start > 60 * args.max_minutes:
            print(f"stopped after {step + 1} steps: --max-minutes reached", flush=True)
            break

    accuracy = evaluate(model, tokenizer, args.eval_per_task, args.device, tasks=tasks)
    print("held-out accuracy", _fmt(accuracy), flush=True)
    args.steps_done = steps_done
    save(model, processor, Path(args.out), accuracy, args, time.time() - start)


def save(model, processor, out: Path, accuracy: dict, args, seconds: float) -> None:
    """Save weights (float32 safetensors), processor and the accuracy log under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").float().save_pretrained(out)
    processor.save_pretrained(out)
    log = {
        "accuracy": accuracy,
        "eval_per_task": args.eval_per_task,
        "eval_seed": EVAL_SEED,
        "train_seed": TRAIN_SEED,
        "steps": args.steps,
        "steps_done": args.steps_done,
        "ramp": args.ramp,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "tasks": args.tasks,
        "init_from": args.init_from,
        "probe_weight": args.probe_weight,
        "probe_layer": args.probe_layer,
        "device": args.device,
        "seconds": round(seconds),
        "max_minutes": args.max_minutes,
        "threads": args.threads,
    }
    if getattr(args, "accuracy_before", None) is not None:
        log["accuracy_before"] = args.accuracy_before
    base = Path(args.init_from or "") / "training_log.json"
    if args.init_from and base.is_file():  # a fine-tune: keep the starting point's log
        log["base"] = json.loads(base.read_text())
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    n_params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(model_card(model.config, n_params, log))


def _fmt(accuracy: dict) -> str:
    return " ".join(f"{task}={value:.3f}" for task, value in accuracy.items())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to save the HF model into")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--steps", type=int, default=3500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument(
        "--ramp", type=float, default=0.0, help="fraction of training over which scenes grow"
    )
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument(
        "--probe-weight", type=float, default=1.0, help="weight of the training-only probes"
    )
    parser.add_argument(
        "--probe-layer",
        type=int,
        default=3,
        help="language layer whose output the mention probe reads",
    )
    parser.add_argument("--position-std", type=float, default=0.5)
    parser.add_argument("--max-minutes", type=float, help="stop training early after this long")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument("--eval-per-task", type=int, default=200)
    parser.add_argument(
        "--eval-every", type=int, default=0, help="steps between quick evals and checkpoints"
    )
    parser.add_argument(
        "--eval-quick", type=int, default=50, help="questions per task, quick evals"
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--init-from", help="start from these weights (a model folder or its model.safetensors)"
    )
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help="comma-separated training tasks; Task:k draws a task k times as often",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
