"""``mlcil report``: the report files over run folders, written into one output folder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mlcil.errors import ConfigError
from mlcil.fileio import write_text_atomic
from mlcil.plots import plot_sessions
from mlcil.report.html import html_report
from mlcil.report.loading import group_runs, load_runs
from mlcil.report.naming import slug
from mlcil.report.stats import mean_curves
from mlcil.report.tables import (
    SUBSET_KEYS,
    SUBSET_TITLE,
    comparison_markdown,
    diagnostics_markdown,
    session_breakdown_markdown,
    summary_json,
    transfer_markdown,
)


def curve_file(output_dir: Path, dataset: str, protocol: str) -> Path:
    """The curve PNG of a group: a name made of slugs (:func:`mlcil.report.naming.slug`), so
    whatever a run recorded as its dataset, protocol or class names, the file is directly in
    ``output_dir``."""
    path = output_dir / f"map_per_session_{slug(dataset)}_{slug(protocol)}.png"
    if path.parent != output_dir:  # cannot happen with slugs; a guard if the naming changes
        raise ConfigError(f"report: {path.name!r} is not a file name")
    return path


def _output_folder(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(
            f"report: output {output_dir} exists and is a file, not a folder; choose another "
            "output folder (the file is left as it is)"
        )


def write_report(run_dirs: Sequence[str | Path], output_dir: str | Path) -> dict[str, Path]:
    """Write ``report.html`` (self-contained: tables, curves, base/new curves, forgetting per
    class, per-class AP heat maps, transfer, each run's settings with those that differ
    highlighted), ``report.md`` and ``report.json`` (the tables), and one curve PNG per
    (dataset, protocol). Runs not finished are reported with the sessions they have done.

    Args:
        run_dirs: run folders (finished or not).
        output_dir: the report folder, created when missing; existing report files in it are
            replaced, and nothing is written anywhere else.

    Returns:
        The written files: ``"html"``, ``"markdown"``, ``"json"`` and one PNG per
        ``"<dataset> <protocol>"``.

    Raises:
        ConfigError: when ``output_dir`` is an existing file (it is never replaced by a folder)
            or cannot be created, or a run is rejected by
            :func:`mlcil.report.loading.load_runs`.
    """
    output_dir = Path(output_dir)
    _output_folder(output_dir)
    runs = load_runs(run_dirs)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"report: cannot create output folder {output_dir}: {error}") from error
    paths = {}
    markdown = comparison_markdown(runs)
    for (dataset, protocol), label_runs in group_runs(runs).items():
        png = curve_file(output_dir, dataset, protocol)
        plot_sessions(mean_curves(label_runs), png, f"{dataset} {protocol}")
        paths[f"{dataset} {protocol}"] = png
        markdown += f"\n![{dataset} {protocol}]({png.name})\n"
    markdown += "\n" + session_breakdown_markdown(runs)
    markdown += "\n" + session_breakdown_markdown(runs, SUBSET_KEYS, SUBSET_TITLE)
    for extra in (transfer_markdown(runs), diagnostics_markdown(runs)):
        if extra:
            markdown += "\n" + extra
    files = {"markdown": "report.md", "json": "report.json", "html": "report.html"}
    contents = {
        "markdown": markdown,
        "json": json.dumps(summary_json(runs), indent=1),
        "html": html_report(runs, output_dir),
    }
    for key, name in files.items():
        write_text_atomic(output_dir / name, contents[key])
        paths[key] = output_dir / name
    return paths
