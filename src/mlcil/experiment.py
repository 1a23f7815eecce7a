"""What a run is about, apart from training it: its config, data, sessions, transforms, runtime
and the method it builds. The trainer, the dry run, ``eval`` and ``predict`` all start here.

``load_config`` is the config loader with the registries plugged in: ``mlcil.config`` itself
imports no method and no network.
"""

from __future__ import annotations

import dataclasses
import difflib
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
from mlcil.errors import ConfigError, DataError, ProtocolError, clip, shown
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


def plan_sessions(protocol: str, single_session: bool, num_classes: int) -> list[Session]:
    """The sessions a run learns: the protocol's, or one session of every class (joint)."""
    sessions = protocol_sessions(protocol, num_classes)  # validates the protocol
    if single_session:
        every = list(range(num_classes))
        return [Session(index=0, new_classes=every, seen_classes=every)]
    return sessions


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run learns, fixed once: its data, class list and sessions.

    Attributes:
        train_source: the training split (labels over ``class_names``).
        test_source: the test split.
        class_names: every class, in arrival order.
        sessions: the sessions in order.
    """

    train_source: ImageSource
    test_source: ImageSource
    class_names: tuple[str, ...]
    sessions: tuple[Session, ...]

    @classmethod
    def from_config(
        cls, config: RunConfig, sources: tuple[ImageSource, ImageSource] | None = None
    ) -> RunPlan:
        """The plan of ``config``: its dataset (or ``sources``) and its protocol's sessions."""
        train, test = sources or build_sources(config.data)
        single = METHODS.get_class(config.method.name).single_session
        try:
            sessions = plan_sessions(config.protocol, single, len(train.class_names))
        except ProtocolError as error:
            raise ProtocolError(f"{error}{suspicious_labels(train)}") from None
        return cls(train, test, tuple(train.class_names), tuple(sessions))


def suspicious_labels(source: ImageSource) -> str:
    """A hint for a protocol that does not tile the classes: the labels that look like typos
    (a name that differs from another only in case, spaces or one character, or that only a
    single training image carries), or '' when none does."""
    names = list(source.class_names)
    counts = np.asarray(source.labels, dtype=np.int64).sum(axis=0)
    hints = []
    for column, name in enumerate(names):
        others = [other for other in names if other != name]
        # Compared only among a few hundred names: the search is quadratic.
        close = difflib.get_close_matches(name, others, n=1, cutoff=0.8) if len(names) < 500 else []
        folded = [o for o in others if o.casefold().strip() == name.casefold().strip()]
        twin = (folded or close or [None])[0]  # type: ignore[list-item]
        images = f"{counts[column]} image{'' if counts[column] == 1 else 's'}"
        if twin is not None and counts[column] <= counts[names.index(twin)]:
            hints.append(f"{shown(name, 60)} ({images}; like {shown(twin, 60)})")
        elif counts[column] <= 1 and len(names) > 1:
            hints.append(f"{shown(name, 60)} ({images})")
    if not hints:
        return ""
    return f"; labels that look like typos: {', '.join(hints[:5])}"


class Experiment:
    """The plan, transforms and runtime of a config, checked before any training.

    Built once per run and never changed afterwards: ``plan`` is frozen, and a run with added
    sessions is given its extended plan when it is built.
    """

    def __init__(
        self,
        config: RunConfig,
        sources: tuple[ImageSource, ImageSource] | None = None,
        *,
        runtime: Runtime | None = None,
        plan: RunPlan | None = None,
        starting_model: ModelConfig | None = None,
    ) -> None:
        """Args:
        config: the run's configuration.
        sources: ``(train, test)`` image sources to use instead of loading ``config.data``
            (data held in memory, or a subset).
        runtime: the process's runtime, made once by the entry point (default: made here from
            ``config.train``).
        plan: the run's plan (default: ``RunPlan.from_config(config, sources)``).
        starting_model: the model section whose weights a fresh run starts from (e.g. with a
            ``pretrain:`` name resolved to its cached file); default ``config.model``.
        """
        self.config = config
        self.method_class = METHODS.get_class(config.method.name)
        if self.method_class.needs_memory and not config.memory.enabled:
            raise ConfigError(
                f"method {config.method.name!r} replays exemplars: set memory.per_class > 0 "
                "or memory.total"
            )
        self.runtime = runtime or Runtime.from_config(config.train, config.data.num_workers)
        self.plan = plan or RunPlan.from_config(config, sources)
        self.starting_model = starting_model or config.model
        self.check_sessions()
        data = config.data
        self.train_transform = build_transform(
            data.image_size, True, data.augment, data.randaugment
        )
        self.eval_transform = build_transform(data.image_size, False)

    @property
    def train_source(self) -> ImageSource:
        return self.plan.train_source

    @property
    def test_source(self) -> ImageSource:
        return self.plan.test_source

    @property
    def class_names(self) -> list[str]:
        return list(self.plan.class_names)

    @property
    def sessions(self) -> list[Session]:
        return list(self.plan.sessions)

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
            model: the model section to build instead of ``starting_model``.
        """
        config = self.config
        model = model or self.starting_model
        seed_everything(config.seed)
        try:
            network = self.method_class.build_network(
                model, config.data.image_size, load_weights=load_weights
            )
        except (RuntimeError, AssertionError) as error:  # the backbone refuses the input size
            reason = clip(" ".join(str(error).split()), 300)
            raise ConfigError(
                f"model.backbone={model.backbone} fails on data.image_size="
                f"{config.data.image_size}: {reason}"
            ) from None
        network.to(self.runtime.device)
        method = self.method_class(config.method.params, network, config.loss)
        method.runtime = self.runtime
        return method

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
