"""Tables and plots over finished runs: one run's session table, and the comparison report.

``write_report`` groups runs by (dataset, protocol), then by label (method or ablation), and
reports mean +- standard deviation over seeds of avg mAP, last mAP, CF1, OF1, forgetting and wall
time, with one mAP-per-session curve per label and a per-session breakdown (seen / base / new mAP)
that shows *why* one method ends above another: old classes kept or new classes learned.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlcil.errors import ConfigError
from mlcil.fileio import write_text_atomic
from mlcil.results import plot_sessions
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


def write_report(run_dirs: Sequence[str | Path], output_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and one curve PNG per (dataset, protocol).

    Args:
        run_dirs: finished run folders.
        output_dir: the report folder, created when missing; existing report files in it are
            replaced.

    Returns:
        The written files: ``"markdown"``, ``"json"`` and one PNG per ``"<dataset> <protocol>"``.

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
    diagnostics = diagnostics_markdown(runs)
    if diagnostics:
        markdown += "\n" + diagnostics
    write_text_atomic(output_dir / "report.md", markdown)
    write_text_atomic(output_dir / "report.json", json.dumps(summary, indent=1))
    paths["markdown"] = output_dir / "report.md"
    paths["json"] = output_dir / "report.json"
    return paths
