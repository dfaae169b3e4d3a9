"""Join the folders of a job array's shards (``mmlens flow --shard K/N``) into one run folder.

    merge_shards("runs/all", ["runs/shard-0", "runs/shard-1", "runs/shard-2"])

Each shard must be finished (its tables agree with its store and ``run.json``), all must hold
the same study (equal store signatures: model weights, data, flows, window...), and together
they must hold every example exactly once. The merged folder then holds what one run would
have written: the store, the tables and the report.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mmlens.experiments.atomic import write_atomic
from mmlens.experiments.knockouts import parse_flows
from mmlens.experiments.lock import RunLock
from mmlens.experiments.store import FORMAT, read_store
from mmlens.experiments.sweep import dropped_examples, results_frame
from mmlens.experiments.tables import (
    STORE_NAME,
    check_run_folder,
    write_flow_tables,
    write_run_json,
    write_table,
)


def _shard(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict]]:
    if not (folder / STORE_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no {STORE_NAME}: pass the --out folders of "
                                "`mmlens flow --shard K/N` runs")
    summary = check_run_folder(folder)
    signature, done = read_store(folder / STORE_NAME)
    if not summary.get("arguments", {}).get("shard"):
        raise ValueError(f"{folder} is not a shard (it was run without --shard K/N)")
    return summary, signature, done


def merge_shards(out: str | Path, shard_dirs: Sequence[str | Path]) -> Path:
    """Write the run folder ``out`` from finished shard folders; refuse any mismatch."""
    from mmlens.experiments.report import build_report

    out = Path(out)
    if not shard_dirs:
        raise ValueError("no shard folders given: pass the --out folders of the shards")
    shards = [(Path(d), *_shard(Path(d))) for d in shard_dirs]
    first_dir, first, reference, _ = shards[0]
    n_shards = first["arguments"]["shard"][1]
    owner: dict[str, Path] = {}
    for folder, summary, signature, done in shards:
        if signature != reference:
            changed = sorted(k for k in set(signature) | set(reference)
                             if signature.get(k) != reference.get(k))
            raise ValueError(f"{folder} and {first_dir} are shards of different studies "
                             f"(they differ in {', '.join(changed)}): merge only shards run "
                             "with the same model, data and arguments")
        if summary["arguments"]["shard"][1] != n_shards:
            raise ValueError(f"{folder} is shard {summary['arguments']['shard']} but "
                             f"{first_dir} is one of {n_shards}: merge shards of one split")
        for example_id in done:
            if example_id in owner:
                raise ValueError(f"example {example_id!r} is in both {owner[example_id]} and "
                                 f"{folder}: the shards overlap; pass each shard once")
            owner[example_id] = folder
    order = [str(i) for i in first["example_ids"]]
    missing = [i for i in order if i not in owner]
    if missing:
        have = sorted(tuple(s[1]["arguments"]["shard"]) for s in shards)
        raise ValueError(f"{len(missing)} of {len(order)} examples are in no shard (e.g. "
                         f"{missing[0]!r}; shards given: {have}): finish and pass all "
                         f"{n_shards} shards")
    out.mkdir(parents=True, exist_ok=True)
    if (out / STORE_NAME).exists():
        raise ValueError(f"{out} already holds a run: merge into a new folder")
    with RunLock(out):
        records = {i: r for _, _, _, done in shards for i, r in done.items()}
        lines = [json.dumps({"format": FORMAT, "signature": reference}, separators=(",", ":"))]
        lines += [json.dumps(records[i], separators=(",", ":")) for i in order]
        write_atomic(out / STORE_NAME, "\n".join(lines) + "\n")
        frame = results_frame([records[i] for i in order], parse_flows(reference["flows"]),
                              first["window"], first["n_layers"])
        digests = write_flow_tables(out, frame)
        rank = {example_id: position for position, example_id in enumerate(order)}
        emergence = pd.concat([pd.read_csv(folder / "emergence.csv", dtype={"example_id": str})
                               for folder, *_ in shards], ignore_index=True)
        emergence = emergence.sort_values("example_id", key=lambda ids: ids.map(rank),
                                          kind="stable", ignore_index=True)
        digests.update([write_table(out, "emergence.csv", emergence)])
        dropped = dropped_examples(frame)
        arguments = {**first["arguments"], "shard": None}
        write_run_json(out, {
            "arguments": arguments, "window": first["window"], "n_layers": first["n_layers"],
            "n_examples": len(order), "n_kept": int(frame.example_id.nunique()),
            "n_dropped": int((dropped["flow"] == "all").sum()),
            "merged_from": [str(folder) for folder, *_ in shards],
            "examples_per_shard": [s[1]["n_examples"] for s in shards],
            "example_ids": order,
        }, digests)
        build_report(out)
    return out
