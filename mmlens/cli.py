"""The ``mmlens`` command: ``mmlens flow``, ``mmlens report DIR``, ``mmlens hooks``.

    mmlens flow                                  # the study on shapes-llava and fresh shapes data
    mmlens flow --data path/to/gqa --model llava-hf/llava-1.5-7b-hf --device cuda --per-task 1000
    mmlens flow --flows "image->last,question->last" --window 3 --out runs/small
    mmlens reproduce --model llava-hf/llava-1.5-7b-hf --gqa-images gqa/images \
        --subsets paper-subsets --out runs/llava-1.5-7b --device cuda --dtype float16
    mmlens flow --data answers.jsonl --out runs/mine   # free-form study on your own answers
    mmlens flow --shard 0/4 --out runs/part-0    # one of 4 job-array shares; then:
    mmlens merge runs/all runs/part-0 runs/part-1 runs/part-2 runs/part-3
    torchrun --nproc-per-node 4 -m mmlens.cli flow --device cuda ...   # data parallel
    mmlens report runs/small                     # rebuild report.html from the saved tables
    mmlens hooks --model shapes-llava            # every hook point and its shape
    mmlens tuned-lens --model shapes-llava --out lenses/shapes-llava --steps 300
    mmlens flow --tuned-lens lenses/shapes-llava # emergence gains the tuned reading
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings

from mmlens.data.example import TASKS
from mmlens.data.shapes_questions import FREE_FORM_TASKS
from mmlens.experiments.free_form.run import is_answers_file
from mmlens.experiments.free_form.study import ANSWER_FLOWS
from mmlens.experiments.knockouts import DEFAULT_FLOWS
from mmlens.experiments.metrics import METRICS
from mmlens.experiments.presets import EMPTY_SPANS, PRESETS
from mmlens.experiments.runfolder.lock import FolderBusyError
from mmlens.experiments.study import DEFAULT_MODEL, DEFAULT_PER_TASK
from mmlens.inputs.image_tokens import TOKENIZATIONS
from mmlens.inputs.spans import RELATED_RULES


def _study_options(command: argparse.ArgumentParser) -> None:
    """The settings both ``flow`` and ``reproduce`` take (``mmlens.experiments.presets``)."""
    command.add_argument("--preset", default=None,
                         help="apply a preset to any model: one of "
                         f"{', '.join(PRESETS)}, or 'none' (default: found from the "
                         "model's name or config)")
    command.add_argument("--template", default=None, help="prompt template name, overriding "
                         "the preset's (e.g. vicuna_v1, vicuna_v1_paper)")
    command.add_argument("--preprocessing", default=None, choices=["pad", "resize_crop", "resize"],
                         help="how images reach the vision tower, overriding the preset's")
    command.add_argument("--tokenization", default=None, choices=list(TOKENIZATIONS),
                         help="'chunks' (original LLaVA) or 'whole' (the processor's)")
    command.add_argument("--related-rule", default=None, choices=list(RELATED_RULES),
                         help="related patches by exact box 'geometry' or the paper's pixel rule")
    command.add_argument("--empty-spans", default=None, choices=list(EMPTY_SPANS),
                         help="a flow with an empty span: 'skip' it or write 'zero' change rows")
    command.add_argument("--metric", default="prob", choices=list(METRICS),
                         help="prob (relative change, the paper's), logprob or logit-diff")
    command.add_argument("--controls", action="store_true",
                         help="add a random control per flow (same size, same modality)")
    command.add_argument("--control-seed", type=int, default=None,
                         help="seed of the random controls (default: --seed)")
    command.add_argument("--filter-max-new-tokens", type=int, default=None,
                         help="tokens the correctness filter decodes at most (default 128, "
                         "the paper's)")
    command.add_argument("--break-lock", action="store_true", help=BREAK_LOCK_HELP)
    command.add_argument("--no-word-maps", action="store_true",
                         help="skip the causal maps of the example views' words (faster; the "
                         "report says they were not computed)")
    command.add_argument("--tuned-lens", default=None, metavar="PATH",
                         help="a tuned lens saved for this model (mmlens tuned-lens): answer "
                         "emergence gains its 'tuned' reading")


def _settings(args: argparse.Namespace) -> dict:
    return {"preset": args.preset, "template": args.template,
            "preprocessing": args.preprocessing, "tokenization": args.tokenization,
            "related_rule": args.related_rule, "empty_spans": args.empty_spans,
            "metric": args.metric, "controls": args.controls,
            "control_seed": args.control_seed,
            "filter_max_new_tokens": args.filter_max_new_tokens,
            "break_lock": args.break_lock, "word_maps": not args.no_word_maps,
            "tuned_lens": args.tuned_lens}


BREAK_LOCK_HELP = ("take over the output folder's lock from a run known to be gone (killed, or "
                   "its host shut down); the holder broken is named")
RESCALE_HELP = ("images whose size differs from the size the data records, with the same aspect "
                "ratio: rescale their boxes (default: refuse them)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmlens", description="Hooked LLaVA models: the "
                                     "information-flow study and friends.")
    commands = parser.add_subparsers(dest="command", required=True)
    flow = commands.add_parser("flow", help="run the attention-knockout study and write a report")
    flow.add_argument("--model", default=DEFAULT_MODEL,
                      help="bundled short name, local folder or hub name (default %(default)s)")
    flow.add_argument("--data", default="shapes",
                      help="'shapes' (fresh synthetic questions), a GQA folder, or a .jsonl "
                      "file of {image, prompt, reference, boxes?} lines (the free-form study "
                      "on every line; images relative to the file's folder)")
    flow.add_argument("--tasks", default=None,
                      help=f"comma-separated tasks (default all: {','.join(TASKS)}); the "
                      f"free-form {','.join(FREE_FORM_TASKS)} runs flows into every answer token")
    flow.add_argument("--reference", action="store_true",
                      help="free-form tasks and --data FILE.jsonl: force the reference answer "
                      "instead of the model's own (no correctness filter)")
    flow.add_argument("--answer-flows", default=None,
                      help="free-form tasks: comma-separated 'SPAN->answer' flows (default "
                      f"{','.join(ANSWER_FLOWS)}; without boxes in the data, the first two)")
    flow.add_argument("--per-task", type=int, default=DEFAULT_PER_TASK,
                      help="questions per task (default %(default)s)")
    flow.add_argument("--flows", default=",".join(DEFAULT_FLOWS),
                      help="comma-separated 'SOURCE->TARGET' span pairs; quote them in the "
                      "shell (default: the paper's six)")
    flow.add_argument("--window", type=int, default=None,
                      help="layers per knockout (default 9 for 40 layers, 7 for 32, ~7/32)")
    flow.add_argument("--device", default=None, help="e.g. cpu, cuda (default cpu)")
    flow.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    flow.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    flow.add_argument("--no-filter", action="store_true",
                      help="keep examples the model answers wrongly")
    flow.add_argument("--batch-size", type=_batch_size, default=64,
                      help="knockouts run together, or 'auto' to fit the free memory")
    flow.add_argument("--max-memory", default=None,
                      help="memory budget for --batch-size auto, e.g. 24GB (default: free memory)")
    flow.add_argument("--device-map", default=None,
                      help="split the model across devices: 'auto', or e.g. "
                      "'vision=cuda:0,blocks.0-15=cuda:0,blocks.16-31=cuda:1,unembed=cuda:1'")
    flow.add_argument("--threads", type=int, default=None,
                      help="CPU threads (default: 1 for small models on the CPU)")
    flow.add_argument("--out", default=None,
                      help="output folder (default runs/flow-<timestamp>); rerun with the same "
                      "folder and arguments to resume")
    flow.add_argument("--quiet", action="store_true", help="no progress bars")
    flow.add_argument("--rescale-boxes", action="store_true", help=RESCALE_HELP)
    flow.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                      help="run only the K-th (from 0) of N disjoint shares of the examples "
                      "(free-form ones too); join the shards' folders with `mmlens merge`")
    _study_options(flow)
    reproduce = commands.add_parser(
        "reproduce", help="the paper's study on its released GQA question subsets")
    reproduce.add_argument("--model", required=True,
                           help="one of the paper's checkpoints (e.g. llava-hf/llava-1.5-7b-hf), "
                           "a local folder, or shapes-llava")
    reproduce.add_argument("--gqa-images", required=True, help="folder of GQA images {img_id}.jpg")
    reproduce.add_argument("--subsets", required=True,
                           help="folder of the paper's six subset CSV files")
    reproduce.add_argument("--out", required=True, help="output folder (rerun to resume)")
    reproduce.add_argument("--tasks", default=None, help="comma-separated tasks (default all)")
    reproduce.add_argument("--per-task", type=int, default=None,
                           help="questions per task (default: every question in the files)")
    reproduce.add_argument("--device", default=None, help="e.g. cuda")
    reproduce.add_argument("--dtype", default=None, help="float16, bfloat16 or float32")
    reproduce.add_argument("--batch-size", type=_batch_size, default=64,
                           help="knockouts run together, or 'auto' to fit the free memory")
    reproduce.add_argument("--max-memory", default=None,
                           help="memory budget for --batch-size auto, e.g. 24GB")
    reproduce.add_argument("--device-map", default=None,
                           help="split the model across devices: 'auto' or part=device pairs")
    reproduce.add_argument("--no-filter", action="store_true",
                           help="keep examples the model answers wrongly")
    reproduce.add_argument("--quiet", action="store_true", help="no progress bars")
    reproduce.add_argument("--rescale-boxes", action="store_true", help=RESCALE_HELP)
    reproduce.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                           help="only the K-th of N shares of the questions (see merge)")
    _study_options(reproduce)
    merge = commands.add_parser("merge", help="join the folders of `flow --shard K/N` runs")
    merge.add_argument("out", help="new output folder")
    merge.add_argument("shards", nargs="+", help="the shards' output folders")
    merge.add_argument("--break-lock", action="store_true", help=BREAK_LOCK_HELP)
    report = commands.add_parser("report", help="rebuild report.html from a run's tables")
    report.add_argument("dir", help="output folder of `mmlens flow`")
    lens = commands.add_parser("tuned-lens", help="train a tuned lens on shapes questions "
                               "(for flow --tuned-lens)")
    lens.add_argument("--model", default=DEFAULT_MODEL)
    lens.add_argument("--out", required=True, help="folder for tuned_lens.safetensors/.json")
    lens.add_argument("--steps", type=int, default=300, help="Adam steps (default 300)")
    lens.add_argument("--per-task", type=int, default=20,
                      help="shapes questions per task to train on (default 20)")
    lens.add_argument("--seed", type=int, default=0, help="data and training seed")
    lens.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    lens.add_argument("--device", default=None)
    lens.add_argument("--dtype", default=None)
    hooks = commands.add_parser("hooks", help="list hook names and activation shapes")
    hooks.add_argument("--model", default=DEFAULT_MODEL)
    hooks.add_argument("--device", default=None)
    return parser


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def _batch_size(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _device_map(value: str | None) -> str | dict[str, str] | None:
    """``auto`` or ``part=device,...`` -> what ``from_pretrained(device_map=...)`` takes."""
    if value is None or value == "auto":
        return value
    entries = [item.split("=") for item in value.split(",") if item.strip()]
    if not entries or any(len(entry) != 2 for entry in entries):
        raise ValueError(f"--device-map {value!r}: write 'auto' or part=device pairs separated "
                         "by commas, e.g. vision=cuda:0,blocks.0-15=cuda:0,blocks.16-31=cuda:1")
    return {part.strip(): device.strip() for part, device in entries}
def _shard(value: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not K/N (e.g. 0/4)") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard {value}: K must be 0 to N-1 (e.g. 0/4 ... 3/4)")
    return index, count


def _resume_command(argv: list[str], out: object) -> str:
    """The command line that resumes this run: the same arguments, the same --out."""
    words = ["mmlens", *argv]
    if "--out" not in argv and out is not None:
        words += ["--out", str(out)]
    return " ".join(words)


def _os_error(err: OSError, out: object) -> str:
    where = err.filename or out or "the output folder"
    if err.errno == errno.ENOSPC:
        return (f"no space left on the device while writing {where}: free some space (or "
                "choose --out on another disk), then run the same command again to resume")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where} ({err.strerror}): pass --out a folder you can write to"
    return f"{err.strerror or err} ({where})"


def _tasks(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    out = getattr(args, "out", None)
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks
    warnings.formatwarning = lambda message, *rest, **kw: f"mmlens: warning: {message}\n"
    try:
        if args.command == "flow":
            from mmlens.experiments.memory import parse_memory
            from mmlens.experiments.run_options import default_out_dir
            from mmlens.experiments.study import run_study

            tasks = _tasks(args.tasks)
            answers = is_answers_file(args.data)
            if args.reference and not answers and not set(tasks or ()) & set(FREE_FORM_TASKS):
                raise ValueError("--reference forces the reference answer of free-form tasks: "
                                 f"add one of {', '.join(FREE_FORM_TASKS)} to --tasks, or pass "
                                 "--data a JSONL file of answers")
            out = args.out = args.out or default_out_dir()
            if main_process:
                print(f"mmlens flow: writing to {out} (if stopped, the same command with --out "
                      f"{out} resumes)", file=sys.stderr)
            out = run_study(
                out, model=args.model, data=args.data, tasks=tasks, per_task=args.per_task,
                flows=args.flows, window=args.window, device=args.device, dtype=args.dtype,
                seed=args.seed, only_correct=not args.no_filter, batch_size=args.batch_size,
                progress=not args.quiet, threads=args.threads,
                max_memory=None if args.max_memory is None else parse_memory(args.max_memory),
                device_map=_device_map(args.device_map),
                rescale_boxes=args.rescale_boxes,
                shard=args.shard, reference=args.reference,
                answer_flows=args.answer_flows, **_settings(args),
            )
            if main_process:
                free = answers or set(tasks or ()) & set(FREE_FORM_TASKS)
                print(f"results in {out}: " + ("answer_flow.csv, answer_summary.csv, "
                      "answer_peaks.csv, " if free else "") + ("flow.csv, summary.csv, "
                      "dropped.csv, emergence.csv, examples.jsonl, " if not answers and
                      set(tasks or TASKS) - set(FREE_FORM_TASKS) else "") + "report.html")
        elif args.command == "reproduce":
            from mmlens.experiments.memory import parse_memory
            from mmlens.experiments.reproduce import reproduce

            settings = _settings(args)
            overrides = {k: settings.pop(k) for k in ("template", "preprocessing",
                                                      "tokenization", "related_rule",
                                                      "empty_spans")}
            if any(v is not None for v in overrides.values()):
                raise ValueError("reproduce runs the paper's settings: use `mmlens flow` with "
                                 "--preset to change one of them")
            out = reproduce(
                args.out, model=args.model, gqa_images=args.gqa_images, subsets=args.subsets,
                tasks=_tasks(args.tasks), per_task=args.per_task, device=args.device,
                dtype=args.dtype, batch_size=args.batch_size, progress=not args.quiet,
                max_memory=None if args.max_memory is None else parse_memory(args.max_memory),
                device_map=_device_map(args.device_map),
                rescale_boxes=args.rescale_boxes,
                shard=args.shard,
                only_correct=not args.no_filter, **settings,
            )
            if main_process:
                print(f"results in {out}: flow.csv, summary.csv, dropped.csv, emergence.csv, "
                      "examples.jsonl, report.html")
        elif args.command == "merge":
            from mmlens.experiments.runfolder.merge import merge_shards

            print(f"merged into {merge_shards(args.out, args.shards, break_lock=args.break_lock)}")
        elif args.command == "report":
            from mmlens.experiments.report.page import build_report

            print(f"report written to {build_report(args.dir)}")
        elif args.command == "tuned-lens":
            from mmlens.experiments.lens_training import make_tuned_lens
            from mmlens.experiments.run_options import check_device

            check_device(args.device)
            folder, kl = make_tuned_lens(args.model, args.out, steps=args.steps,
                                         per_task=args.per_task, seed=args.seed, lr=args.lr,
                                         device=args.device, dtype=args.dtype)
            inner = slice(0, -1)  # the last layer through the final norm is the output itself
            print(f"tuned lens written to {folder}: held-out KL to the final layer, mean over "
                  f"layers -1..L-2, {_mean(kl['tuned'][inner]):.4f} (logit lens "
                  f"{_mean(kl['logit'][inner]):.4f})")
        else:
            from mmlens.experiments.run_options import check_device
            from mmlens.experiments.study import hook_shapes
            from mmlens.model.hooked import HookedMultimodalTransformer

            check_device(args.device)
            model = HookedMultimodalTransformer.from_pretrained(args.model, device=args.device)
            for name, shape in hook_shapes(model):
                print(f"{name:45} {list(shape)}")
    except (ValueError, FileNotFoundError, KeyError, FolderBusyError) as err:
        print(f"mmlens {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"mmlens {args.command}: error: {_os_error(err, out)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = (f"; to resume, run: {_resume_command(argv, out)}"
                  if args.command in ("flow", "reproduce") else "")
        print(f"\nmmlens {args.command}: interrupted, finished examples are kept{resume}",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
