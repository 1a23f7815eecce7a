"""The HTML report: one self-contained page made from ``templates/report.html.j2`` (jinja2,
every value escaped), pictures embedded as PNG."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from mlcil.plots import DPI, PAGE_WIDTH_IN, method_styles
from mlcil.report.figures import Picture, group_pictures
from mlcil.report.loading import LabelRuns, ReportedRun, group_runs
from mlcil.report.naming import slug
from mlcil.report.settings import relative_path, settings_view
from mlcil.report.tables import (
    SUBSET_KEYS,
    SUBSET_TITLE,
    Table,
    breakdown_table,
    comparison_table,
    diagnostics_tables,
    transfer_table,
)

TEMPLATE = "templates/report.html.j2"

TRANSFER_NOTE = (
    "BWT: the mean over earlier sessions of (mAP of the session's classes after the last "
    "session) minus (their mAP right after their own session); negative means forgetting. "
    "FWT: the mean over sessions after the first of (mAP of the new classes right after their "
    "session) minus (the joint-training runs' mAP over the same classes, every class learned at "
    "once); it needs a joint run among the reported ones. Each session weighs the same; "
    "definitions in mlcil.metrics.transfer."
)

# metrics.json's key -> the column's name.
RUN_FIELDS = {"device": "device", "device_name": "device name", "threads": "threads",
              "deterministic": "deterministic", "torch_version": "torch",
              "timm_version": "timm", "mlcil_version": "mlcil"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GroupView:
    """One (dataset, protocol) group as the page shows it."""

    title: str
    anchor: str
    comparison: Table
    pictures: list[Picture]
    transfer: Table | None
    tables: list[Table]


def group_view(title: str, label_runs: LabelRuns) -> GroupView:
    """The group's tables and pictures, every label in its own style."""
    styles = method_styles(list(label_runs))
    tables = [
        breakdown_table(title, label_runs),
        breakdown_table(title, label_runs, SUBSET_KEYS, SUBSET_TITLE),
        *diagnostics_tables(title, label_runs),
    ]
    return GroupView(
        title,
        "group-" + slug(title),
        comparison_table(title, label_runs),
        group_pictures(title, label_runs, styles),
        transfer_table(title, label_runs),
        tables,
    )


def runs_table(runs: Sequence[ReportedRun], report_dir: Path) -> Table:
    """The reported runs (folders relative to the report) and what their numbers may depend
    on (what a run made before a field was recorded shows as "-")."""
    rows = []
    for run in runs:
        metrics = run.metrics.plain()
        values = ["-" if metrics.get(key) is None else str(metrics[key]) for key in RUN_FIELDS]
        folder = relative_path(run.folder, report_dir)
        rows.append([folder, run.metrics.display_label, str(run.metrics.seed), run.status, *values])
    return Table("Runs", ["run", "label", "seed", "status", *RUN_FIELDS.values()], rows)


def html_report(runs: Sequence[ReportedRun], report_dir: Path) -> str:
    """The comparison report as one self-contained HTML page; paths are relative to
    ``report_dir``, where the page is written."""
    import jinja2

    text = resources.files("mlcil.report").joinpath(TEMPLATE).read_text(encoding="utf-8")
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    groups = [
        group_view(f"{dataset} {protocol}", label_runs)
        for (dataset, protocol), label_runs in group_runs(runs).items()
    ]
    return environment.from_string(text).render(
        runs=runs,
        groups=groups,
        unfinished=sum(not run.metrics.finished for run in runs),
        transfer_note=TRANSFER_NOTE,
        settings=settings_view(runs, report_dir),
        runs_table=runs_table(runs, report_dir),
        page_width=round(PAGE_WIDTH_IN * DPI),
    )
