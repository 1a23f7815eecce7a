"""Evaluation metrics: per-session multi-label metrics and metrics over a continual run."""

from __future__ import annotations

from mlcil.metrics.continual import average_map, forgetting, forgetting_per_class, last_map
from mlcil.metrics.multilabel import (
    average_precision,
    classes_without_positives,
    f1_scores,
    mean_average_precision,
    session_maps,
)
from mlcil.metrics.transfer import (
    backward_transfer,
    forward_transfer,
    task_means,
    transfer_matrix,
)

__all__ = [
    "average_map",
    "average_precision",
    "backward_transfer",
    "classes_without_positives",
    "f1_scores",
    "forgetting",
    "forgetting_per_class",
    "forward_transfer",
    "last_map",
    "mean_average_precision",
    "session_maps",
    "task_means",
    "transfer_matrix",
]
