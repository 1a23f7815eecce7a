"""The runs a report reads: each run folder's record (``metrics.json``, through
:func:`mlcil.results.read_metrics`) and settings (``config.yaml``), grouped by dataset and
protocol, then by label."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlcil.errors import ConfigError
from mlcil.record import RunMetrics, SessionResult
from mlcil.results import read_metrics
from mlcil.runs import read_settings


@dataclasses.dataclass(frozen=True)
class ReportedRun:
    """One run as the report reads it.

    Attributes:
        metrics: the run's record.
        folder: its run folder, as given.
        settings: its resolved settings (dotted keys), None when ``config.yaml`` is missing.
    """

    metrics: RunMetrics
    folder: Path
    settings: dict[str, Any] | None = None

    @property
    def sessions(self) -> list[SessionResult]:
        return self.metrics.sessions

    @property
    def label(self) -> str:
        """The run's label; a run not finished is its own label (its numbers stop earlier)."""
        metrics = self.metrics
        if metrics.finished:
            return metrics.display_label
        planned = metrics.planned_sessions or metrics.sessions_done
        return f"{metrics.display_label} (unfinished: {metrics.sessions_done} of {planned})"

    @property
    def status(self) -> str:
        metrics = self.metrics
        if metrics.finished:
            return "finished"
        return f"unfinished: {metrics.sessions_done} of {metrics.planned_sessions} sessions"


LabelRuns = dict[str, list[ReportedRun]]


def load_runs(run_dirs: Sequence[str | Path]) -> list[ReportedRun]:
    """Every run folder's record and settings, in the given order.

    Raises:
        ConfigError: naming the folder or file: no folder given, a folder that does not exist,
            one without ``metrics.json`` (not a run, or no session of it done yet), or a record
            rejected by :meth:`mlcil.record.RunMetrics.from_json`.
    """
    if not run_dirs:
        raise ConfigError("report: no run folder given")
    runs = []
    for run_dir in run_dirs:
        folder = Path(run_dir)
        if not folder.exists():
            raise ConfigError(f"report: run folder {run_dir} does not exist")
        if not folder.is_dir():
            raise ConfigError(f"report: {run_dir} is a file, not a run folder")
        metrics = read_metrics(folder)
        if metrics is None:
            raise ConfigError(
                f"report: {run_dir} holds no metrics.json: not an mlcil run folder, or no "
                "session of its run is done yet"
            )
        runs.append(ReportedRun(metrics, folder, read_settings(folder)))
    return runs


def protocol_key(metrics: RunMetrics) -> str:
    """The protocol, with the class order appended when a run set its own (``B0-C2@3-8-0-...``):
    runs over different class orders are different experiments."""
    order = metrics.class_order
    return metrics.protocol + ("@" + "-".join(order) if order else "")


def group_runs(runs: Sequence[ReportedRun]) -> dict[tuple[str, str], LabelRuns]:
    """``{(dataset, protocol): {label: [runs, one per seed]}}`` in first-seen order."""
    groups: dict[tuple[str, str], LabelRuns] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[(run.metrics.dataset, protocol_key(run.metrics))][run.label].append(run)
    return {key: dict(value) for key, value in groups.items()}
