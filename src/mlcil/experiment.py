"""What a run is about, apart from training it: its config, data, sessions, transforms, runtime
and the method it builds. The trainer, the dry run, ``eval`` and ``predict`` all start here.

``load_config`` is the config loader with the registries plugged in: ``mlcil.config`` itself
imports no method and no network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlcil.config import loading
from mlcil.config.schema import ModelConfig, Params, RunConfig
from mlcil.data import ImageSource, build_sources
from mlcil.data.sessions import (
    TargetedImages,
    session_test_set,
    session_train_indices,
    session_train_set,
    test_indices,
)
from mlcil.data.transforms import build_transform
from mlcil.errors import ConfigError, DataError
from mlcil.memory import ExemplarMemory
from mlcil.methods import METHODS, Method, SessionContext
from mlcil.models import NETWORKS
from mlcil.protocol import Session, protocol_sessions
from mlcil.runtime import Runtime, seed_everything

logger = logging.getLogger(__name__)


def params_lookup(kind: str, name: str) -> type[Params]:
    """The ``Params`` class of a registered method or network (injected into config loading)."""
    if kind == "method":
        return METHODS.get_class(name).Params
    if kind == "network":
        return NETWORKS.get_class(name).Params
    raise ConfigError(f"no registry of {kind!r} components")


def load_config(
    paths: str | Path | Sequence[str | Path] | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """Read YAML files (later ones win), apply ``key=value`` overrides, validate every key."""
    return loading.load_config(paths, overrides, params_lookup)


def build_config(raw: dict[str, Any], where: str = "config") -> RunConfig:
    """Validate a plain mapping (e.g. ``RunConfig.to_dict()``) into a ``RunConfig``."""
    return loading.build_config(raw, where, params_lookup)


def load_run(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """The resolved config and ``metrics.json`` (empty when not written yet) of a run folder."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder: {config_path} is missing")
    config = load_config(config_path)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return config, {}
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{metrics_path}: not readable JSON: {error}") from error
    if not isinstance(metrics, dict):
        raise ConfigError(f"{metrics_path}: expected a JSON object, got {type(metrics).__name__}")
    return config, metrics


def plan_sessions(protocol: str, single_session: bool, num_classes: int) -> list[Session]:
    """The sessions a run learns: the protocol's, or one session of every class (joint)."""
    sessions = protocol_sessions(protocol, num_classes)  # validates the protocol
    if single_session:
        every = list(range(num_classes))
        return [Session(index=0, new_classes=every, seen_classes=every)]
    return sessions


class Experiment:
    """The data, sessions, transforms and runtime of a config, checked before any training."""

    def __init__(
        self, config: RunConfig, sources: tuple[ImageSource, ImageSource] | None = None
    ) -> None:
        """Args:
        config: the run's configuration.
        sources: ``(train, test)`` image sources to use instead of loading ``config.data``
            (data held in memory, or a subset).
        """
        self.config = config
        self.method_class = METHODS.get_class(config.method.name)
        if self.method_class.needs_memory and not config.memory.enabled:
            raise ConfigError(
                f"method {config.method.name!r} replays exemplars: set memory.per_class > 0 "
                "or memory.total"
            )
        self.runtime = Runtime.from_config(config.train, config.data.num_workers)
        self.train_source, self.test_source = sources or build_sources(config.data)
        self.class_names = self.train_source.class_names
        self.sessions = plan_sessions(
            config.protocol, self.method_class.single_session, len(self.class_names)
        )
        self.check_sessions()
        data = config.data
        self.train_transform = build_transform(
            data.image_size, True, data.augment, data.randaugment
        )
        self.eval_transform = build_transform(data.image_size, False)

    def check_sessions(self) -> None:
        """Fail before any training when a session would have no training or test image."""
        dataset = self.config.data.dataset
        for session, sizes in zip(self.sessions, self.session_sizes(), strict=True):
            if sizes["train_images"] == 0:
                names = ", ".join(self.class_names[c] for c in session.new_classes)
                raise DataError(
                    f"session {session.index} ({names}) has no training image in {dataset}/train"
                )
            if sizes["test_images"] == 0:
                raise DataError(
                    f"after session {session.index} no test image carries a seen class in "
                    f"{dataset}/test"
                )

    def session_sizes(self) -> list[dict[str, int]]:
        """Training/test image counts per session (exemplars not included)."""
        overlap = self.config.data.overlap
        rows = []
        for session in self.sessions:
            train = session_train_indices(self.train_source.labels, session, self.sessions, overlap)
            test = test_indices(self.test_source.labels, session.seen_classes)
            rows.append(
                {
                    "session": session.index,
                    "new_classes": len(session.new_classes),
                    "train_images": len(train),
                    "test_images": len(test),
                }
            )
        return rows

    def build_method(self, load_weights: bool = True, model: ModelConfig | None = None) -> Method:
        """The configured method with a fresh network (no session yet) on the run's device.

        Args:
            load_weights: read the model's pretrained weights file (False: same architecture,
                weights left as initialised; a checkpoint is loaded next).
            model: the model section to build instead of the config's (e.g. with a
                ``pretrain:`` name resolved to its cached file).
        """
        config = self.config
        model = model or config.model
        seed_everything(config.seed)
        network = self.method_class.build_network(
            model, config.data.image_size, load_weights=load_weights
        )
        network.to(self.runtime.device)
        return self.method_class(config.method.params, network, config.loss)

    def new_memory(self) -> ExemplarMemory:
        memory = self.config.memory
        return ExemplarMemory(
            per_class=memory.per_class, total=memory.total, label_mode=memory.labels
        )

    def train_set(self, session: Session, memory: ExemplarMemory) -> tuple[TargetedImages, int]:
        """The session's training images followed by the exemplars, and how many are its own."""
        exemplar_indices, exemplar_targets = memory.targets(
            self.train_source.labels, session, self.sessions
        )
        train_set = session_train_set(
            self.train_source,
            session,
            self.sessions,
            self.train_transform,
            overlap=self.config.data.overlap,
            extra_indices=exemplar_indices,
            extra_targets=exemplar_targets,
        )
        return train_set, len(train_set) - len(exemplar_indices)

    def context(self, session: Session, train_set: TargetedImages) -> SessionContext:
        """What the method may use while ``session`` starts and ends."""
        return SessionContext(
            session=session,
            sessions=self.sessions,
            train_set=train_set,
            train_source=self.train_source,
            runtime=self.runtime,
            seed=self.config.seed,
            # Each process loads its share of the global batch (train.batch_size).
            batch_size=max(self.config.train.batch_size // self.runtime.world_size, 1),
        )

    @property
    def eval_batch_size(self) -> int:
        return self.config.train.eval_batch_size or 2 * self.config.train.batch_size

    def eval_loader(self, dataset: TargetedImages) -> DataLoader:
        return self.runtime.loader(dataset, self.eval_batch_size, shuffle=False)

    def test_loader(self, session: Session) -> DataLoader:
        """The test images of the classes seen after ``session``, un-augmented, in order."""
        test_set = session_test_set(self.test_source, session.seen_classes, self.eval_transform)
        return self.eval_loader(test_set)

    def plain_images(
        self, indices: np.ndarray, source: ImageSource | None = None
    ) -> TargetedImages:
        """Images at ``indices`` of the training split (or ``source``) with the evaluation
        transform (no augmentation) and empty targets."""
        targets = np.zeros((len(indices), 1), dtype=np.float32)
        source = source or self.train_source
        return TargetedImages(source, indices, targets, self.eval_transform)

    def describe_device(self) -> str:
        return f"{self.runtime.device} ({self.runtime.precision}, torch {torch.__version__})"
