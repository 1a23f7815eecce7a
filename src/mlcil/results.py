"""Result files of a run: ``metrics.json``, ``metrics.csv`` and ``map_per_session.png``."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mlcil.config.schema import RunConfig
from mlcil.fileio import write_text_atomic
from mlcil.metrics import average_map, f1_scores, forgetting, last_map
from mlcil.rundir import METRICS_CSV, METRICS_JSON, PLOT
from mlcil.version import __version__

CSV_COLUMNS = (
    "session",
    "classes",
    "num_seen",
    "seen_map",
    "base_map",
    "new_map",
    "base_map_subset",
    "new_map_subset",
    "train_images",
    "memory_images",
    "test_images",
    "train_time_s",
)


def run_header(config: RunConfig, device: Any) -> dict[str, Any]:
    """The identifying fields at the top of ``metrics.json``, then what the numbers may depend
    on besides the config: the versions of mlcil, torch and timm, the device and its name, the
    threads torch computes with on the CPU and whether deterministic kernels were on."""
    return {
        "method": config.method.name,
        "label": config.display_label,
        "dataset": config.data.dataset,
        "protocol": config.protocol_label,
        "class_order": config.data.class_order,
        "seed": config.seed,
        "run_name": config.run_name,
        "network": config.model.network,
        "backbone": config.model.backbone,
        "memory_per_class": config.memory.per_class,
        "memory_total": config.memory.total,
        "device": str(device),
        "machine": platform.machine(),
        "mlcil_version": __version__,
        "torch_version": torch.__version__,
        "timm_version": _installed_version("timm"),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: Any) -> str:
    """The GPU's name for a CUDA device, else the CPU's model (``platform.processor()`` where
    ``/proc/cpuinfo`` is missing): runs on two machines can differ in their last digits."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back below
    return platform.processor() or platform.machine()


def summarize(
    sessions: Sequence[dict[str, Any]],
    final_scores: Any,
    final_targets: Any,
    f1_threshold: float,
    header: dict[str, Any],
    wall_time_s: float,
) -> dict[str, Any]:
    """Assemble ``metrics.json`` from the per-session results and the final scores."""
    maps = [s["seen_map"] for s in sessions]
    history = [[ap / 100.0 for ap in s["ap"].values()] for s in sessions]
    final = f1_scores(final_scores, final_targets, threshold=f1_threshold)
    return {
        **header,
        "sessions": list(sessions),
        "avg_map": average_map(maps),
        "last_map": last_map(maps),
        "final": {**final, "threshold": f1_threshold},
        "forgetting": forgetting(history),
        "wall_time_s": wall_time_s,
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN: write None instead so every file parses with strict readers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_results(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Write the three result files of a run (atomically)."""
    run_dir = Path(run_dir)
    write_text_atomic(run_dir / METRICS_JSON, json.dumps(_clean(metrics), indent=1))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for entry in metrics["sessions"]:
        writer.writerow(
            {
                **entry,
                "session": entry["index"],
                "classes": " ".join(entry["classes"]),
                **{k: _fmt(entry.get(k)) for k in ("seen_map", "base_map", "new_map")},
                **{k: _fmt(entry.get(k)) for k in ("base_map_subset", "new_map_subset")},
            }
        )
    write_text_atomic(run_dir / METRICS_CSV, buffer.getvalue())
    plot_sessions({metrics.get("method", "run"): metrics}, run_dir / PLOT)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def plot_sessions(runs: dict[str, dict[str, Any]], path: Path, title: str | None = None) -> None:
    """Save one mAP-per-session curve per entry of ``runs`` (label -> metrics dict) as a PNG
    (see :func:`session_figure`)."""
    save_figure(session_figure(runs, title), path)


def session_figure(runs: dict[str, dict[str, Any]], title: str | None = None) -> Any:
    """A matplotlib figure of seen mAP after each session, one curve per entry of ``runs``.

    The y axis spans the values (with a margin), not 0-100: runs that differ by a point must
    look different. The legend sits below the axes, where it cannot cover a point; a single
    curve is labelled with its values.
    """
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.4), dpi=110, layout="constrained")
    values: list[float] = []
    ticks: set[int] = set()
    for label, metrics in runs.items():
        sessions = metrics["sessions"]
        seen = [s["num_seen"] for s in sessions]
        maps = [s["seen_map"] for s in sessions]
        # clip_on=False: a point at the top of the range (100 mAP) is drawn whole.
        axis.plot(seen, maps, marker="o", label=label, clip_on=False)
        values += maps
        ticks.update(seen)
        if len(runs) == 1:
            for x, y in zip(seen, maps, strict=True):
                label_at = {"textcoords": "offset points", "xytext": (0, 7), "ha": "center"}
                axis.annotate(f"{y:.1f}", (x, y), fontsize=8, **label_at)
    set_percent_range(axis, values)
    axis.set_xticks(sorted(ticks))
    axis.set_xlabel("classes seen")
    axis.set_ylabel("mAP (%)")
    axis.grid(alpha=0.3)
    if title is None:
        first = next(iter(runs.values()))
        title = f"{first.get('dataset', '')} {first.get('protocol', '')}".strip()
    axis.set_title(title)
    figure.legend(loc="outside lower center", ncol=min(len(runs), 4), fontsize=8, frameon=False)
    return figure


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


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_JSON
    return json.loads(path.read_text())
