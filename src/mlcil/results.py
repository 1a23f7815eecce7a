"""Result files of a run: ``metrics.json``, ``metrics.csv`` and ``map_per_session.png``."""

from __future__ import annotations

import csv
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
    """The identifying fields at the top of ``metrics.json``."""
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
    }


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
    """One mAP-per-session curve per entry of ``runs`` (label -> metrics dict)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, metrics in runs.items():
        sessions = metrics["sessions"]
        seen = [s["num_seen"] for s in sessions]
        maps = [s["seen_map"] for s in sessions]
        axis.plot(seen, maps, marker="o", label=label)
    axis.set_xlabel("classes seen")
    axis.set_ylabel("mAP (%)")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)
    if title is None:
        first = next(iter(runs.values()))
        title = f"{first.get('dataset', '')} {first.get('protocol', '')}".strip()
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.png")
    figure.savefig(temporary)
    plt.close(figure)
    temporary.replace(path)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_JSON
    return json.loads(path.read_text())
