"""The run folder's report: ``report.html`` (``page.build_report``), the example views with
their flows' curves and word maps (``views``, ``word_picker``), captions computed from the
tables (``captions``) and the free-form study's section (``answers``).

    from mmlens.experiments.report import build_report
    build_report("runs/flow")
"""

from mmlens.experiments.report.page import build_report

__all__ = ["build_report"]
