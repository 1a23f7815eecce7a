"""Scoring a test set and turning scores into a session's results."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlcil.engine.runtime import Runtime
from mlcil.methods.base import Method
from mlcil.metrics import session_maps
from mlcil.protocol import Session


@torch.no_grad()
def predict_scores(
    method: Method, loader: DataLoader, runtime: Runtime, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores and targets over the first ``num_classes`` classes, both ``(N, classes)``.

    The network runs in eval mode (batch-norm statistics frozen) and the caller's mode is
    restored afterwards.
    """
    network = method.network
    was_training = network.training
    network.eval()
    scores, targets = [], []
    try:
        for images, target in loader:
            with runtime.autocast():
                logits = method.predict(images.to(runtime.device, non_blocking=True))
            scores.append(logits.float().sigmoid().cpu())
            targets.append(target[:, :num_classes])
    finally:
        network.train(was_training)
    return torch.cat(scores).numpy(), torch.cat(targets).numpy()


def session_result(
    scores: np.ndarray,
    targets: np.ndarray,
    session: Session,
    base_session: Session,
    class_names: Sequence[str],
) -> dict:
    """The per-session entry of ``metrics.json`` (maps in percent, AP per class name)."""
    maps = session_maps(scores, targets, base_session.new_classes, session.new_classes)
    return {
        "index": session.index,
        "classes": [class_names[c] for c in session.new_classes],
        "num_seen": session.num_seen,
        "seen_map": maps["seen_map"],
        "base_map": maps["base_map"],
        "new_map": maps["new_map"],
        "ap": {class_names[c]: 100.0 * ap for c, ap in enumerate(maps["ap"])},
        "classes_without_positives": [class_names[c] for c in maps["classes_without_positives"]],
        "test_images": len(scores),
    }
