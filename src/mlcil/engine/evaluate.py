"""Scoring a test set, turning scores into a session's results, and re-scoring a finished run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlcil.added_sessions import run_experiment
from mlcil.engine.checkpoint import latest_checkpoint, restore_run
from mlcil.errors import ConfigError
from mlcil.experiment import Experiment, load_run
from mlcil.memory import ExemplarMemory
from mlcil.methods.base import Method
from mlcil.metrics import session_maps
from mlcil.metrics.multilabel import subset_maps
from mlcil.protocol import Session
from mlcil.runtime import Runtime


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
    # Each process scored its shard: gathered in dataset order, as one process would score.
    gather = runtime.gather_loader_rows
    return gather(loader, torch.cat(scores).numpy()), gather(loader, torch.cat(targets).numpy())


@torch.no_grad()
def pooled_features(method: Method, loader: DataLoader, runtime: Runtime) -> torch.Tensor:
    """``(N, F)`` pooled backbone features of a loader's images, in eval mode (herding)."""
    network = method.network
    was_training = network.training
    network.eval()
    chunks = []
    try:
        for images, _ in loader:
            with runtime.autocast():
                features = network.pooled_features(images.to(runtime.device))
            chunks.append(features.float().cpu())
    finally:
        network.train(was_training)
    return torch.from_numpy(runtime.gather_loader_rows(loader, torch.cat(chunks).numpy()))


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


def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
    """Re-evaluate the latest checkpoint of a run on its last finished session's test set.

    Returns:
        The session's result (maps in percent) plus ``session`` and ``recorded_last_map`` (the
        ``last_map`` of ``metrics.json``, or None when the run is unfinished).
    """
    run_dir = Path(run_dir)
    config, metrics = load_run(run_dir)
    experiment = run_experiment(run_dir, config)
    folder = latest_checkpoint(run_dir, session_end=True)
    if folder is None:
        raise ConfigError(f"{run_dir}: no checkpoint to evaluate")
    state = restore_run(experiment, folder)
    session = experiment.sessions[state.next_session - 1]
    scores, targets = evaluate_session(experiment, state.method, session)
    base = experiment.sessions[0]
    result = session_result(scores, targets, session, base, experiment.class_names)
    is_last = session.index == len(experiment.sessions) - 1
    recorded = metrics.get("last_map") if is_last else None
    return {**result, "session": session.index, "recorded_last_map": recorded}
