"""Join the folders of a job array's shards (``mmlens flow --shard K/N``) into one run folder.

    merge_shards("runs/all", ["runs/shard-0", "runs/shard-1", "runs/shard-2"])

Each shard must be finished (its tables agree with its store and ``run.json``), all must hold
the same study (equal store signatures: model weights, data, flows, window...), and together
they must hold every example exactly once. The merged folder then holds what one run would
have written: the store, the tables and the report. A merge stopped part way is redone by the
same command in the same folder (the store records that it was merged); a folder holding a
run of its own is refused. Shards holding the free-form study (``answer_flow.jsonl``, alone or
beside the one-word study) have that part joined by ``mmlens.experiments.free_form.merge``.
Shards run with and without ``--no-word-maps`` merge (the maps
change no row): run.json's ``word_maps`` then says ``"mixed"``, with each shard's value.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmlens.experiments.free_form.merge import merge_answer_shards
from mmlens.experiments.free_form.study import ANSWER_STORE
from mmlens.experiments.knockouts import parse_flows
from mmlens.experiments.runfolder.atomic import write_atomic
from mmlens.experiments.runfolder.lock import RunLock
from mmlens.experiments.runfolder.store import read_store, store_header, write_store
from mmlens.experiments.sweep import SharedRecords, dropped_examples, results_frame
from mmlens.experiments.tables import (
    STORE_NAME,
    check_run_folder,
    write_flow_tables,
    write_run_json,
)


def _shard(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, dict]]:
    """The shard's ``run.json`` and its one-word store (None, {} for a free-form-only one)."""
    if not (folder / STORE_NAME).is_file() and not (folder / ANSWER_STORE).is_file():
        raise FileNotFoundError(f"{folder} holds no {STORE_NAME} or {ANSWER_STORE}: pass the "
                                "--out folders of `mmlens flow --shard K/N` runs")
    summary = check_run_folder(folder)
    signature, done = (read_store(folder / STORE_NAME) if (folder / STORE_NAME).is_file()
                       else (None, {}))
    if not summary.get("arguments", {}).get("shard"):
        raise ValueError(f"{folder} is not a shard (it was run without --shard K/N)")
    return summary, signature, done


def _merged_views(shards: Sequence[tuple], order: Sequence[str],
                  name: str = "views.json") -> list[dict[str, Any]] | None:
    """Per task, the view of its first kept example in ``order``, as one run would pick: each
    shard's view (in file ``name``) is its own first kept example of the task, so the
    earliest of those."""
    rank = {example_id: position for position, example_id in enumerate(order)}
    views: dict[str, dict[str, Any]] = {}
    found = False
    for folder, *_ in shards:
        path = Path(folder) / name
        if path.is_file():
            found = True
            for view in json.loads(path.read_text()):
                held = views.get(view["task"])
                if held is None or rank[view["example_id"]] < rank[held["example_id"]]:
                    views[view["task"]] = view
    return [views[task] for task in sorted(views)] if found else None


def _word_maps(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """run.json's ``word_maps`` for the merge: the shards' value when they agree; ``"mixed"``
    and ``word_maps_per_shard`` when some ran with ``--no-word-maps`` (word maps change no row,
    so such shards hold one study; each merged view keeps its maps or says they were not
    computed)."""
    values = [summary.get("word_maps", True) for summary in summaries]
    if len(set(values)) == 1:
        return {"word_maps": values[0]}
    return {"word_maps": "mixed", "word_maps_per_shard": values}


def _check_target(out: Path, signature: dict[str, Any] | None) -> None:
    """``out`` is new, or holds an earlier merge of this study (stopped part way: redone)."""
    name = STORE_NAME if signature is not None else ANSWER_STORE
    if not (out / name).exists():
        return
    header = store_header(out / name)
    if header is None or not header.get("merged") or (
            signature is not None and header["signature"] != signature):
        raise ValueError(f"{out} already holds a run: merge into a new folder")


def merge_shards(out: str | Path, shard_dirs: Sequence[str | Path], *,
                 break_lock: bool = False) -> Path:
    """Write the run folder ``out`` from finished shard folders; refuse any mismatch.
    ``break_lock``: take ``out``'s lock from a run known to be gone."""
    from mmlens.experiments.report.page import build_report

    out = Path(out)
    if not shard_dirs:
        raise ValueError("no shard folders given: pass the --out folders of the shards")
    shards = [(Path(d), *_shard(Path(d))) for d in shard_dirs]
    first_dir, first, reference, _ = shards[0]
    n_shards = first["arguments"]["shard"][1]
    owner: dict[str, Path] = {}
    for folder, summary, signature, done in shards:
        if (signature is None) != (reference is None):
            raise ValueError(f"{folder} and {first_dir} are shards of different runs (one "
                             "holds the one-word study, the other not): merge shards of one run")
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
    order = [str(i) for i in first.get("example_ids", [])]
    missing = [i for i in order if i not in owner]
    if missing:
        have = sorted(tuple(s[1]["arguments"]["shard"]) for s in shards)
        raise ValueError(f"{len(missing)} of {len(order)} examples are in no shard (e.g. "
                         f"{missing[0]!r}; shards given: {have}): finish and pass all "
                         f"{n_shards} shards")
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, break_lock=break_lock):
        _check_target(out, reference)
        summary, digests = {**first, "arguments": {**first["arguments"], "shard": None},
                            "merged_from": [str(folder) for folder, *_ in shards]}, {}
        if reference is not None:
            summary, digests = _merge_one_word(out, shards, order, summary)
        if "free_form" in first:
            summary["free_form"], free = merge_answer_shards(
                out, [folder for folder, *_ in shards], [s[1] for s in shards],
                lambda name, ids: _merged_views(shards, ids, name))
            digests.update(free)
        word_maps = _word_maps([shard_summary for _, shard_summary, *_ in shards])
        summary.update(word_maps)
        summary["arguments"] = {**summary["arguments"], "word_maps": word_maps["word_maps"]}
        summary.pop("tables", None)
        write_run_json(out, summary, digests)
        build_report(out)
    return out


def _merge_one_word(out: Path, shards: Sequence[tuple], order: Sequence[str],
                    first: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The one-word study's merged store and tables; its ``run.json`` and digests."""
    reference = shards[0][2]
    records = {i: r for _, _, _, done in shards for i, r in done.items()}
    ordered = [records[i] for i in order]
    write_store(out / STORE_NAME, reference, ordered, merged=True)
    frame = results_frame(ordered, parse_flows(reference["flows"]), first["window"],
                          first["n_layers"], metric=first.get("metric", "prob"))
    frame.attrs["records"] = SharedRecords(ordered)  # emergence and provenance rows
    digests = write_flow_tables(out, frame, seed=first["arguments"].get("seed", 0))
    views = _merged_views(shards, order)
    if views is not None:
        data = json.dumps(views).encode("utf-8")
        write_atomic(out / "views.json", data)
        digests["views.json"] = hashlib.sha256(data).hexdigest()[:16]
    dropped = dropped_examples(frame)
    arguments = {**first["arguments"], "shard": None}
    shard_only = ("arguments", "tables", "n_examples", "n_kept", "n_dropped", "world_size",
                  "examples_per_rank", "sweep_seconds", "seconds", "example_ids")
    return {
        **{k: v for k, v in first.items() if k not in shard_only},
        "arguments": arguments, "window": first["window"], "n_layers": first["n_layers"],
        "n_examples": len(order), "n_kept": int(frame.example_id.nunique()),
        "n_dropped": int((dropped["flow"] == "all").sum()),
        "merged_from": first["merged_from"],
        "examples_per_shard": [s[1]["n_examples"] for s in shards],
        "example_ids": order,
    }, digests
