"""Reports over runs, finished or not, and the printed summaries of the command line.

``write_report`` (``mlcil report``, ``mlcil compare``) groups runs by (dataset, protocol), then
by label (method or ablation), and reports mean +- standard deviation over seeds of avg mAP,
last mAP, CF1, OF1, forgetting and wall time, with one mAP-per-session curve per label, a
per-session breakdown (seen / base / new mAP) that shows *why* one method ends above another,
per-class views, transfer, and each run's settings with those that differ highlighted.

- :mod:`mlcil.report.loading`: the runs' records and settings, grouped.
- :mod:`mlcil.report.stats`: the numbers over seeds; :mod:`mlcil.report.tables`: the tables
  (markdown for ``report.md``; the ``mlcil train`` session table).
- :mod:`mlcil.report.figures`: the pictures; :mod:`mlcil.report.settings`: the settings view.
- :mod:`mlcil.report.html`: the page, from ``templates/report.html.j2``;
  :mod:`mlcil.report.write`: the files. :mod:`mlcil.report.dry_run`: ``--dry-run``'s summary.
"""

from __future__ import annotations

from mlcil.report.dry_run import dry_run_summary
from mlcil.report.loading import ReportedRun, group_runs, load_runs, protocol_key
from mlcil.report.tables import session_table
from mlcil.report.write import write_report

__all__ = [
    "ReportedRun",
    "dry_run_summary",
    "group_runs",
    "load_runs",
    "protocol_key",
    "session_table",
    "write_report",
]
