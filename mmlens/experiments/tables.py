"""A run folder's tables, written so that they always agree with each other and with the store.

    digests = write_flow_tables(out, frame)          # flow.csv, summary.csv, dropped.csv,
                                                     # emergence.csv, examples.jsonl
    write_run_json(out, summary, digests)            # run.json last: it vouches for the tables
    check_run_folder(out)                            # before a report is built from them

Each file is replaced atomically (``mmlens.experiments.runfolder.atomic``), and ``run.json``,
written after the tables, records a digest of each. A run stopped between two writes leaves
tables that disagree with ``run.json``; ``check_run_folder`` then refuses to report them, and
rerunning the same command rebuilds them from the store.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from mmlens.experiments.emergence import emergence_frame
from mmlens.experiments.provenance import examples_jsonl
from mmlens.experiments.runfolder.atomic import write_atomic
from mmlens.experiments.runfolder.store import read_store
from mmlens.experiments.summary import flow_summary
from mmlens.experiments.sweep import drop_counts, dropped_examples

STORE_NAME = "flow.jsonl"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def write_table(out: Path, name: str, frame: pd.DataFrame) -> tuple[str, str]:
    data = frame.to_csv(index=False).encode("utf-8")
    write_atomic(out / name, data)
    return name, _sha(data)


def write_flow_tables(out: Path, frame: pd.DataFrame, *, seed: int = 0,
                      golds: dict[str, str] | None = None) -> dict[str, str]:
    """``flow.csv``, ``summary.csv`` (when rows exist; bootstrap intervals drawn from
    ``seed``), ``dropped.csv`` and, from the stored records in ``frame.attrs["records"]``,
    ``emergence.csv`` and ``examples.jsonl``; their digests."""
    digests = dict([write_table(out, "flow.csv", frame)])
    if not frame.empty:
        digests.update([write_table(out, "summary.csv", flow_summary(frame, seed=seed))])
    elif (out / "summary.csv").exists():
        (out / "summary.csv").unlink()  # a summary of earlier rows would not match
    digests.update([write_table(out, "dropped.csv", dropped_examples(frame))])
    records = frame.attrs.get("records")
    if records is not None:
        digests.update([write_table(out, "emergence.csv", emergence_frame(records))])
        data = examples_jsonl(records, golds).encode("utf-8")
        write_atomic(out / "examples.jsonl", data)
        digests["examples.jsonl"] = _sha(data)
    return digests


def write_run_json(out: Path, summary: dict[str, Any], digests: dict[str, str]) -> None:
    write_atomic(out / "run.json", json.dumps({**summary, "tables": digests}, indent=1))


def all_dropped_message(dropped: pd.DataFrame, n_examples: int, out: Path | None = None) -> str:
    """Why no example is left, and what to change (``out``: the run folder, to name its
    ``dropped.csv``)."""
    whole = dropped[dropped["flow"] == "all"]
    kinds = drop_counts(dropped)
    why = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    if whole.empty:
        why = "every flow's span was empty"
    advice = []
    if kinds.get("wrong answer"):
        advice.append("pass --no-filter to keep the examples the model answers wrongly")
    if any(kind.startswith("empty span") for kind in kinds) or whole.empty:
        advice.append("choose --flows whose spans the examples have (e.g. without related "
                      "or other when the questions' objects have no boxes)")
    example = f" (e.g. {whole['example_id'].iloc[0]}: {whole['reason'].iloc[0]})" if len(
        whole) else ""
    where = Path(out) / "dropped.csv" if out is not None else "dropped.csv"
    return (f"all {n_examples} examples were dropped: {why}{example}; see {where}. "
            + "; or ".join(advice))


def check_run_folder(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a finished run whose tables match it and its store; else refuse."""
    run_dir = Path(run_dir)
    again = ("rerun the same `mmlens flow` command with --out "
             f"{run_dir}: it rebuilds the tables from the store without recomputing")
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise ValueError(f"{run_dir} has tables but no run.json: the run did not finish; {again}")
    try:
        summary = json.loads(run_file.read_text())
    except ValueError as err:
        raise ValueError(f"{run_file} is damaged ({err}): {again}") from err
    for name, digest in summary.get("tables", {}).items():
        path = run_dir / name
        if not path.is_file() or _sha(path.read_bytes()) != digest:
            state = "is missing" if not path.is_file() else "differs from the one run.json lists"
            raise ValueError(f"{path} {state} (a run stopped while writing its tables?); {again}")
    if (run_dir / STORE_NAME).is_file():
        stored = set(read_store(run_dir / STORE_NAME)[1])
        flow = pd.read_csv(run_dir / "flow.csv", usecols=["example_id"], dtype=str)
        dropped = pd.read_csv(run_dir / "dropped.csv", dtype=str)
        tabled = set(flow["example_id"]) | set(dropped.loc[dropped["flow"] == "all",
                                                           "example_id"])
        expected = summary.get("n_examples")
        if tabled != stored or (expected is not None and expected != len(stored)):
            raise ValueError(
                f"the tables in {run_dir} hold {len(tabled)} examples, its store "
                f"{len(stored)}, run.json {expected}: they are of different runs; {again}")
    return summary
