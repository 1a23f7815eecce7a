"""The report's tables as data (:class:`Table`), rendered as markdown for ``report.md`` and by
the HTML template; and the plain-text session table ``mlcil train`` prints."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from mlcil.record import RunMetrics, SessionDiagnostics
from mlcil.report.loading import LabelRuns, ReportedRun, group_runs
from mlcil.report.stats import (
    METRIC_COLUMNS,
    MeanStd,
    by_last_map,
    comparison_rows,
    mean_std,
    session_values,
    transfer_rows,
)


@dataclasses.dataclass(frozen=True)
class Table:
    """A titled table of text cells; the first column names the row."""

    title: str
    columns: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def markdown(tables: Sequence[Table]) -> str:
    """Tables as markdown sections ("" for none)."""
    return "\n\n".join(table.markdown() for table in tables) + "\n" if tables else ""


def cell(value: MeanStd, seeds: int) -> str:
    """``mean ± std`` with one decimal (the std only over several seeds), "-" for none."""
    mean, std = value
    if mean is None:
        return "-"
    if seeds > 1 and std is not None:
        return f"{mean:.1f} ± {std:.1f}"
    return f"{mean:.1f}"


def _mean_cell(values: Sequence[float | None]) -> str:
    mean, _ = mean_std(values)
    return "-" if mean is None else f"{mean:.1f}"


def comparison_table(title: str, label_runs: LabelRuns) -> Table:
    """Avg and last mAP, CF1, OF1, forgetting and time per label, best last mAP first."""

    def last(row: dict) -> float:
        mean = row["last mAP"][0]
        return -(mean if mean is not None else -1)

    rows = []
    for row in sorted(comparison_rows(label_runs), key=last):
        seeds = len(row["seeds"])
        numbers = [cell(row[column], seeds) for column, _ in METRIC_COLUMNS]
        rows.append([row["label"], str(seeds), *numbers])
    columns = ["method", "seeds", *(column for column, _ in METRIC_COLUMNS)]
    return Table(title, columns, rows)


def transfer_table(title: str, label_runs: LabelRuns) -> Table | None:
    """BWT and FWT (vs joint) per label, in mAP points; None when no run has them."""
    rows = transfer_rows(label_runs)
    if all(row["BWT"][0] is None for row in rows):
        return None
    cells = []
    for row in rows:
        seeds = len(label_runs[row["label"]])
        cells.append([row["label"], *(cell(row[key], seeds) for key in ("BWT", "FWT"))])
    title = f"{title}: backward / forward transfer (mAP points)"
    return Table(title, ["method", "BWT", "FWT (vs joint)"], cells)


def _num_sessions(label_runs: LabelRuns) -> int:
    return max(len(run.sessions) for runs in label_runs.values() for run in runs)


SESSION_KEYS = ("seen_map", "base_map", "new_map")
SESSION_TITLE = "seen / base / new mAP after each session"
SUBSET_KEYS = ("seen_map", "base_map_subset", "new_map_subset")
SUBSET_TITLE = "seen / base / new mAP, base and new each on its own test subset (the release's)"


def breakdown_table(
    title: str, label_runs: LabelRuns, keys: Sequence[str] = SESSION_KEYS, what: str = ""
) -> Table:
    """Seen / base / new mAP (``keys``) after every session, means over seeds; the first
    session shows one value (its three coincide). Rows by best last mAP."""
    count = _num_sessions(label_runs)
    rows = []
    for label in by_last_map(label_runs):
        runs = label_runs[label]
        cells = [label]
        for index in range(count):
            if not any(index < len(run.sessions) for run in runs):
                cells.append("")
            elif index == 0:
                cells.append(_mean_cell(session_values(runs, 0, "seen_map")))
            else:
                means = [_mean_cell(session_values(runs, index, key)) for key in keys]
                cells.append(" / ".join(means))
        rows.append(cells)
    columns = ["method", *(f"session {i}" for i in range(count))]
    return Table(f"{title}: {what or SESSION_TITLE}", columns, rows)


Getter = Callable[[SessionDiagnostics], tuple[float | None, ...] | None]

DIAGNOSTICS: tuple[tuple[str, Getter], ...] = (
    (
        "old-class labels restored: precision / recall (%)",
        lambda d: None if d.restore is None else (d.restore.precision, d.restore.recall),
    ),
    (
        "drift of the old sessions' embeddings on the probe images (mean cosine distance)",
        lambda d: None if d.embedding_drift is None else (d.embedding_drift.mean_cosine_distance,),
    ),
    (
        "change of the old classes' scores on the probe images (mean |delta sigmoid|)",
        lambda d: None if d.logit_drift is None else (d.logit_drift.mean_abs_score_change,),
    ),
)


def _diagnostic_cell(runs: Sequence[ReportedRun], index: int, getter: Getter) -> str:
    """Means over seeds of one diagnostic's values ("-" when no run measured it); percentages
    with one decimal, distances with three."""
    found = [run.sessions[index].diagnostics for run in runs if index < len(run.sessions)]
    measured = [t for t in (getter(d) for d in found if d is not None) if t is not None]
    if not measured:
        return "-"
    width = ".1f" if len(measured[0]) > 1 else ".3f"
    cells = []
    for position in range(len(measured[0])):
        mean, _ = mean_std([values[position] for values in measured])
        cells.append("-" if mean is None else format(mean, width))
    return " / ".join(cells)


def diagnostics_tables(title: str, label_runs: LabelRuns) -> list[Table]:
    """Per diagnostic, its value after each session from the second on (where old knowledge
    exists), means over seeds; labels that measured nothing are left out."""
    count = _num_sessions(label_runs)
    tables = []
    for name, getter in DIAGNOSTICS if count > 1 else ():
        rows = []
        for label, runs in label_runs.items():
            cells = [_diagnostic_cell(runs, index, getter) for index in range(1, count)]
            if any(value != "-" for value in cells):
                rows.append([label, *cells])
        if rows:
            columns = ["method", *(f"session {i}" for i in range(1, count))]
            tables.append(Table(f"{title}: {name}", columns, rows))
    return tables


def _each_group(runs: Sequence[ReportedRun]) -> list[tuple[str, LabelRuns]]:
    return [
        (f"{dataset} {protocol}", group) for (dataset, protocol), group in group_runs(runs).items()
    ]


def comparison_markdown(runs: Sequence[ReportedRun]) -> str:
    """The comparison tables, one per (dataset, protocol)."""
    return markdown([comparison_table(title, group) for title, group in _each_group(runs)])


def session_breakdown_markdown(
    runs: Sequence[ReportedRun], keys: Sequence[str] = SESSION_KEYS, what: str = SESSION_TITLE
) -> str:
    """The seen / base / new tables, one per (dataset, protocol)."""
    return markdown([breakdown_table(t, group, keys, what) for t, group in _each_group(runs)])


def transfer_markdown(runs: Sequence[ReportedRun]) -> str:
    tables = [transfer_table(title, group) for title, group in _each_group(runs)]
    return markdown([table for table in tables if table is not None])


def diagnostics_markdown(runs: Sequence[ReportedRun]) -> str:
    return markdown(
        [t for title, group in _each_group(runs) for t in diagnostics_tables(title, group)]
    )


def session_table(metrics: RunMetrics) -> str:
    """A plain-text table of one run's sessions (printed at the end of ``mlcil train``)."""

    def number(value: float | None) -> str:
        return "    -" if value is None else f"{value:5.1f}"

    lines = [
        f"{metrics.display_label} on {metrics.dataset} {metrics.protocol} (seed {metrics.seed})",
        "session  classes                 seen   base    new",
    ]
    for entry in metrics.sessions:
        classes = ",".join(entry.classes)
        if len(classes) > 22:
            classes = classes[:19] + "..."
        lines.append(
            f"{entry.index:>7}  {classes:<22} {number(entry.seen_map)}  "
            f"{number(entry.base_map)}  {number(entry.new_map)}"
        )
    final, forgetting = metrics.final, metrics.forgetting
    lines.append(
        f"avg mAP {metrics.avg_map:.2f} | last mAP {metrics.last_map:.2f} | "
        f"CF1 {final.cf1:.2f} | OF1 {final.of1:.2f} @ {final.threshold} | forgetting "
        + ("-" if forgetting is None else f"{forgetting:.2f}")
        + f" | {metrics.wall_time_s:.0f} s"
    )
    return "\n".join(lines)


def summary_json(runs: Sequence[ReportedRun]) -> dict[str, list[dict]]:
    """``report.json``: per group, the comparison rows (``[mean, std]`` per column)."""
    return {
        title: [
            {k: list(v) if isinstance(v, tuple) else v for k, v in row.items()}
            for row in comparison_rows(group)
        ]
        for title, group in _each_group(runs)
    }
