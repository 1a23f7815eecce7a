"""Plotting shared by a run's own ``map_per_session.png`` and the reports: matplotlib on a
file-only backend, percent axes that show differences, and one style per method.

Every figure is drawn at most :data:`PAGE_WIDTH_IN` inches wide at :data:`DPI`, so the HTML
report shows it at its own size (never scaled down) and :data:`FONT_SIZE` points stay readable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

DPI = 100
PAGE_WIDTH_IN = 10.5  # 1,050 px: the report page's content width (its CSS max-width)
FONT_SIZE = 10  # points: at 100 dpi, about 14 px
SMALL_FONT_SIZE = 9  # legends, tick labels of long class lists

# Filled markers that stay apart at small sizes; a method's marker follows its colour.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8")


class Style(NamedTuple):
    """How one method is drawn in every figure of a report."""

    color: str  # "#rrggbb"
    marker: str


def method_styles(labels: Sequence[str]) -> dict[str, Style]:
    """A colour and a marker per label, in order: every label gets its own colour at any count
    (matplotlib's ten, then tab20's lighter ten, then evenly spaced hues) and the markers cycle,
    so no two labels share both."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    count = len(labels)
    if count <= 10:
        colors = [colormaps["tab10"](i) for i in range(count)]
    elif count <= 20:
        # tab20 pairs a dark and a light shade of each hue: the ten dark ones first.
        order = [*range(0, 20, 2), *range(1, 20, 2)]
        colors = [colormaps["tab20"](order[i]) for i in range(count)]
    else:
        colors = [colormaps["turbo"](0.05 + 0.9 * i / (count - 1)) for i in range(count)]
    return {
        label: Style(to_hex(color), MARKERS[i % len(MARKERS)])
        for i, (label, color) in enumerate(zip(labels, colors, strict=True))
    }


def legend_columns(labels: Sequence[str], width_in: float, font_size: float) -> int:
    """How many legend entries fit side by side in ``width_in`` inches (at least one)."""
    longest = max((len(label) for label in labels), default=1)
    # An entry is its marker and line (about 4 characters) plus its text, ~0.6 em a character.
    entry_in = (longest + 5) * 0.6 * font_size / 72
    return max(1, min(len(labels), int(width_in / entry_in)))


def session_figure(curves: Mapping[str, Sequence[tuple[int, float]]], title: str) -> Any:
    """A matplotlib figure of seen mAP after each session, one curve per label of ``curves``
    (label -> (classes seen, mAP) points), each in its method style.

    The y axis spans the values (with a margin), not 0-100: runs that differ by a point must
    look different. The legend sits below the axes, where it cannot cover a point; a single
    curve is labelled with its values.
    """
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.4), dpi=110, layout="constrained")
    values: list[float] = []
    ticks: set[int] = set()
    styles = method_styles(list(curves))
    for label, points in curves.items():
        seen = [x for x, _ in points]
        maps = [y for _, y in points]
        color, marker = styles[label]
        # clip_on=False: a point at the top of the range (100 mAP) is drawn whole.
        axis.plot(seen, maps, marker=marker, color=color, label=label, clip_on=False)
        values += maps
        ticks.update(seen)
        if len(curves) == 1:
            for x, y in zip(seen, maps, strict=True):
                label_at = {"textcoords": "offset points", "xytext": (0, 7), "ha": "center"}
                axis.annotate(f"{y:.1f}", (x, y), fontsize=8, **label_at)
    set_percent_range(axis, values)
    axis.set_xticks(sorted(ticks))
    axis.set_xlabel("classes seen")
    axis.set_ylabel("mAP (%)")
    axis.grid(alpha=0.3)
    axis.set_title(title)
    columns = legend_columns(list(curves), 6.4, 8)
    figure.legend(loc="outside lower center", ncol=columns, fontsize=8, frameon=False)
    return figure


def plot_sessions(
    curves: Mapping[str, Sequence[tuple[int, float]]], path: Path, title: str
) -> None:
    """Save :func:`session_figure` of ``curves`` as a PNG."""
    save_figure(session_figure(curves, title), path)


def percent_range(values: Sequence[float]) -> tuple[float, float]:
    """Axis limits for percentages: the values' range with a margin of 15% of it (at least one
    point each side), not below 0; above 100 only by a little headroom for a point at 100."""
    low, high = min(values), max(values)
    margin = max(0.15 * (high - low), 1.0)
    top = high + margin if high + margin <= 100.0 else max(high, 100.0) + min(margin, 4.0)
    return max(0.0, low - margin), top


def set_percent_range(axis: Any, values: Sequence[float]) -> None:
    """Limit ``axis``'s y range to :func:`percent_range` of ``values``, with no tick above
    100."""
    from matplotlib.ticker import MaxNLocator

    low, high = percent_range(values)
    axis.set_ylim(low, high)
    axis.yaxis.set_major_locator(MaxNLocator(nbins=6))
    axis.set_yticks([t for t in axis.get_yticks() if low <= t <= min(high, 100.0)])
    axis.set_ylim(low, high)  # set_yticks may widen the limits to its ticks


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> None:
    """Write ``figure`` as a PNG atomically (through a temporary sibling) and close it."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.png")
    try:
        figure.savefig(temporary)
    finally:
        plt.close(figure)
    temporary.replace(path)
