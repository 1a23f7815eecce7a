"""The report's pictures, each drawn at most a page wide (:data:`mlcil.plots.PAGE_WIDTH_IN`)
so that the HTML page shows it unscaled, with every method in its own style
(:func:`mlcil.plots.method_styles`) in every picture of a group."""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Callable
from typing import Any

import numpy as np

from mlcil.plots import (
    DPI,
    FONT_SIZE,
    PAGE_WIDTH_IN,
    SMALL_FONT_SIZE,
    Style,
    legend_columns,
    pyplot,
    set_percent_range,
)
from mlcil.report.loading import LabelRuns
from mlcil.report.stats import class_ap_table, class_forgetting, label_series


@dataclasses.dataclass(frozen=True)
class Picture:
    """A figure as the page embeds it: a PNG data URI and its text alternative."""

    alt: str
    src: str


def embedded(figure: Any, alt: str) -> Picture:
    """``figure`` as a PNG data URI (the page needs no other file); the figure is closed."""
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=DPI)
    finally:
        pyplot().close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Picture(alt, f"data:image/png;base64,{data}")


def _figure(width: float, height: float, **options: Any) -> tuple[Any, Any]:
    plt = pyplot()
    size = (min(width, PAGE_WIDTH_IN), height)
    return plt.subplots(figsize=size, dpi=DPI, layout="constrained", **options)


def _legend(figure: Any, handles: list, labels: list[str], width: float = PAGE_WIDTH_IN) -> None:
    """The legend below the axes, as many entries a row as fit the figure's width."""
    columns = legend_columns(labels, width, SMALL_FONT_SIZE)
    figure.legend(
        handles, labels, loc="outside lower center", ncol=columns, fontsize=SMALL_FONT_SIZE
    )


def _session_axes(axis: Any, values: list[float], label_runs: LabelRuns, ylabel: str) -> None:
    set_percent_range(axis, values)
    seen = {s.num_seen for runs in label_runs.values() for r in runs for s in r.sessions}
    axis.set_xticks(sorted(seen))
    axis.set_xlabel("classes seen", fontsize=FONT_SIZE)
    axis.set_ylabel(ylabel, fontsize=FONT_SIZE)
    axis.tick_params(labelsize=SMALL_FONT_SIZE)
    axis.grid(alpha=0.3)


def curves_figure(label_runs: LabelRuns, title: str, styles: dict[str, Style]) -> Any:
    """Seen mAP after each session, one curve per label (mean over seeds, a band of +- one
    standard deviation when there are several)."""
    width = 8.0
    figure, axis = _figure(width, 4.6 + 0.22 * (len(label_runs) // 3))
    values: list[float] = []
    for label, runs in label_runs.items():
        seen, means, stds = label_series(runs, "seen_map")
        color, marker = styles[label]
        seeds = f"{len(runs)} seed" + ("" if len(runs) == 1 else "s")
        axis.plot(seen, means, marker=marker, color=color, label=f"{label} ({seeds})")
        if len(runs) > 1:
            low = [m - s for m, s in zip(means, stds, strict=True)]
            high = [m + s for m, s in zip(means, stds, strict=True)]
            axis.fill_between(seen, low, high, color=color, alpha=0.15, linewidth=0)
            values += low + high
        values += means
    _session_axes(axis, values, label_runs, "seen mAP (%)")
    axis.set_title(title, fontsize=FONT_SIZE + 1)
    handles, labels = axis.get_legend_handles_labels()
    _legend(figure, handles, labels, width)
    return figure


def base_new_figure(label_runs: LabelRuns, title: str, styles: dict[str, Style]) -> Any | None:
    """Two panels: the base classes' mAP after each session, and each later session's new
    classes' mAP (means over seeds). Single-session runs (joint training) have neither and are
    left out. None when no run measured a later session's classes."""
    incremental = {
        label: runs for label, runs in label_runs.items() if any(len(r.sessions) > 1 for r in runs)
    }
    panels = (("base_map", 0, "base"), ("new_map", 1, "new"))
    series = {
        key: {label: label_series(runs, key, first) for label, runs in incremental.items()}
        for key, first, _ in panels
    }
    if not any(means for _, means, _ in series["new_map"].values()):
        return None
    figure, axes = _figure(PAGE_WIDTH_IN, 4.4 + 0.22 * (len(incremental) // 4), ncols=2)
    for axis, (key, _, name) in zip(axes, panels, strict=True):
        values: list[float] = []
        for label, (seen, means, _) in series[key].items():
            color, marker = styles[label]
            axis.plot(seen, means, marker=marker, color=color, label=label, clip_on=False)
            values += means
        _session_axes(axis, values or [0.0, 100.0], incremental, f"{name} classes' mAP (%)")
        axis.set_title(f"{name} classes", fontsize=FONT_SIZE)
    handles, labels = axes[0].get_legend_handles_labels()
    _legend(figure, handles, labels)
    figure.suptitle(title, fontsize=FONT_SIZE + 1)
    return figure


def _row_labels(axis: Any, classes: list[str]) -> None:
    axis.set_yticks(range(len(classes)), classes, fontsize=SMALL_FONT_SIZE)
    axis.set_ylabel("class (in order of arrival)", fontsize=FONT_SIZE)


def _cell_values(axis: Any, table: np.ndarray, light: Callable[[float], bool]) -> None:
    """Each cell's value when the cells are few: black on a ``light`` colour, else white."""
    if table.size > 400:
        return
    for (row, column), value in np.ndenumerate(table):
        if not np.isnan(value):
            shade = "black" if light(value) else "white"
            options = {"ha": "center", "va": "center", "color": shade, "fontsize": 8}
            axis.text(column, row, f"{value:.0f}", **options)


def heatmap_figure(classes: list[str], table: np.ndarray, title: str, scale: tuple) -> Any:
    """Per-class AP (rows, in order of arrival) after each session (columns); grey before a
    class's session; values written in the cells when they fit."""
    height = min(1.8 + 0.25 * len(classes), 40.0)
    # Narrow enough for two side by side on the page (the class names take their room).
    longest = max((len(name) for name in classes), default=1)
    width = max(2.2 + 0.55 * table.shape[1] + 0.07 * longest, 0.1 * len(title))  # title fits
    figure, axis = _figure(width, height)
    colors = pyplot().get_cmap("viridis").with_extremes(bad="#dddddd")  # grey: not seen yet
    image = axis.imshow(
        np.ma.masked_invalid(table), aspect="auto", cmap=colors, vmin=scale[0], vmax=scale[1]
    )
    axis.set_xticks(range(table.shape[1]), [str(t) for t in range(table.shape[1])])
    axis.tick_params(axis="x", labelsize=SMALL_FONT_SIZE)
    axis.set_xlabel("after session", fontsize=FONT_SIZE)
    _row_labels(axis, classes)
    middle = (scale[0] + scale[1]) / 2
    _cell_values(axis, table, lambda value: value > middle)  # viridis is light at the top
    figure.colorbar(image, ax=axis).set_label("AP (%)", fontsize=FONT_SIZE)
    axis.set_title(title, fontsize=FONT_SIZE + 1)
    return figure


def forgetting_figure(label_runs: LabelRuns, title: str) -> Any | None:
    """Forgetting per class (AP points: best before the last session minus the last) as a
    grid: one row per class (in order of arrival), one column per label; red is forgotten,
    blue improved. None when no label measured any."""
    per_label = {label: class_forgetting(runs) for label, runs in label_runs.items()}
    per_label = {label: values for label, values in per_label.items() if values}
    if not per_label:
        return None
    labels = list(per_label)
    classes = list(dict.fromkeys(name for values in per_label.values() for name in values))
    table = np.array([[per_label[label].get(name, np.nan) for label in labels] for name in classes])
    longest = max(len(label) for label in labels)
    # Column labels are turned 35 degrees: their length sets the height below the grid.
    height = min(2.2 + 0.25 * len(classes) + 0.045 * longest, 40.0)
    figure, axis = _figure(3.0 + 0.7 * len(labels) + 0.06 * longest, height)
    limit = max(float(np.nanmax(np.abs(table))), 1.0)
    colors = pyplot().get_cmap("RdBu_r").with_extremes(bad="#dddddd")
    image = axis.imshow(
        np.ma.masked_invalid(table), aspect="auto", cmap=colors, vmin=-limit, vmax=limit
    )
    axis.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=SMALL_FONT_SIZE)
    _row_labels(axis, classes)
    _cell_values(axis, table, lambda value: abs(value) < limit / 2)  # light around 0
    bar = figure.colorbar(image, ax=axis)
    bar.set_label("forgetting (AP points): red forgotten, blue improved", fontsize=FONT_SIZE)
    axis.set_title(title, fontsize=FONT_SIZE + 1)
    return figure


def ap_heatmaps(title: str, label_runs: LabelRuns) -> list[Picture]:
    """One AP heat map per label that records per-class APs, all on one colour scale."""
    tables = {label: class_ap_table(runs) for label, runs in label_runs.items()}
    found = {label: table for label, table in tables.items() if table is not None}
    if not found:
        return []
    values = np.concatenate([table[~np.isnan(table)] for _, table in found.values()])
    scale = (float(values.min()), float(values.max()))
    pictures = []
    for label, (classes, table) in found.items():
        seeds = len(label_runs[label])
        name = f"{title}: {label}, AP per class ({seeds} seed{'s' if seeds > 1 else ''})"
        pictures.append(embedded(heatmap_figure(classes, table, name, scale), name))
    return pictures


def group_pictures(title: str, label_runs: LabelRuns, styles: dict[str, Style]) -> list[Picture]:
    """A group's pictures: curves, base/new, forgetting per class, the AP heat maps."""
    pictures = [
        embedded(curves_figure(label_runs, f"{title}: seen mAP", styles), f"{title} seen mAP")
    ]
    base_new = base_new_figure(label_runs, f"{title}: base and new classes", styles)
    if base_new is not None:
        pictures.append(embedded(base_new, f"{title} base and new mAP"))
    forgetting = forgetting_figure(label_runs, f"{title}: forgetting per class")
    if forgetting is not None:
        pictures.append(embedded(forgetting, f"{title} forgetting per class"))
    return pictures + ap_heatmaps(title, label_runs)
