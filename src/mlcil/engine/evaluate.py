"""Scoring a test set, herding features, and turning scores into a session's results."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlcil.experiment import Experiment
from mlcil.inference import infer
from mlcil.memory import ExemplarMemory
from mlcil.methods.base import Method
from mlcil.metrics import session_maps
from mlcil.metrics.multilabel import subset_maps
from mlcil.protocol import Session
from mlcil.runtime import Runtime


def predict_scores(
    method: Method, loader: DataLoader, runtime: Runtime, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores and targets over the first ``num_classes`` classes, both ``(N, classes)``,
    in eval mode (the caller's mode is restored), gathered in dataset order over processes."""

    def step(images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "scores": method.predict(images).float().sigmoid(),
            "targets": targets[:, :num_classes],
        }

    rows = infer(loader, step, runtime, method.network)
    return rows["scores"], rows["targets"]


def pooled_features(method: Method, loader: DataLoader, runtime: Runtime) -> torch.Tensor:
    """``(N, F)`` pooled backbone features of a loader's images, in eval mode (herding)."""
    network = method.network

    def step(images: torch.Tensor, _: object) -> dict[str, torch.Tensor]:
        return {"features": network.pooled_features(images)}

    return torch.from_numpy(infer(loader, step, runtime, network)["features"])


def update_memory(
    experiment: Experiment,
    method: Method,
    memory: ExemplarMemory,
    session: Session,
    own: np.ndarray,
) -> ExemplarMemory:
    """Herd exemplars of the session's classes from its own images (``own`` source positions) on
    un-augmented pooled features: selected once, on the main process, then shared with every
    process as plain data."""
    loader = experiment.eval_loader(experiment.plain_images(own))
    features = pooled_features(method, loader, experiment.runtime)
    source, runtime = experiment.train_source, experiment.runtime
    if runtime.is_main:
        memory.update(session, own, features, source.labels, source.image_refs)
    if runtime.world_size > 1:
        memory = ExemplarMemory.from_dict(runtime.broadcast(memory.to_dict()))
    return memory


def evaluate_session(
    experiment: Experiment, method: Method, session: Session
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and targets of the test set after ``session``."""
    loader = experiment.test_loader(session)
    return predict_scores(method, loader, experiment.runtime, session.num_seen)


def session_result(
    scores: np.ndarray,
    targets: np.ndarray,
    session: Session,
    base_session: Session,
    class_names: Sequence[str],
) -> dict:
    """The per-session entry of ``metrics.json`` (maps in percent, AP per class name).

    ``base_map`` / ``new_map`` rank the whole seen test set; ``base_map_subset`` /
    ``new_map_subset`` are the release's definition (each on the images showing a base, resp. a
    new class: :func:`mlcil.metrics.multilabel.subset_maps`), the one comparable with papers.
    """
    maps = session_maps(scores, targets, base_session.new_classes, session.new_classes)
    subsets = subset_maps(scores, targets, base_session.new_classes, session.new_classes)
    return {
        "index": session.index,
        "classes": [class_names[c] for c in session.new_classes],
        "num_seen": session.num_seen,
        "seen_map": maps["seen_map"],
        "base_map": maps["base_map"],
        "new_map": maps["new_map"],
        "base_map_subset": subsets["base_map_subset"],
        "new_map_subset": subsets["new_map_subset"],
        "ap": {class_names[c]: 100.0 * ap for c, ap in enumerate(maps["ap"])},
        "classes_without_positives": [class_names[c] for c in maps["classes_without_positives"]],
        "test_images": len(scores),
    }
