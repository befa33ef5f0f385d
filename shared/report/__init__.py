"""Readable results: the run report (``report.html`` + ``model-card.json``) and ``medfed evaluate``'s page.

Framework-free (no Flower); matplotlib draws the figures (Agg, no display).
:func:`write_run_report` is what ``medfed report`` and the end of every run
call; :mod:`shared.report.evaluate_page` builds the page a hospital files
when it validates a model on its own images.
"""

from __future__ import annotations

from shared.report.run_report import SECTION_IDS, build_run_report, write_run_report

__all__ = ["SECTION_IDS", "build_run_report", "write_run_report"]
