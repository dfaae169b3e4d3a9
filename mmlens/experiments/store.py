"""Resumable results: one JSON line per finished example, appended and flushed as it is done.

    store = ResultStore.open("runs/x/flow.jsonl", signature={"model": ..., "flows": [...]})
    store.done            # example_id -> record, from an earlier (possibly killed) run
    store.append({"example_id": "q1", ...})

The first line of a file holds the run's signature; a store made with other arguments is
refused, naming what changed. Each example's results are one line written with a single
``write`` and ``fsync``: a run killed mid-write leaves at most a partial last line, which the
writer drops on ``open``, so a restart recomputes that example once and nothing is lost or
duplicated. A damaged line elsewhere is skipped with a warning naming it, and only its example
is computed again.

Several processes share one store through shards: process ``K`` of a data-parallel run appends
to ``flow.rank{K}.jsonl`` beside ``flow.jsonl`` (process 0, or a single process, writes
``flow.jsonl``). Readers read every shard, so the examples done are the union, whatever the
number of processes that wrote them or that resume them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FORMAT = "mmlens-results/1"


class ResultStore:
    """An append-only JSON-lines store of per-example records keyed by ``example_id``."""

    def __init__(self, path: Path, signature: dict[str, Any], done: dict[str, dict]):
        self.path = path
        self.signature = signature
        self.done = done

    @classmethod
    def open(cls, path: str | Path, signature: Mapping[str, Any], *,
             writer: int = 0) -> ResultStore:
        """Open (or create) the store at ``path`` for a run with this ``signature``; this
        process appends to shard ``writer`` (0: ``path`` itself)."""
        path = Path(path)
        signature = json.loads(json.dumps(dict(signature)))  # as it will read back
        own = shard_path(path, writer)
        done: dict[str, dict] = {}
        fresh = True
        for file in shard_files(path):
            stored, records = _read_file(file, truncate=file == own)
            if stored is None:
                continue
            if not records and stored != signature:
                file.unlink()  # a header without rows holds nothing that could be mixed
                continue
            _check_signature(file, stored, signature)
            fresh = fresh and file != own
            for record in records:
                done.setdefault(record["example_id"], record)
        if fresh or not own.exists() or _read_file(own, truncate=False)[0] is None:
            own.parent.mkdir(parents=True, exist_ok=True)
            _write_line(own, {"format": FORMAT, "signature": signature}, mode="w")
        return cls(own, signature, done)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one example's record durably; each ``example_id`` once."""
        example_id = record["example_id"]
        if example_id in self.done:
            raise ValueError(f"example {example_id!r} is already in {self.path}: each example "
                             "is stored once")
        _write_line(self.path, record, mode="a")
        self.done[example_id] = json.loads(json.dumps(dict(record)))


def shard_path(path: Path, writer: int) -> Path:
    return path if writer == 0 else path.with_name(f"{path.stem}.rank{writer}{path.suffix}")


def shard_files(path: str | Path) -> list[Path]:
    """``path`` and its shards ``{stem}.rank{K}{suffix}`` that exist, in rank order."""
    path = Path(path)
    shards = []
    for file in path.parent.glob(f"{path.stem}.rank*{path.suffix}"):
        rank = file.name[len(path.stem) + 5:-len(path.suffix) or None]
        if rank.isdigit():
            shards.append((int(rank), file))
    return ([path] if path.is_file() else []) + [file for _, file in sorted(shards)]


def read_store(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, dict]]:
    """The signature and records of a store and its shards, read only (no signature check
    beyond the shards agreeing with each other)."""
    signature, done = None, {}
    for file in shard_files(path):
        stored, records = _read_file(file, truncate=False)
        if stored is None:
            continue
        if signature is None:
            signature = stored
        _check_signature(file, stored, signature)
        for record in records:
            done.setdefault(record["example_id"], record)
    return signature, done


def _write_line(path: Path, obj: Mapping[str, Any], mode: str) -> None:
    line = json.dumps(obj, separators=(",", ":")) + "\n"
    with open(path, mode, encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def _read_file(path: Path, truncate: bool) -> tuple[dict[str, Any] | None, list[dict]]:
    """``(signature, records)``; ``(None, [])`` for a file whose header was never finished.

    Text after the last newline was cut off mid-write: ignored, and cut away when ``truncate``
    (only the file's own writer may, another process may be appending to it).
    """
    with open(path, "rb") as handle:
        raw = handle.read()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    if not complete:
        return None, []
    try:
        header = json.loads(complete[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mmlens results store: choose another output "
                         "location, or move the file away to start over")
    records = []
    for number, line in enumerate(complete[1:], start=2):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("example_id"), str):
                raise ValueError("no example_id")
        except ValueError as err:
            warnings.warn(f"{path} line {number} is damaged ({err}): skipped, its example is "
                          "computed again", stacklevel=3)
            continue
        records.append(record)
    if tail and truncate:
        with open(path, "r+b") as handle:
            handle.truncate(len(raw) - len(tail))
    return header.get("signature", {}), records


def _check_signature(path: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    if stored == wanted:
        return
    keys = sorted(set(stored) | set(wanted))
    changed = [f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}" for k in keys
               if stored.get(k) != wanted.get(k)]
    raise ValueError(f"{path} holds results of a run with other arguments ("
                     + "; ".join(changed) + "). Its rows cannot be mixed with this run's: resume "
                     "with the same model, data and arguments, or start fresh with another "
                     f"--out folder (or move {path.parent / (path.stem.split('.')[0] + '*')} "
                     "away)")
