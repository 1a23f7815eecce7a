"""Result files of a run: ``metrics.json`` (the typed record of :mod:`mlcil.record`),
``metrics.csv`` and ``map_per_session.png``, written after every session; and the header that
says what the numbers may depend on."""

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
from mlcil.errors import ConfigError
from mlcil.fileio import write_text_atomic
from mlcil.metrics import average_map, f1_scores, forgetting, last_map
from mlcil.plots import plot_sessions
from mlcil.record import FORMAT, VERSION, RunMetrics, SessionResult
from mlcil.rundir import RunDir
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
    sessions: Sequence[SessionResult | dict[str, Any]],
    final_scores: Any,
    final_targets: Any,
    f1_threshold: float,
    header: dict[str, Any],
    wall_time_s: float,
    planned_sessions: int | None = None,
) -> RunMetrics:
    """The run's record after the sessions done so far: the per-session results, the maps over
    them, and F1 on the last session's test scores.

    Args:
        sessions: the sessions' results (the checkpoint's plain entries are checked here).
        final_scores: the last session's test scores; ``final_targets`` its targets.
        f1_threshold: the decision threshold of the F1 scores.
        header: :func:`run_header` and what features added to it (``pretrained``...).
        wall_time_s: the run's training time so far.
        planned_sessions: the run's sessions in all (default: those done, a finished run).
    """
    entries = [SessionResult.model_validate(entry) for entry in sessions]
    maps = [entry.seen_map for entry in entries]
    history = [[_fraction(ap) for ap in (entry.ap or {}).values()] for entry in entries]
    final = f1_scores(final_scores, final_targets, threshold=f1_threshold)
    planned = len(entries) if planned_sessions is None else planned_sessions
    return RunMetrics.model_validate(
        {
            "format": FORMAT,
            "version": VERSION,
            "finished": len(entries) >= planned,
            "planned_sessions": planned,
            **header,
            "sessions": entries,
            "avg_map": average_map(maps),
            "last_map": last_map(maps),
            "final": {**final, "threshold": f1_threshold},
            "forgetting": forgetting(history),
            "wall_time_s": wall_time_s,
        }
    )


def _fraction(ap: float | None) -> float:
    return math.nan if ap is None else ap / 100.0  # NaN: forgetting() names the session


def write_results(run_dir: Path, metrics: RunMetrics) -> None:
    """Write the three result files of a run (atomically): ``metrics.json``, ``metrics.csv``
    (one row per session done) and ``map_per_session.png``."""
    run = RunDir(run_dir)
    write_text_atomic(run.metrics_file, metrics.to_json())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for entry in metrics.sessions:
        row = entry.plain()
        writer.writerow(
            {
                **row,
                "session": entry.index,
                "classes": " ".join(entry.classes),
                **{k: _fmt(row.get(k)) for k in ("seen_map", "base_map", "new_map")},
                **{k: _fmt(row.get(k)) for k in ("base_map_subset", "new_map_subset")},
            }
        )
    write_text_atomic(run.metrics_csv, buffer.getvalue())
    points = [(entry.num_seen, entry.seen_map) for entry in metrics.sessions]
    plot_sessions({metrics.method: points}, run.plot_file, f"{metrics.dataset} {metrics.protocol}")


def result_files(run_dir: str | Path) -> tuple[Path, Path]:
    """Where ``run_dir`` keeps its results: ``metrics.json`` and the per-session mAP plot."""
    run = RunDir(run_dir)
    return run.metrics_file, run.plot_file


def read_metrics(run_dir: str | Path) -> RunMetrics | None:
    """The record in a run folder's ``metrics.json``; None when the file does not exist (no
    session of the run is done yet).

    Raises:
        ConfigError: naming the file and the key at fault when it cannot be read or checked
            (:meth:`mlcil.record.RunMetrics.from_json`).
    """
    path = RunDir(run_dir).metrics_file
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    return RunMetrics.from_json(text, path)


def run_finished(run_dir: str | Path) -> bool:
    """Whether a run folder's ``metrics.json`` says every session is done (a file without the
    flag was written at the end of a run, by version 1). Only the flag is looked at: the
    file's content is checked by whoever reads it."""
    path = RunDir(run_dir).metrics_file
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return True  # a file there but unreadable: reported by its reader, not trained over
    return not (isinstance(data, dict) and data.get("finished") is False)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
