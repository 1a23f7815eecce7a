"""Scoring a test set, updating the exemplar memory (the memory policy's selection, the method's
per-exemplar data), the exemplars as a method's prediction rule sees them, and turning scores
into a session's results."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlcil.config.schema import MemoryConfig
from mlcil.engine.inputs import RunData
from mlcil.inference import infer
from mlcil.memory import ExemplarMemory
from mlcil.memory_policies import get_policy
from mlcil.methods.base import ExemplarSet, Method
from mlcil.metrics import session_maps
from mlcil.metrics.multilabel import subset_maps
from mlcil.protocol import Session
from mlcil.record import SessionResult
from mlcil.runtime import Runtime, derive_seed

# The memory policy's random stream, apart from every epoch and method pass.
MEMORY_STREAM = "engine/memory"


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
    data: RunData,
    runtime: Runtime,
    settings: MemoryConfig,
    method: Method,
    memory: ExemplarMemory,
    session: Session,
    own: np.ndarray,
) -> ExemplarMemory:
    """Select exemplars of the session's classes from its own images (``own`` source positions)
    with the run's memory policy (herding: on un-augmented pooled features), once, on the main
    process, then share the memory with every process as plain data; then store the method's
    data rows of the new exemplars (``Method.stores_exemplar_data``)."""
    source = data.train_source
    policy = get_policy(settings.policy, settings.rho)
    features = None
    if policy.needs_features:
        loader = data.eval_loader(data.plain_images(own), runtime)
        features = pooled_features(method, loader, runtime)
    if runtime.is_main:
        seed = derive_seed(data.seed, session.index, MEMORY_STREAM)
        memory.update(session, own, features, source.labels, source.image_refs, policy, seed)
    if runtime.world_size > 1:
        plain, rows = runtime.broadcast((memory.to_dict(), memory.data))
        memory = ExemplarMemory.from_dict(plain)
        memory.data = rows
    if method.stores_exemplar_data:
        store_exemplar_data(data, runtime, method, memory)
    return memory


def store_exemplar_data(
    data: RunData, runtime: Runtime, method: Method, memory: ExemplarMemory
) -> None:
    """``method.exemplar_data`` of every stored image without data yet (the new exemplars), on
    un-augmented images in eval mode, computed on every process alike."""
    positions = memory.positions_without_data()
    if not len(positions):
        return
    loader = data.eval_loader(data.plain_images(positions), runtime)

    def step(images: torch.Tensor, _: object) -> dict[str, torch.Tensor]:
        return {"data": method.exemplar_data(images)}

    memory.set_data(positions, infer(loader, step, runtime, method.network)["data"])


def exemplar_set(
    data: RunData, runtime: Runtime, method: Method, memory: ExemplarMemory, session: Session
) -> ExemplarSet:
    """The memory after ``session`` as ``Method.prepare_prediction`` sees it: the stored images,
    the labels replay gives them, and their features on demand."""
    positions, targets = memory.targets(data.train_source.labels, session, data.sessions)

    def features() -> torch.Tensor:
        if not len(positions):
            return torch.zeros(0, 0)
        loader = data.eval_loader(data.plain_images(positions), runtime)
        return pooled_features(method, loader, runtime)

    return ExemplarSet(positions, torch.from_numpy(targets[:, : session.num_seen]), features)


def evaluate_session(
    data: RunData, runtime: Runtime, method: Method, session: Session
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and targets of the test set after ``session``."""
    loader = data.test_loader(session, runtime)
    return predict_scores(method, loader, runtime, session.num_seen)


def session_result(
    scores: np.ndarray,
    targets: np.ndarray,
    session: Session,
    base_session: Session,
    class_names: Sequence[str],
) -> SessionResult:
    """The session's entry of ``metrics.json`` (maps in percent, AP per class name).

    ``base_map`` / ``new_map`` rank the whole seen test set; ``base_map_subset`` /
    ``new_map_subset`` are the release's definition (each on the images showing a base, resp. a
    new class: :func:`mlcil.metrics.multilabel.subset_maps`), the one comparable with papers.
    """
    maps = session_maps(scores, targets, base_session.new_classes, session.new_classes)
    subsets = subset_maps(scores, targets, base_session.new_classes, session.new_classes)
    return SessionResult(
        index=session.index,
        classes=[class_names[c] for c in session.new_classes],
        num_seen=session.num_seen,
        seen_map=maps["seen_map"],
        base_map=maps["base_map"],
        new_map=maps["new_map"],
        base_map_subset=subsets["base_map_subset"],
        new_map_subset=subsets["new_map_subset"],
        ap={class_names[c]: 100.0 * ap for c, ap in enumerate(maps["ap"])},
        classes_without_positives=[class_names[c] for c in maps["classes_without_positives"]],
        test_images=len(scores),
    )
