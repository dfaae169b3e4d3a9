"""What a run folder records about where its numbers came from.

``examples.jsonl``: one JSON object per example, kept or dropped: ``example_id``, ``task``,
``prompt`` (the exact text given to the tokenizer: under ``tokenization="whole"`` the image
token's string once per image token, e.g. Qwen-VL's ``<|image_pad|>``; under ``"chunks"``
``<image>`` once, where the image ids go),
``input_ids``, ``image_size`` ``[width, height]`` as loaded, ``exif_orientation`` (the EXIF
orientation applied to the image file, 2-8; 1 or null: none), ``spans`` ``{name: [absolute
positions]}``, ``answer`` (gold), ``model_answer`` (greedy, decoded until it can no longer
equal the gold answer), ``kept``, ``metric_tokens`` (under ``logit-diff``: the ids of the
answer and the wrong option compared, ``{"answer": id, "foil": id}``; else null).

``run.json`` gets ``versions`` (mmlens, torch, transformers), ``mmlens_source`` (a digest of
the installed package's source, ``fingerprint.source_digest``) and ``weights_sha256`` (a digest
of every parameter) from ``run_provenance``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmlens.experiments.runfolder.fingerprint import source_digest, version_of


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, by name, in the model's own dtype."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        data = tensor.detach().to("cpu").contiguous()
        digest.update(str(data.dtype).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def run_provenance(model: torch.nn.Module) -> dict[str, Any]:
    """Versions, the package's source digest and the weight checksum, for ``run.json``."""
    return {"versions": {name: version_of(name) for name in ("mmlens", "torch", "transformers")},
            "mmlens_source": source_digest(),
            "weights_sha256": weights_sha256(model)}


def example_lines(records: Sequence[Mapping[str, Any]], golds: Mapping[str, str] | None = None
                  ) -> list[dict[str, Any]]:
    """One provenance object per stored record (the gold answer from ``golds``, else the
    record's own)."""
    golds = golds or {}
    lines = []
    for record in records:
        provenance = record.get("provenance", {})
        lines.append({
            "example_id": record["example_id"], "task": record["task"],
            "prompt": provenance.get("prompt"), "input_ids": provenance.get("input_ids"),
            "image_size": provenance.get("image_size"),
            "exif_orientation": provenance.get("exif_orientation"),
            "spans": provenance.get("spans"),
            "answer": golds.get(record["example_id"], provenance.get("answer")),
            "model_answer": record.get("model_answer"), "kept": not record.get("dropped"),
            "metric_tokens": record.get("metric_tokens"),
        })
    return lines


def examples_jsonl(records: Sequence[Mapping[str, Any]],
                   golds: Mapping[str, str] | None = None) -> str:
    """The text of ``examples.jsonl``: one line per record."""
    return "".join(json.dumps(line, separators=(",", ":")) + "\n"
                   for line in example_lines(records, golds))


def write_examples(path: str | Path, records: Sequence[Mapping[str, Any]],
                   golds: Mapping[str, str] | None = None) -> Path:
    """Write ``examples.jsonl`` (atomically: a reader never sees half of it)."""
    from mmlens.experiments.runfolder.atomic import write_atomic

    return write_atomic(Path(path), examples_jsonl(records, golds))
