"""The free-form part of ``mmlens merge``: join the ``answer_flow.jsonl`` stores of the shards
of ``mmlens flow --tasks Describe --shard K/N`` (or ``--data FILE.jsonl --shard K/N``).

    section, digests = merge_answer_shards(out, folders, summaries, views)

Every shard must hold the same study (equal store signatures), together every example exactly
once; the merged store, tables and ``free_form`` section are what one run would have written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmlens.core.errors import MMLensError
from mmlens.experiments.free_form.run import write_answer_tables
from mmlens.experiments.free_form.study import ANSWER_STORE, answer_frame
from mmlens.experiments.runfolder.atomic import write_atomic
from mmlens.experiments.runfolder.store import read_store, write_store

SHARD_ONLY = ("n_examples", "n_kept", "n_dropped", "seconds", "example_ids")


def merge_answer_shards(out: Path, folders: Sequence[Path], summaries: Sequence[dict[str, Any]],
                        merged_views: Callable[[str, Sequence[str]], list | None]
                        ) -> tuple[dict[str, Any], dict[str, str]]:
    """Write the merged ``answer_flow.jsonl`` and free-form tables into ``out``; the
    ``free_form`` section of ``run.json`` and the tables' digests. ``merged_views(name,
    order)``: the shards' views in file ``name``, as one run would pick them."""
    sections = [summary.get("free_form") for summary in summaries]
    if any(section is None for section in sections) or not all(
            (folder / ANSWER_STORE).is_file() for folder in folders):
        raise MMLensError("some shards hold the free-form study and some do not: merge shards "
                          "of one run (the same --tasks or --data)")
    stores = [read_store(folder / ANSWER_STORE) for folder in folders]
    reference = stores[0][0]
    owner: dict[str, Path] = {}
    for folder, (signature, done) in zip(folders, stores, strict=True):
        if signature != reference:
            changed = sorted(k for k in set(signature or {}) | set(reference or {})
                             if (signature or {}).get(k) != (reference or {}).get(k))
            raise MMLensError(f"{folder} and {folders[0]} hold different free-form studies "
                              f"(they differ in {', '.join(changed)}): merge only shards run "
                              "with the same model, data and arguments")
        for example_id in done:
            if example_id in owner:
                raise MMLensError(f"free-form example {example_id!r} is in both "
                                  f"{owner[example_id]} and {folder}: pass each shard once")
            owner[example_id] = folder
    order = [str(i) for i in sections[0]["example_ids"]]
    missing = [i for i in order if i not in owner]
    if missing:
        raise MMLensError(f"{len(missing)} of {len(order)} free-form examples are in no shard "
                          f"(e.g. {missing[0]!r}): finish and pass every shard")
    records = {i: r for _, done in stores for i, r in done.items()}
    ordered = [records[i] for i in order]
    write_store(out / ANSWER_STORE, reference, ordered, merged=True)
    frame = answer_frame(ordered)
    first = sections[0]
    digests = write_answer_tables(out, frame, first["arguments"].get("seed", 0))
    views = merged_views("answer_views.json", order)
    if views is not None:
        data = json.dumps(views).encode("utf-8")
        write_atomic(out / "answer_views.json", data)
        digests["answer_views.json"] = hashlib.sha256(data).hexdigest()[:16]
    section = {**{k: v for k, v in first.items() if k not in SHARD_ONLY},
               "arguments": {**first["arguments"], "shard": None},
               "n_examples": len(order), "n_kept": int(frame["example_id"].nunique()),
               "n_dropped": sum(1 for r in ordered if r.get("dropped")),
               "example_ids": order}
    return section, digests
