"""Resumable results: one JSON line per finished example, appended and flushed as it is done.

    store = ResultStore.open("runs/x/flow.jsonl", signature={"model": ..., "flows": [...]})
    store.done            # example_id -> record, from an earlier (possibly killed) run
    store.append({"example_id": "q1", ...})

The first line holds the run's signature; a store made with other arguments is refused. Each
example's results are one line written with a single ``write`` and ``fsync``: a run killed
mid-write leaves at most a partial last line, which ``open`` drops, so a restart recomputes
that example once and nothing is lost or duplicated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FORMAT = "mmlens-results/1"


class ResultStore:
    """An append-only JSON-lines file of per-example records keyed by ``example_id``."""

    def __init__(self, path: Path, signature: dict[str, Any], done: dict[str, dict]):
        self.path = path
        self.signature = signature
        self.done = done

    @classmethod
    def open(cls, path: str | Path, signature: Mapping[str, Any]) -> ResultStore:
        """Open (or create) the store at ``path`` for a run with this ``signature``."""
        path = Path(path)
        signature = json.loads(json.dumps(dict(signature)))  # as it will read back
        if path.exists() and path.stat().st_size > 0:
            done = _read_existing(path, signature)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            header = {"format": FORMAT, "signature": signature}
            _write_line(path, header, mode="w")
            done = {}
        return cls(path, signature, done)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one example's record durably; each ``example_id`` once."""
        example_id = record["example_id"]
        if example_id in self.done:
            raise ValueError(f"example {example_id!r} is already in {self.path}: each example "
                             "is stored once")
        _write_line(self.path, record, mode="a")
        self.done[example_id] = json.loads(json.dumps(dict(record)))


def _write_line(path: Path, obj: Mapping[str, Any], mode: str) -> None:
    line = json.dumps(obj, separators=(",", ":")) + "\n"
    with open(path, mode, encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def _read_existing(path: Path, signature: dict[str, Any]) -> dict[str, dict]:
    with open(path, "rb") as handle:
        raw = handle.read()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # text after the last newline was cut off mid-write
    try:
        header = json.loads(complete[0]) if complete else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mmlens results store: choose another output "
                         "location, or delete the file to start over")
    _check_signature(path, header.get("signature", {}), signature)
    done: dict[str, dict] = {}
    for number, line in enumerate(complete[1:], start=2):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is damaged ({err}): delete the file to "
                             "start the run over") from err
        done[record["example_id"]] = record
    if tail:
        with open(path, "r+b") as handle:
            handle.truncate(len(raw) - len(tail))
    return done


def _check_signature(path: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    if stored == wanted:
        return
    keys = sorted(set(stored) | set(wanted))
    changed = [f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}" for k in keys
               if stored.get(k) != wanted.get(k)]
    raise ValueError(f"{path} holds results of a run with other arguments ("
                     + "; ".join(changed) + "). Resume with the same arguments, choose another "
                     "output location, or delete the file to start over")
