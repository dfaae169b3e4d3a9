"""The free-form study: flows into every token of a generated (or given) answer, resumable
(``study``), its tables and ``run.json`` section (``run``), and its shards joined by
``mmlens merge`` (``merge``). Its report section is ``mmlens.experiments.report.answers``."""
