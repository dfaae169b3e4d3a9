"""Study throughput against process count: ``mmlens flow`` on 1 process vs 2 torchrun ranks.

The bundled shapes-llava on fresh shapes questions (every example kept: ``--no-filter``), one
CPU thread per process, gloo between ranks; the runs alternate so both see the same machine
load. Throughput is examples over the sweep's seconds (``run.json``'s ``sweep_seconds``: after
loading, before the emergence and report that rank 0 adds); wall is the whole command.

    python benchmarks/bench_scaling.py --per-task 20 --repeats 2
    python benchmarks/bench_scaling.py --device cuda --processes 1 2 4 --model llava-hf/...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(processes: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(processes)] if processes > 1 else [sys.executable])
    command = [*launcher, "-m", "mmlens.cli", "flow", "--model", args.model, "--per-task",
               str(args.per_task), "--no-filter", "--quiet", "--threads", "1", "--out", str(out)]
    if args.device:
        command += ["--device", args.device]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    summary = json.loads((out / "run.json").read_text())
    return {"examples": summary["n_examples"], "sweep_s": summary["sweep_seconds"],
            "wall_s": wall, "per_rank": summary["examples_per_rank"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--per-task", type=int, default=20)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    best: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for processes in args.processes:  # alternating: the same load for each count
                result = one_run(processes, args, Path(scratch) / f"{processes}-{repeat}")
                if processes not in best or result["sweep_s"] < best[processes]["sweep_s"]:
                    best[processes] = result
    print(f"model {args.model}, {best[args.processes[0]]['examples']} examples, "
          f"{os.cpu_count()} CPU cores, best of {args.repeats}")
    print(f"{'processes':>9} {'sweep s':>8} {'examples/s':>10} {'speed-up':>8} {'wall s':>7}"
          "  examples per rank")
    base = best[args.processes[0]]["examples"] / best[args.processes[0]]["sweep_s"]
    for processes in args.processes:
        result = best[processes]
        rate = result["examples"] / result["sweep_s"]
        print(f"{processes:>9} {result['sweep_s']:>8.2f} {rate:>10.2f} {rate / base:>8.2f} "
              f"{result['wall_s']:>7.1f}  {result['per_rank']}")


if __name__ == "__main__":
    main()
