"""Tables and plots over finished runs: one run's session table, and the comparison report.

``write_report`` groups runs by (dataset, protocol), then by label (method or ablation), and
reports mean +- standard deviation over seeds of avg mAP, last mAP, CF1, OF1, forgetting and wall
time, with one mAP-per-session curve per label and a per-session breakdown (seen / base / new mAP)
that shows *why* one method ends above another: old classes kept or new classes learned.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlcil.errors import ConfigError
from mlcil.fileio import write_text_atomic
from mlcil.metrics import (
    backward_transfer,
    forgetting_per_class,
    forward_transfer,
    task_means,
    transfer_matrix,
)
from mlcil.results import plot_sessions, pyplot, set_percent_range
from mlcil.rundir import RunDir

METRIC_COLUMNS = (
    ("avg mAP", lambda m: m["avg_map"]),
    ("last mAP", lambda m: m["last_map"]),
    ("CF1", lambda m: m["final"]["cf1"]),
    ("OF1", lambda m: m["final"]["of1"]),
    ("forgetting", lambda m: m["forgetting"]),
    ("time (s)", lambda m: m["wall_time_s"]),
)


def session_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of one run's sessions (printed at the end of ``mlcil train``)."""

    def cell(value: float | None) -> str:
        return "    -" if value is None else f"{value:5.1f}"

    lines = [
        f"{metrics.get('label', metrics['method'])} on {metrics['dataset']} "
        f"{metrics['protocol']} (seed {metrics['seed']})",
        "session  classes                 seen   base    new",
    ]
    for entry in metrics["sessions"]:
        classes = ",".join(entry["classes"])
        if len(classes) > 22:
            classes = classes[:19] + "..."
        lines.append(
            f"{entry['index']:>7}  {classes:<22} {cell(entry['seen_map'])}  "
            f"{cell(entry['base_map'])}  {cell(entry['new_map'])}"
        )
    final = metrics["final"]
    forgetting = metrics["forgetting"]
    lines.append(
        f"avg mAP {metrics['avg_map']:.2f} | last mAP {metrics['last_map']:.2f} | "
        f"CF1 {final['cf1']:.2f} | OF1 {final['of1']:.2f} @ {final['threshold']} | forgetting "
        + ("-" if forgetting is None else f"{forgetting:.2f}")
        + f" | {metrics['wall_time_s']:.0f} s"
    )
    return "\n".join(lines)


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but true/false in metrics.json is a corrupted value, not a number.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_fields(
    entry: dict[str, Any], fields: Sequence[tuple[str, str]], prefix: str, path: str | Path
) -> None:
    """Check ``entry[key]`` for each ``(key, kind)``; kinds: text, text?, int, number, number?.

    A kind ending in ``?`` may be null or absent; the others must be present.
    """
    expected = {"text": "a string", "int": "an integer", "number": "a finite number"}
    for key, kind in fields:
        optional = kind.endswith("?")
        base = kind.rstrip("?")
        if key not in entry:
            if optional:
                continue
            raise ConfigError(f"{path}: key '{prefix}{key}' is missing")
        value = entry[key]
        if value is None and optional:
            continue
        if base == "text":
            good = isinstance(value, str)
        elif base == "int":
            good = isinstance(value, int) and not isinstance(value, bool)
        else:
            good = _is_number(value)
        if not good:
            nullable = " or null" if optional else ""
            raise ConfigError(
                f"{path}: key '{prefix}{key}' must be {expected[base]}{nullable}, got "
                f"{value!r} ({type(value).__name__})"
            )


_RUN_FIELDS = (
    ("method", "text"),
    ("label", "text?"),
    ("dataset", "text"),
    ("protocol", "text"),
    ("seed", "int"),
    ("avg_map", "number"),
    ("last_map", "number"),
    ("forgetting", "number?"),
    ("wall_time_s", "number"),
)
_FINAL_FIELDS = (("cf1", "number"), ("of1", "number"), ("threshold", "number?"))
_SESSION_FIELDS = (
    ("num_seen", "int"),
    ("seen_map", "number"),
    ("base_map", "number?"),
    ("new_map", "number?"),
)


def validate_metrics(metrics: Any, path: str | Path) -> dict[str, Any]:
    """Check that a parsed ``metrics.json`` holds what the report and ``session_table`` read.

    Args:
        metrics: the parsed JSON.
        path: the file it came from, for the error messages.

    Returns:
        ``metrics`` itself, now known to be a dict with the expected keys and value types.

    Raises:
        ConfigError: naming ``path`` and the key at fault (``sessions[1].seen_map``): not a JSON
            object, a missing key, or a value of the wrong type (a number given as a string,
            NaN, a boolean).
    """
    if not isinstance(metrics, dict):
        raise ConfigError(
            f"{path}: expected a JSON object of run metrics, got a JSON "
            f"{_json_type(metrics)}; is this a metrics.json written by mlcil?"
        )
    _check_fields(metrics, _RUN_FIELDS, "", path)
    for key in ("final", "sessions"):
        if key not in metrics:
            raise ConfigError(f"{path}: key '{key}' is missing")
    final = metrics["final"]
    if not isinstance(final, dict):
        raise ConfigError(f"{path}: key 'final' must be an object with cf1 and of1, got {final!r}")
    _check_fields(final, _FINAL_FIELDS, "final.", path)
    sessions = metrics["sessions"]
    if not isinstance(sessions, list) or not sessions:
        raise ConfigError(
            f"{path}: key 'sessions' must be a non-empty list of per-session results, got "
            f"{sessions!r}"
        )
    for position, entry in enumerate(sessions):
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{path}: key 'sessions[{position}]' must be an object, got {entry!r}"
            )
        _check_fields(entry, _SESSION_FIELDS, f"sessions[{position}].", path)
    return metrics


def _json_type(value: Any) -> str:
    names = {list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def load_runs(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """``metrics.json`` of every run folder (with its folder under ``run_dir``).

    Args:
        run_dirs: finished run folders.

    Returns:
        One validated metrics dict per folder, in the given order.

    Raises:
        ConfigError: naming the folder or file: no folder given, no ``metrics.json``, a file
            that cannot be read or parsed, or content rejected by ``validate_metrics``.
    """
    if not run_dirs:
        raise ConfigError("report: no run folder given")
    runs = []
    for run_dir in run_dirs:
        path = RunDir(run_dir).metrics_file
        if not path.is_file():
            raise ConfigError(f"{run_dir}: no metrics.json (is the run finished?)")
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: invalid JSON: {error}") from error
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: cannot read: {error}") from error
        validate_metrics(metrics, path)
        metrics["run_dir"] = str(run_dir)
        runs.append(metrics)
    return runs


def group_runs(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """``{(dataset, protocol): {label: [runs, one per seed]}}`` in first-seen order."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for metrics in runs:
        label = metrics.get("label") or metrics["method"]
        groups[(metrics["dataset"], protocol_key(metrics))][label].append(metrics)
    return {key: dict(value) for key, value in groups.items()}


def protocol_key(metrics: dict[str, Any]) -> str:
    """The protocol, with the class order appended when a run set its own (``B0-C2@3-8-0-...``):
    runs over different class orders are different experiments."""
    order = metrics.get("class_order")
    return metrics["protocol"] + ("@" + "-".join(order) if order else "")


DIAGNOSTIC_TABLES = (
    (
        "old-class labels restored: precision / recall (%)",
        lambda d: _pair(d.get("restore"), "precision", "recall"),
    ),
    (
        "drift of the old sessions' embeddings on the probe images (mean cosine distance)",
        lambda d: _single(d.get("embedding_drift"), "mean_cosine_distance"),
    ),
    (
        "change of the old classes' scores on the probe images (mean |delta sigmoid|)",
        lambda d: _single(d.get("logit_drift"), "mean_abs_score_change"),
    ),
)


def _pair(values: dict | None, first: str, second: str) -> tuple[float | None, ...] | None:
    return None if not values else (values.get(first), values.get(second))


def _single(values: dict | None, key: str) -> tuple[float | None, ...] | None:
    return None if not values else (values.get(key),)


def _diagnostic_cell(entries: Sequence[dict[str, Any]], getter: Any) -> str:
    """Means over seeds of one diagnostic's values ("-" when no run measured it); percentages
    with one decimal, distances with three."""
    measured = [t for t in (getter(e.get("diagnostics") or {}) for e in entries) if t is not None]
    if not measured:
        return "-"
    cells = []
    for position in range(len(measured[0])):
        mean, _ = mean_std([values[position] for values in measured])
        width = ".1f" if len(measured[0]) > 1 else ".3f"
        cells.append("-" if mean is None else format(mean, width))
    return " / ".join(cells)


def diagnostics_markdown(runs: Sequence[dict[str, Any]]) -> str:
    """Per (dataset, protocol) and diagnostic, a table of its value after each session (means
    over seeds; sessions after the first, where old knowledge exists)."""
    sections = []
    for (dataset, protocol), label_runs in group_runs(runs).items():
        num_sessions = max(len(r["sessions"]) for group in label_runs.values() for r in group)
        if num_sessions < 2:
            continue
        header = "| method | " + " | ".join(f"session {i}" for i in range(1, num_sessions)) + " |"
        for title, getter in DIAGNOSTIC_TABLES:
            lines = [f"### {dataset} {protocol}: {title}", "", header]
            lines.append("|---|" + "---|" * (num_sessions - 1))
            for label, group in label_runs.items():
                per_session = [
                    [r["sessions"][i] for r in group if i < len(r["sessions"])]
                    for i in range(1, num_sessions)
                ]
                cells = [_diagnostic_cell(entries, getter) for entries in per_session]
                if any(cell != "-" for cell in cells):
                    lines.append(f"| {label} | " + " | ".join(cells) + " |")
            if len(lines) > 4:
                sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n" if sections else ""


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value); None values are skipped."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None, None
    if len(present) == 1:
        return present[0], 0.0
    return statistics.fmean(present), statistics.stdev(present)


def _format(mean: float | None, std: float | None, seeds: int) -> str:
    if mean is None:
        return "-"
    if seeds > 1 and std is not None:
        return f"{mean:.1f} ± {std:.1f}"
    return f"{mean:.1f}"


def comparison_rows(label_runs: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Aggregated numbers per label: ``{label, seeds, <column>: (mean, std)}``."""
    rows = []
    for label, runs in label_runs.items():
        row: dict[str, Any] = {"label": label, "seeds": sorted(r["seed"] for r in runs)}
        for column, getter in METRIC_COLUMNS:
            row[column] = mean_std([getter(r) for r in runs])
        rows.append(row)
    return rows


def comparison_markdown(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown tables, one per (dataset, protocol), rows sorted by last mAP."""
    sections = []
    for (dataset, protocol), label_runs in group_runs(runs).items():
        rows = sorted(
            comparison_rows(label_runs),
            key=lambda row: -(row["last mAP"][0] if row["last mAP"][0] is not None else -1),
        )
        header = "| method | seeds | " + " | ".join(c for c, _ in METRIC_COLUMNS) + " |"
        rule = "|---|---|" + "---|" * len(METRIC_COLUMNS)
        lines = [f"### {dataset} {protocol}", "", header, rule]
        for row in rows:
            seeds = len(row["seeds"])
            cells = [_format(row[c][0], row[c][1], seeds) for c, _ in METRIC_COLUMNS]
            lines.append(f"| {row['label']} | {seeds} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def _mean_of(values: Sequence[float | None]) -> str:
    mean, _ = mean_std(values)
    return "-" if mean is None else f"{mean:.1f}"


SUBSET_KEYS = ("seen_map", "base_map_subset", "new_map_subset")
SUBSET_TITLE = "seen / base / new mAP, base and new each on its own test subset (the release's)"


def session_breakdown_markdown(
    runs: Sequence[dict[str, Any]],
    keys: Sequence[str] = ("seen_map", "base_map", "new_map"),
    title: str = "seen / base / new mAP after each session",
) -> str:
    """Per (dataset, protocol), a table of seen / base / new mAP after every session.

    Cells are means over seeds. Base is the first session's classes, new the session's own; the
    first session's three values coincide, so it shows one. Rows follow ``comparison_markdown``.
    ``keys`` picks the three session fields (``SUBSET_KEYS``: the release's base/new definition;
    a run without them shows "-").
    """
    sections = []
    for (dataset, protocol), label_runs in group_runs(runs).items():
        num_sessions = max(len(r["sessions"]) for group in label_runs.values() for r in group)
        header = "| method | " + " | ".join(f"session {i}" for i in range(num_sessions)) + " |"
        lines = [
            f"### {dataset} {protocol}: {title}",
            "",
            header,
            "|---|" + "---|" * num_sessions,
        ]
        order = sorted(
            label_runs,
            key=lambda label: -statistics.fmean(r["last_map"] for r in label_runs[label]),
        )
        for label in order:
            cells = []
            for index in range(num_sessions):
                runs_here = [r for r in label_runs[label] if index < len(r["sessions"])]
                entries = [r["sessions"][index] for r in runs_here]
                if not entries:
                    cells.append("")
                elif index == 0:
                    cells.append(_mean_of([e["seen_map"] for e in entries]))
                else:
                    cells.append(
                        " / ".join(_mean_of([e.get(key) for e in entries]) for key in keys)
                    )
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def mean_curves(label_runs: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Per label, a metrics-like dict whose sessions hold the mean seen mAP over seeds."""
    curves = {}
    for label, runs in label_runs.items():
        # Seeds may differ in length (a run extended by an added session); each point averages
        # the runs that reached it, and the longest run gives the x positions.
        reference = max(runs, key=lambda r: len(r["sessions"]))
        sessions = []
        for position, entry in enumerate(reference["sessions"]):
            values = [
                r["sessions"][position]["seen_map"] for r in runs if position < len(r["sessions"])
            ]
            sessions.append({"num_seen": entry["num_seen"], "seen_map": statistics.fmean(values)})
        curves[label] = {**reference, "sessions": sessions}
    return curves


# --- transfer, per-class views and the HTML page ------------------------------------------

REFERENCE_METHOD = "joint"  # forward transfer is measured against joint training (FWT below)


def task_matrix(metrics: dict[str, Any]) -> np.ndarray | None:
    """The run's task matrix (:func:`mlcil.metrics.transfer_matrix`), or None when its
    sessions do not record per-class APs."""
    sessions = metrics["sessions"]
    if not all(isinstance(s.get("ap"), dict) and s.get("classes") for s in sessions):
        return None
    return transfer_matrix([s["ap"] for s in sessions], [s["classes"] for s in sessions])


def reference_aps(label_runs: dict[str, list[dict]]) -> dict[str, float] | None:
    """Per class, the AP of the group's joint-training runs at their end (mean over seeds), the
    reference of forward transfer; None without a joint run that records per-class APs."""
    tables = [
        run["sessions"][-1]["ap"]
        for runs in label_runs.values()
        for run in runs
        if run["method"] == REFERENCE_METHOD and isinstance(run["sessions"][-1].get("ap"), dict)
    ]
    if not tables:
        return None
    shared = set.intersection(*(set(table) for table in tables))
    return {name: statistics.fmean(table[name] for table in tables) for name in shared}


def transfer_rows(label_runs: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Per label, ``(mean, std)`` over seeds of BWT and of FWT against the group's joint runs
    (``(None, None)`` where not defined: one session, no per-class APs, no joint run)."""
    reference = reference_aps(label_runs)
    rows = []
    for label, runs in label_runs.items():
        backward: list[float | None] = []
        forward: list[float | None] = []
        for run in runs:
            matrix = task_matrix(run)
            if matrix is None:
                continue
            backward.append(backward_transfer(matrix))
            classes = [session["classes"] for session in run["sessions"]]
            if reference is not None and all(c in reference for cs in classes for c in cs):
                forward.append(forward_transfer(matrix, task_means(reference, classes)))
        rows.append({"label": label, "BWT": mean_std(backward), "FWT": mean_std(forward)})
    return rows


def transfer_markdown(runs: Sequence[dict[str, Any]]) -> str:
    """Per (dataset, protocol), backward and forward transfer per label, in mAP points
    (definitions: :mod:`mlcil.metrics.transfer`)."""
    sections = []
    for (dataset, protocol), label_runs in group_runs(runs).items():
        rows = transfer_rows(label_runs)
        if all(row["BWT"][0] is None for row in rows):
            continue
        lines = [
            f"### {dataset} {protocol}: backward / forward transfer (mAP points)",
            "",
            "| method | BWT | FWT (vs joint) |",
            "|---|---|---|",
        ]
        for row in rows:
            seeds = len(label_runs[row["label"]])
            cells = [_format(row[key][0], row[key][1], seeds) for key in ("BWT", "FWT")]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n" if sections else ""


def class_ap_table(runs: Sequence[dict[str, Any]]) -> tuple[list[str], np.ndarray] | None:
    """Per class (in order of arrival) and session, the AP averaged over ``runs``; NaN before
    the class's session. None when the runs record no per-class APs."""
    if any(not isinstance(s.get("ap"), dict) for r in runs for s in r["sessions"]):
        return None
    longest = max(runs, key=lambda r: len(r["sessions"]))
    classes = list(longest["sessions"][-1]["ap"])  # JSON keeps the order the classes came in
    row = {name: i for i, name in enumerate(classes)}
    total = np.zeros((len(classes), len(longest["sessions"])))
    count = np.zeros_like(total)
    for run in runs:
        for t, session in enumerate(run["sessions"]):
            for name, ap in session["ap"].items():
                if name in row and ap is not None:
                    total[row[name], t] += ap
                    count[row[name], t] += 1
    return classes, np.where(count > 0, total / np.maximum(count, 1), np.nan)


def class_forgetting(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per class seen before a run's last session, its forgetting in AP points
    (:func:`mlcil.metrics.forgetting_per_class`) averaged over the ``runs`` that measured it,
    in order of arrival; empty without per-class APs or a second session."""
    values: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        sessions = run["sessions"]
        if len(sessions) < 2 or any(not isinstance(s.get("ap"), dict) for s in sessions):
            continue
        history = [[ap / 100.0 for ap in s["ap"].values()] for s in sessions]
        for name, value in zip(sessions[-2]["ap"], forgetting_per_class(history), strict=True):
            values[name].append(100.0 * float(value))
    return {name: statistics.fmean(found) for name, found in values.items()}


def _label_series(
    runs: Sequence[dict[str, Any]], key: str, first: int = 0
) -> tuple[list, list, list]:
    """Classes seen, mean and std over ``runs`` of session field ``key`` from session
    ``first`` on (None skipped)."""
    longest = max(runs, key=lambda r: len(r["sessions"]))
    seen, means, stds = [], [], []
    for position, entry in enumerate(longest["sessions"][first:], first):
        found = [r["sessions"][position].get(key) for r in runs if position < len(r["sessions"])]
        mean, std = mean_std(found)
        if mean is not None:
            seen.append(entry["num_seen"])
            means.append(mean)
            stds.append(std or 0.0)
    return seen, means, stds


def curves_figure(label_runs: dict[str, list[dict]], title: str) -> Any:
    """Seen mAP after each session, one curve per label (mean over seeds, a band of +- one
    standard deviation when there are several)."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.0, 4.4), dpi=110, layout="constrained")
    values: list[float] = []
    for index, (label, runs) in enumerate(label_runs.items()):
        seen, means, stds = _label_series(runs, "seen_map")
        color = f"C{index % 10}"
        seeds = f"{len(runs)} seed" + ("" if len(runs) == 1 else "s")
        axis.plot(seen, means, marker="o", color=color, label=f"{label} ({seeds})")
        if len(runs) > 1:
            low = [m - s for m, s in zip(means, stds, strict=True)]
            high = [m + s for m, s in zip(means, stds, strict=True)]
            axis.fill_between(seen, low, high, color=color, alpha=0.15, linewidth=0)
            values += low + high
        values += means
    _session_axes(axis, values, label_runs, "seen mAP (%)")
    axis.set_title(title)
    figure.legend(loc="outside lower center", ncol=min(len(label_runs), 3), fontsize=8)
    return figure


def _session_axes(axis: Any, values: list[float], label_runs: dict, ylabel: str) -> None:
    set_percent_range(axis, values)
    seen = {s["num_seen"] for runs in label_runs.values() for r in runs for s in r["sessions"]}
    axis.set_xticks(sorted(seen))
    axis.set_xlabel("classes seen")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)


def base_new_figure(label_runs: dict[str, list[dict]], title: str) -> Any | None:
    """Two panels: the base classes' mAP after each session, and each later session's new
    classes' mAP (means over seeds). Single-session runs (joint training) have neither and are
    left out. None when no run measured a later session's classes."""
    colors = {label: f"C{index % 10}" for index, label in enumerate(label_runs)}  # as elsewhere
    incremental = {
        label: runs
        for label, runs in label_runs.items()
        if any(len(run["sessions"]) > 1 for run in runs)
    }
    panels = (("base_map", 0, "base"), ("new_map", 1, "new"))
    series = {
        key: {label: _label_series(runs, key, first) for label, runs in incremental.items()}
        for key, first, _ in panels
    }
    if not any(means for _, means, _ in series["new_map"].values()):
        return None
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10.0, 4.2), dpi=110, layout="constrained")
    for axis, (key, _, name) in zip(axes, panels, strict=True):
        values: list[float] = []
        for label, (seen, means, _) in series[key].items():
            axis.plot(seen, means, marker="o", color=colors[label], label=label, clip_on=False)
            values += means
        _session_axes(axis, values or [0.0, 100.0], incremental, f"{name} classes' mAP (%)")
        axis.set_title(f"{name} classes")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4))
    figure.suptitle(title)
    return figure


def heatmap_figure(classes: list[str], table: np.ndarray, title: str, scale: tuple) -> Any:
    """Per-class AP (rows, in order of arrival) after each session (columns); grey before a
    class's session; values written in the cells when they fit."""
    plt = pyplot()
    height = min(2.0 + 0.22 * len(classes), 24.0)
    width = min(3.0 + 0.9 * table.shape[1], 14.0)
    figure, axis = plt.subplots(figsize=(width, height), dpi=100, layout="constrained")
    colors = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # grey: not seen yet
    image = axis.imshow(
        np.ma.masked_invalid(table), aspect="auto", cmap=colors, vmin=scale[0], vmax=scale[1]
    )
    axis.set_xticks(range(table.shape[1]), [str(t) for t in range(table.shape[1])])
    axis.set_yticks(range(len(classes)), classes, fontsize=8 if len(classes) <= 40 else 6)
    axis.set_xlabel("after session")
    axis.set_ylabel("class (in order of arrival)")
    if table.size <= 200:
        middle = (scale[0] + scale[1]) / 2
        for (row, column), value in np.ndenumerate(table):
            if not np.isnan(value):
                shade = "black" if value > middle else "white"
                text = f"{value:.0f}"
                axis.text(column, row, text, ha="center", va="center", color=shade, fontsize=7)
    figure.colorbar(image, ax=axis, label="AP (%)")
    axis.set_title(title)
    return figure


def forgetting_figure(per_label: dict[str, dict[str, float]], title: str) -> Any | None:
    """Forgetting per class (AP points: best before the last session minus the last), one bar
    per label; None when no label measured any."""
    per_label = {label: values for label, values in per_label.items() if values}
    if not per_label:
        return None
    classes = list(dict.fromkeys(name for values in per_label.values() for name in values))
    plt = pyplot()
    width = min(max(6.4, 0.18 * len(classes) * len(per_label) + 2.0), 24.0)
    figure, axis = plt.subplots(figsize=(width, 4.2), dpi=100, layout="constrained")
    bar = 0.8 / len(per_label)
    for index, (label, values) in enumerate(per_label.items()):
        heights = [values.get(name, np.nan) for name in classes]
        offsets = [i + (index - (len(per_label) - 1) / 2) * bar for i in range(len(classes))]
        axis.bar(offsets, heights, width=bar, color=f"C{index % 10}", label=label)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 12 else 0)
    axis.set_xlabel("class (in order of arrival)")
    axis.set_ylabel("forgetting (AP points)")
    axis.grid(alpha=0.3, axis="y")
    axis.set_title(title)
    figure.legend(loc="outside lower center", ncol=min(len(per_label), 4), fontsize=8)
    return figure


def embedded_png(figure: Any, alt: str) -> str:
    """``figure`` as an ``<img>`` holding its PNG (base64): the page needs no other file."""
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png")
    finally:
        pyplot().close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def markdown_html(markdown: str) -> str:
    """The report's own markdown (``###`` titles, pipe tables, paragraphs) as HTML."""
    parts: list[str] = []
    table: list[list[str]] = []

    def close_table() -> None:
        if table:
            head, *body = table
            rows = [f"<tr>{''.join(f'<th>{c}</th>' for c in head)}</tr>"]
            rows += [f"<tr>{''.join(f'<td>{c}</td>' for c in row)}</tr>" for row in body]
            parts.append(f"<table>{''.join(rows)}</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} and c for c in cells):  # skip the |---| rule
                table.append(cells)
            continue
        close_table()
        if line.startswith("### "):
            parts.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.strip() and not line.startswith("!["):
            parts.append(f"<p>{html.escape(line)}</p>")
    close_table()
    return "\n".join(parts)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1150px; color: #222;
       padding: 0 1rem; }
h2 { border-bottom: 2px solid #444; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: 0.5rem 0 1.5rem; }
.note { color: #555; font-size: 0.9rem; max-width: 60rem; }
"""

TRANSFER_NOTE = (
    "BWT: the mean over earlier sessions of (mAP of the session's classes after the last "
    "session) minus (their mAP right after their own session); negative means forgetting. "
    "FWT: the mean over sessions after the first of (mAP of the new classes right after their "
    "session) minus (the joint-training runs' mAP over the same classes, every class learned at "
    "once); it needs a joint run among the reported ones. Each session weighs the same; "
    "definitions in mlcil.metrics.transfer."
)


def _figures_html(title: str, label_runs: dict[str, list[dict]]) -> list[str]:
    """The group's pictures: curves, base/new, forgetting per class, one AP heat map per
    label (on one colour scale, so labels compare)."""
    parts = [embedded_png(curves_figure(label_runs, f"{title}: seen mAP"), f"{title} seen mAP")]
    base_new = base_new_figure(label_runs, f"{title}: base and new classes")
    if base_new is not None:
        parts.append(embedded_png(base_new, f"{title} base and new mAP"))
    forgetting = {label: class_forgetting(runs) for label, runs in label_runs.items()}
    figure = forgetting_figure(forgetting, f"{title}: forgetting per class")
    if figure is not None:
        parts.append(embedded_png(figure, f"{title} forgetting per class"))
    tables = {label: class_ap_table(runs) for label, runs in label_runs.items()}
    found = {label: table for label, table in tables.items() if table is not None}
    if found:
        values = np.concatenate([table[~np.isnan(table)] for _, table in found.values()])
        scale = (float(values.min()), float(values.max()))
        for label, (classes, table) in found.items():
            seeds = len(label_runs[label])
            name = f"{title}: {label}, AP per class ({seeds} seed{'s' if seeds > 1 else ''})"
            parts.append(embedded_png(heatmap_figure(classes, table, name, scale), name))
    else:
        parts.append('<p class="note">These runs record no per-class APs.</p>')
    return parts


def _group_html(title: str, label_runs: dict[str, list[dict]]) -> str:
    runs = [run for group in label_runs.values() for run in group]
    parts = [f"<h2>{html.escape(title)}</h2>", markdown_html(comparison_markdown(runs))]
    parts += _figures_html(title, label_runs)
    parts.append(markdown_html(transfer_markdown(runs)))
    parts.append(f'<p class="note">{html.escape(TRANSFER_NOTE)}</p>')
    parts.append(markdown_html(session_breakdown_markdown(runs)))
    parts.append(markdown_html(session_breakdown_markdown(runs, SUBSET_KEYS, SUBSET_TITLE)))
    parts.append(markdown_html(diagnostics_markdown(runs)))
    return "\n".join(part for part in parts if part)


RUN_COLUMNS = ("run_dir", "label", "seed", "device", "device_name", "threads", "deterministic",
               "torch_version", "timm_version", "mlcil_version")  # fmt: skip


def runs_html(runs: Sequence[dict[str, Any]]) -> str:
    """A table of the reported runs and what their numbers may depend on (the fields a run
    made before they were recorded shows as "-")."""
    head = "".join(f"<th>{html.escape(column)}</th>" for column in RUN_COLUMNS)
    rows = []
    for run in runs:
        cells = [run.get(column) for column in RUN_COLUMNS]
        text = ["-" if cell is None else html.escape(str(cell)) for cell in cells]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in text) + "</tr>")
    return f"<h2>Runs</h2><table><tr>{head}</tr>{''.join(rows)}</table>"


def html_report(runs: Sequence[dict[str, Any]]) -> str:
    """The comparison report as one self-contained HTML page (pictures embedded as PNG)."""
    groups = group_runs(runs)
    body = [
        _group_html(f"{dataset} {protocol}", group) for (dataset, protocol), group in groups.items()
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<title>mlcil report</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>mlcil report</h1>\n"
        f'<p class="note">{len(runs)} runs, {len(groups)} dataset/protocol groups. Means over '
        "seeds; ± one standard deviation.</p>\n"
        + "\n".join(body)
        + "\n"
        + runs_html(runs)
        + "\n</body>\n</html>\n"
    )


def write_report(run_dirs: Sequence[str | Path], output_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.json``, ``report.html`` (self-contained: curves, base/new
    curves, per-class AP heat maps, forgetting per class, backward/forward transfer) and one
    curve PNG per (dataset, protocol).

    Args:
        run_dirs: finished run folders.
        output_dir: the report folder, created when missing; existing report files in it are
            replaced.

    Returns:
        The written files: ``"markdown"``, ``"json"``, ``"html"`` and one PNG per
        ``"<dataset> <protocol>"``.

    Raises:
        ConfigError: when ``output_dir`` is an existing file (it is never replaced by a folder)
            or cannot be created, or a run is rejected by ``load_runs``.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(
            f"report: output {output_dir} exists and is a file, not a folder; choose another "
            "output folder (the file is left as it is)"
        )
    runs = load_runs(run_dirs)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"report: cannot create output folder {output_dir}: {error}") from error
    paths = {}
    markdown = comparison_markdown(runs)
    summary = {}
    for (dataset, protocol), label_runs in group_runs(runs).items():
        png = output_dir / f"map_per_session_{dataset}_{protocol}.png"
        plot_sessions(mean_curves(label_runs), png, title=f"{dataset} {protocol}")
        paths[f"{dataset} {protocol}"] = png
        markdown += f"\n![{dataset} {protocol}]({png.name})\n"
        summary[f"{dataset} {protocol}"] = [
            {k: list(v) if isinstance(v, tuple) else v for k, v in row.items()}
            for row in comparison_rows(label_runs)
        ]
    markdown += "\n" + session_breakdown_markdown(runs)
    markdown += "\n" + session_breakdown_markdown(runs, SUBSET_KEYS, SUBSET_TITLE)
    for extra in (transfer_markdown(runs), diagnostics_markdown(runs)):
        if extra:
            markdown += "\n" + extra
    write_text_atomic(output_dir / "report.md", markdown)
    write_text_atomic(output_dir / "report.json", json.dumps(summary, indent=1))
    write_text_atomic(output_dir / "report.html", html_report(runs))
    paths["markdown"] = output_dir / "report.md"
    paths["json"] = output_dir / "report.json"
    paths["html"] = output_dir / "report.html"
    return paths
