"""The run folder: what keeps a study's results whole, unmixed and resumable.

``store`` (one checked line per example, shards per rank and per ``--shard``), ``fingerprint``
(the store's signature: weights, processor, examples and code by content), ``lock`` (one run
per folder: flock, heartbeat, ``--break-lock``), ``atomic`` (files replaced in one rename),
``distributed`` (torchrun ranks sharing a store) and ``merge`` (job-array shards joined into
one folder). What the study writes into the folder (tables, ``examples.jsonl``, the report) is
in ``mmlens.experiments`` beside it.
"""
