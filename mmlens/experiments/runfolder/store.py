"""Resumable results: one JSON line per finished example, appended and flushed as it is done.

    store = ResultStore.open("runs/x/flow.jsonl", signature={"model": ..., "flows": [...]})
    store.done            # example_id -> record, from an earlier (possibly killed) run
    store.append({"example_id": "q1", ...})

The first line of a file holds the run's signature; a store made with other arguments is
refused, naming what changed. Each example's results are one line written with a single
``write`` and ``fsync``: a run killed mid-write leaves at most a partial last line, which the
writer drops on ``open``, so a restart recomputes that example once and nothing is lost or
duplicated.

Every row ends with ``"check"``: a digest of the row's bytes keyed by the signature, so a row
edited by hand, or copied from another study, is seen. The writer sets such a line aside (in
``flow.jsonl.damaged``, with one warning) and computes its example again; a reader
(``read_store``: merge, tables) refuses it. Because the rows vouch for the signature, a damaged
first line loses nothing: the writer keeps the rows that match its own signature and writes the
first line again.

Several processes share one store through shards: process ``K`` of a data-parallel run appends
to ``flow.rank{K}.jsonl`` beside ``flow.jsonl`` (process 0, or a single process, writes
``flow.jsonl``). Readers read every shard, so the examples done are the union, whatever the
number of processes that wrote them or that resume them. A job-array share (``--shard K/N``)
is recorded in the first line: another share in the same folder is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmlens.experiments.runfolder.atomic import write_atomic

FORMAT = "mmlens-results/2"
CHECK = re.compile(rb',"check":"([0-9a-f]{16})"}$')
Part = tuple[int, int] | None


def signature_key(signature: Mapping[str, Any]) -> str:
    """The digest every row's check is keyed by."""
    text = json.dumps(dict(signature), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check(key: str, body: bytes) -> str:
    return hashlib.sha256(key.encode() + body).hexdigest()[:16]


def row_line(record: Mapping[str, Any], key: str) -> bytes:
    """One stored row: the record's JSON with its check as the last field."""
    body = json.dumps(dict(record), separators=(",", ":")).encode()
    return body[:-1] + f',"check":"{_check(key, body)}"}}\n'.encode()


def header_line(signature: Mapping[str, Any], part: Part = None, merged: bool = False) -> bytes:
    header = {"format": FORMAT, "signature": dict(signature), "key": signature_key(signature),
              "part": list(part) if part else None, "merged": merged}
    return json.dumps(header, separators=(",", ":")).encode() + b"\n"


@dataclass
class StoreFile:
    """One file of a store as read: its header (None when damaged) and its rows by check."""

    path: Path
    header: dict[str, Any] | None
    lines: list[bytes] = field(default_factory=list)  # complete lines after the first
    tail: bytes = b""  # text after the last newline: a write cut off
    empty: bool = False  # not even a first line was finished
    first: bytes = b""

    def rows(self, key: str) -> tuple[list[tuple[bytes, dict]], list[tuple[int, str]]]:
        """``(good, damaged)``: the lines whose check matches ``key``, with their records, and
        ``(line number, why)`` for the others."""
        good, damaged = [], []
        for number, line in enumerate(self.lines, start=2):
            match = CHECK.search(line)
            if match is None or _check(key, line[:match.start()] + b"}") != match[1].decode():
                damaged.append((number, "no check" if match is None else "check mismatch"))
                continue
            try:
                record = json.loads(line[:match.start()] + b"}")
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("example_id"), str):
                damaged.append((number, "not a record"))
                continue
            good.append((line, record))
        return good, damaged


def read_file(path: Path) -> StoreFile:
    with open(path, "rb") as handle:
        raw = handle.read()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    if not complete:
        return StoreFile(path, None, tail=tail, empty=True)
    try:
        header = json.loads(complete[0])
    except ValueError:
        header = None
    if not (isinstance(header, dict) and header.get("format") == FORMAT
            and isinstance(header.get("signature"), dict)
            and header.get("key") == signature_key(header["signature"])
            and (header.get("part") is None or isinstance(header["part"], list))):
        header = None
    return StoreFile(path, header, complete[1:], tail, first=complete[0])


class ResultStore:
    """An append-only JSON-lines store of per-example records keyed by ``example_id``."""

    def __init__(self, path: Path, signature: dict[str, Any], done: dict[str, dict]):
        self.path = path
        self.signature = signature
        self.key = signature_key(signature)
        self.done = done

    @classmethod
    def open(cls, path: str | Path, signature: Mapping[str, Any], *, writer: int = 0,
             part: Part = None) -> ResultStore:
        """Open (or create) the store at ``path`` for a run with this ``signature``; this
        process appends to shard ``writer`` (0: ``path`` itself); ``part``: the job-array
        share ``(K, N)`` this run computes, None for all."""
        path = Path(path)
        signature = json.loads(json.dumps(dict(signature)))  # as it will read back
        key = signature_key(signature)
        own = shard_path(path, writer)
        done: dict[str, dict] = {}
        for file in shard_files(path):
            store = read_file(file)
            if store.empty:
                continue
            header = store.header
            if header is not None and (header["signature"], header.get("part")) != (
                    signature, list(part) if part else None):
                if not store.lines:
                    file.unlink()  # a header without rows holds nothing that could be mixed
                    continue
                _check_signature(file, header["signature"], signature)
                _check_part(file, header.get("part"), part)
            good, damaged = store.rows(key)
            if store.header is None and not good and (store.lines or FORMAT.encode() not in
                                                      store.first):
                raise ValueError(f"{file} is not an mmlens results store, or its first line is "
                                 "damaged and none of its rows belong to this run: rerun with "
                                 "the arguments that wrote it to recover its rows, or choose "
                                 "another output location, or move the file away")
            for _, record in good:
                done.setdefault(record["example_id"], record)
            if file == own:
                _repair(store, good, damaged, header_line(signature, part))
            elif damaged:
                _warn_damaged(file, damaged, "computed again")
        if not own.exists() or read_file(own).empty:
            own.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(own, header_line(signature, part))
        return cls(own, signature, done)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one example's record durably; each ``example_id`` once."""
        example_id = record["example_id"]
        if example_id in self.done:
            raise ValueError(f"example {example_id!r} is already in {self.path}: each example "
                             "is stored once")
        _append_line(self.path, row_line(record, self.key))
        self.done[example_id] = json.loads(json.dumps(dict(record)))


def _append_line(path: Path, line: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def write_store(path: Path, signature: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                *, merged: bool = False) -> Path:
    """A whole store in one atomic write (``merge``)."""
    key = signature_key(signature)
    return write_atomic(path, header_line(signature, merged=merged)
                        + b"".join(row_line(record, key) for record in records))


def _repair(store: StoreFile, good: list[tuple[bytes, dict]], damaged: list[tuple[int, str]],
            header: bytes) -> None:
    """The writer's own file, left with its good rows only: a damaged first line written
    again, damaged rows set aside in ``{name}.damaged``, a cut-off last line dropped."""
    path = store.path
    if store.header is None:
        warnings.warn(f"{path}: its first line was damaged; the {len(good)} rows that belong to "
                      "this run are kept and the first line is written again", stacklevel=4)
    if damaged:
        aside = path.with_name(path.name + ".damaged")
        with open(aside, "ab") as handle:
            handle.writelines(store.lines[number - 2] + b"\n" for number, _ in damaged)
        _warn_damaged(path, damaged, f"set aside in {aside.name} and computed again")
    if store.header is None or damaged:
        write_atomic(path, header + b"".join(line + b"\n" for line, _ in good))
    elif store.tail:  # a line cut off mid-write; only the file's own writer may cut it away
        with open(path, "r+b") as handle:
            handle.truncate(os.fstat(handle.fileno()).st_size - len(store.tail))


def _warn_damaged(path: Path, damaged: list[tuple[int, str]], outcome: str) -> None:
    numbers = ", ".join(str(number) for number, _ in damaged[:5])
    more = f" and {len(damaged) - 5} more" if len(damaged) > 5 else ""
    why = ", ".join(sorted({why for _, why in damaged}))
    warnings.warn(f"{path} line {numbers}{more} is damaged ({why}): {outcome}", stacklevel=4)


def _check_part(path: Path, stored: list[int] | None, part: Part) -> None:
    wanted = list(part) if part else None
    if stored == wanted:
        return

    def name(share: list | None) -> str:
        return f"shard {share[0]}/{share[1]}" if share else "the whole run"

    raise ValueError(f"{path.parent} holds {name(stored)} of this study, this run is "
                     f"{name(wanted)}: each shard goes to its own --out folder (e.g. "
                     f"{path.parent}-{wanted[0] if wanted else 'all'}); then join the shards' "
                     "folders with `mmlens merge OUT FOLDER...`")


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
    """The signature and records of a store and its shards, read only: the shards must agree
    with each other, and a damaged first line or row is refused, saying how to recover."""
    signature, done = None, {}
    for file in shard_files(path):
        store = read_file(file)
        if store.empty:
            continue
        again = (f"rerun the same `mmlens flow` command with --out {file.parent}: it keeps "
                 "the rows that belong to the run and computes the others again")
        if store.header is None:
            raise ValueError(f"{file}: its first line (the run's signature) is damaged; {again}")
        if signature is None:
            signature = store.header["signature"]
        _check_signature(file, store.header["signature"], signature)
        good, damaged = store.rows(store.header["key"])
        if damaged:
            number, why = damaged[0]
            raise ValueError(f"{file} line {number} is damaged ({why}: edited by hand, or "
                             f"from another run), {len(damaged)} line(s) in all; {again}")
        for _, record in good:
            done.setdefault(record["example_id"], record)
    return signature, done


def store_header(path: str | Path) -> dict[str, Any] | None:
    """The first line of the store at ``path``; None when missing or damaged."""
    path = Path(path)
    return read_file(path).header if path.is_file() else None


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
