"""The report's word maps: one ``causal_map`` per word and window vs all of a view's maps batched.

For each example view of the default ``mmlens flow`` run on the bundled ``shapes-llava`` (the
first example of each task), every question word's and the last position's causal map over the
view's grid, in each distinct window of the view's flows, two ways, same numbers: as before
(``word_frames``: one ``causal_map`` per word, span and window, each with its own clean run)
and ``window_word_maps`` (one clean run, every word x window x grid token variant resumed
``--batch-size`` at a time). The windows are the run's (``--run``: a finished ``mmlens flow``
folder, its ``views.json``) or, without one, four windows of three layers. Prints per view the
time of each, their ratio and the largest difference of the values (the views keep 6 decimals).

    python benchmarks/bench_word_maps.py [--run runs/flow-default] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_batched_patching import timed

from mmlens import HookedMultimodalTransformer
from mmlens.data.shapes import generate_per_task
from mmlens.experiments.presets import resolve_settings
from mmlens.experiments.report.views import view_grid
from mmlens.inputs.prepare import prepare
from mmlens.methods import window_layers
from mmlens.methods.word_maps import window_word_maps, word_frames


def per_word(model, batch, grid, windows, image_size, batch_size):
    """The maps as the views computed them before: one causal_map per word and window."""
    regions = {str(i): [grid[i:i + 1]] for i in range(len(grid))}
    return [[frame["value"].tolist()
             for span in ("question", "last")
             for _, _, frame in word_frames(model, batch, layers, span=span, regions=regions,
                                            image_size=image_size, batch_size=batch_size)]
            for layers in windows]


def compare(model, batch, windows, image_size, batch_size) -> tuple[float, float, int, float]:
    """Both ways on one view: seconds old, seconds new, words per window, largest difference."""
    grid = view_grid(model, batch).positions
    old, old_s = timed(lambda: per_word(model, batch, grid, windows, image_size, batch_size),
                       "cpu")
    new, new_s = timed(lambda: window_word_maps(model, batch, windows, grid=grid,
                                                spans=("question", "last"),
                                                batch_size=batch_size), "cpu")
    diff = max(abs(round(a, 6) - b) for old_w, new_w in zip(old, new, strict=True)
               for values, entry in zip(old_w, new_w, strict=True)
               for a, b in zip(values, entry["values"], strict=True))
    return old_s, new_s, len(new[0]), diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a finished `mmlens flow` folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava").eval()
    options = resolve_settings(model).prepare_options()
    examples = {str(e.example_id): e for e in generate_per_task(1, seed=0)}
    n_layers = model.cfg.n_layers
    if args.run:
        views = json.loads((Path(args.run) / "views.json").read_text())
        plan = [(view["example_id"], list(dict.fromkeys(tuple(f["layers"])
                                                        for f in view["flows"])))
                for view in views]
    else:
        windows = [tuple(window_layers(c, 3, n_layers)) for c in (1, 3, 5, 7)]
        plan = [(example_id, windows) for example_id in examples]
    old_total = new_total = 0.0
    print(f"shapes-llava, cpu, {args.threads} thread(s), batch size {args.batch_size}")
    print(f"{'view':34} {'words':>5} {'windows':>7} {'old s':>7} {'new s':>7} {'ratio':>6} "
          f"{'max diff':>9}")
    for example_id, windows in plan:
        record = examples[example_id]
        image = record.load_image()
        batch = prepare(model, [image], [record.question],
                        boxes=[record.boxes_for(image.size)], **options)
        old_s, new_s, n_words, diff = compare(model, batch, [list(w) for w in windows],
                                              image.size, args.batch_size)
        old_total, new_total = old_total + old_s, new_total + new_s
        print(f"{example_id:34} {n_words:5d} {len(windows):7d} {old_s:7.2f} {new_s:7.2f} "
              f"{old_s / new_s:6.1f} {diff:9.1e}")
    print(f"word-map time per view, old / new: {old_total / new_total:.1f}x "
          f"({old_total / len(plan):.2f} s -> {new_total / len(plan):.2f} s)")


if __name__ == "__main__":
    main()
