"""The numbers a report shows, over the seeds of one label: means and standard deviations,
curves, backward / forward transfer, per-class AP and forgetting."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mlcil.metrics import (
    backward_transfer,
    forgetting_per_class,
    forward_transfer,
    task_means,
    transfer_matrix,
)
from mlcil.record import RunMetrics
from mlcil.report.loading import LabelRuns, ReportedRun

MeanStd = tuple[float | None, float | None]

METRIC_COLUMNS: tuple[tuple[str, Callable[[RunMetrics], float | None]], ...] = (
    ("avg mAP", lambda m: m.avg_map),
    ("last mAP", lambda m: m.last_map),
    ("CF1", lambda m: m.final.cf1),
    ("OF1", lambda m: m.final.of1),
    ("forgetting", lambda m: m.forgetting),
    ("time (s)", lambda m: m.wall_time_s),
)

REFERENCE_METHOD = "joint"  # forward transfer is measured against joint training (FWT)


def mean_std(values: Sequence[float | None]) -> MeanStd:
    """Mean and sample standard deviation (0 for one value); None values are skipped."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None, None
    if len(present) == 1:
        return present[0], 0.0
    return statistics.fmean(present), statistics.stdev(present)


def comparison_rows(label_runs: LabelRuns) -> list[dict[str, Any]]:
    """Aggregated numbers per label: ``{label, seeds, <column>: (mean, std)}``."""
    rows = []
    for label, runs in label_runs.items():
        row: dict[str, Any] = {"label": label, "seeds": sorted(r.metrics.seed for r in runs)}
        for column, getter in METRIC_COLUMNS:
            row[column] = mean_std([getter(r.metrics) for r in runs])
        rows.append(row)
    return rows


def by_last_map(label_runs: LabelRuns) -> list[str]:
    """The labels, best mean last mAP first (the order of every table)."""
    return sorted(
        label_runs,
        key=lambda label: -statistics.fmean(r.metrics.last_map for r in label_runs[label]),
    )


def session_values(runs: Sequence[ReportedRun], position: int, key: str) -> list[float | None]:
    """Session field ``key`` at ``position`` of the runs that reached it."""
    return [getattr(r.sessions[position], key) for r in runs if position < len(r.sessions)]


def label_series(
    runs: Sequence[ReportedRun], key: str, first: int = 0
) -> tuple[list[int], list[float], list[float]]:
    """Classes seen, mean and std over ``runs`` of session field ``key`` from session ``first``
    on; seeds may differ in length (each point averages the runs that reached it, the longest
    run gives the x positions), and a point no run measured is left out."""
    longest = max(runs, key=lambda r: len(r.sessions))
    seen, means, stds = [], [], []
    for position, entry in enumerate(longest.sessions[first:], first):
        mean, std = mean_std(session_values(runs, position, key))
        if mean is not None:
            seen.append(entry.num_seen)
            means.append(mean)
            stds.append(std or 0.0)
    return seen, means, stds


def mean_curves(label_runs: LabelRuns) -> dict[str, list[tuple[int, float]]]:
    """Per label, (classes seen, mean seen mAP over seeds) after each session."""
    curves = {}
    for label, runs in label_runs.items():
        seen, means, _ = label_series(runs, "seen_map")
        curves[label] = list(zip(seen, means, strict=True))
    return curves


def _has_aps(metrics: RunMetrics) -> bool:
    return all(s.ap is not None and s.classes for s in metrics.sessions)


def task_matrix(metrics: RunMetrics) -> np.ndarray | None:
    """The run's task matrix (:func:`mlcil.metrics.transfer_matrix`), or None when its
    sessions do not record per-class APs."""
    if not _has_aps(metrics):
        return None
    aps = [{name: math.nan if ap is None else ap for name, ap in (s.ap or {}).items()}
           for s in metrics.sessions]  # fmt: skip
    return transfer_matrix(aps, [s.classes for s in metrics.sessions])


def reference_aps(label_runs: LabelRuns) -> dict[str, float] | None:
    """Per class, the AP of the group's joint-training runs at their end (mean over seeds), the
    reference of forward transfer; None without a joint run that records per-class APs."""
    tables = [
        run.sessions[-1].ap
        for runs in label_runs.values()
        for run in runs
        if run.metrics.method == REFERENCE_METHOD and run.sessions[-1].ap is not None
    ]
    present = [table for table in tables if table is not None]
    if not present:
        return None
    shared = set.intersection(*(set(table) for table in present))
    means = {name: mean_std([table[name] for table in present])[0] for name in shared}
    return {name: value for name, value in means.items() if value is not None}


def transfer_rows(label_runs: LabelRuns) -> list[dict[str, Any]]:
    """Per label, ``(mean, std)`` over seeds of BWT and of FWT against the group's joint runs
    (``(None, None)`` where not defined: one session, no per-class APs, no joint run)."""
    reference = reference_aps(label_runs)
    rows = []
    for label, runs in label_runs.items():
        backward: list[float | None] = []
        forward: list[float | None] = []
        for run in runs:
            matrix = task_matrix(run.metrics)
            if matrix is None:
                continue
            backward.append(backward_transfer(matrix))
            classes = [session.classes for session in run.sessions]
            if reference is not None and all(c in reference for cs in classes for c in cs):
                forward.append(forward_transfer(matrix, task_means(reference, classes)))
        rows.append({"label": label, "BWT": mean_std(backward), "FWT": mean_std(forward)})
    return rows


def class_ap_table(runs: Sequence[ReportedRun]) -> tuple[list[str], np.ndarray] | None:
    """Per class (in order of arrival) and session, the AP averaged over ``runs``; NaN before
    the class's session. None when the runs record no per-class APs."""
    if not all(_has_aps(run.metrics) for run in runs):
        return None
    longest = max(runs, key=lambda r: len(r.sessions))
    classes = list(longest.sessions[-1].ap or {})  # JSON keeps the order the classes came in
    row = {name: i for i, name in enumerate(classes)}
    total = np.zeros((len(classes), len(longest.sessions)))
    count = np.zeros_like(total)
    for run in runs:
        for t, session in enumerate(run.sessions):
            for name, ap in (session.ap or {}).items():
                if name in row and ap is not None:
                    total[row[name], t] += ap
                    count[row[name], t] += 1
    return classes, np.where(count > 0, total / np.maximum(count, 1), np.nan)


def class_forgetting(runs: Sequence[ReportedRun]) -> dict[str, float]:
    """Per class seen before a run's last session, its forgetting in AP points
    (:func:`mlcil.metrics.forgetting_per_class`) averaged over the ``runs`` that measured it,
    in order of arrival; empty without per-class APs or a second session."""
    values: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        sessions = run.sessions
        if len(sessions) < 2 or not _has_aps(run.metrics):
            continue
        history = [[ap / 100.0 for ap in (s.ap or {}).values() if ap is not None] for s in sessions]
        if [len(h) for h in history] != [len(s.ap or {}) for s in sessions]:
            continue  # a class without an AP (a hand-made file): not measured
        names = list(sessions[-2].ap or {})
        for name, value in zip(names, forgetting_per_class(history), strict=True):
            values[name].append(100.0 * float(value))
    return {name: statistics.fmean(found) for name, found in values.items()}
