"""What a run is about, apart from training it: its config, data, sessions, transforms, runtime
and the method it builds. The trainer, the dry run, ``eval`` and ``predict`` all start here:
the experiment checks a config and gives the engine its narrow inputs
(:class:`mlcil.engine.inputs.RunInputs`: the frozen data view, the runtime, the method factory).

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

from mlcil.config import loading
from mlcil.config.schema import ModelConfig, Params, RunConfig
from mlcil.data import ImageSource, build_sources
from mlcil.data.sessions import TargetedImages, session_train_indices, test_indices
from mlcil.data.transforms import build_transform
from mlcil.engine.inputs import RunData, RunInputs
from mlcil.errors import ConfigError, DataError, ProtocolError, clip, shown
from mlcil.methods import METHODS, Method
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
    sessions is given its extended plan when it is built. ``inputs`` is what the engine gets.
    """

    def __init__(
        self,
        config: RunConfig,
        sources: tuple[ImageSource, ImageSource] | None = None,
        *,
        runtime: Runtime,
        plan: RunPlan | None = None,
        starting_model: ModelConfig | None = None,
    ) -> None:
        """Args:
        config: the run's configuration.
        sources: ``(train, test)`` image sources to use instead of loading ``config.data``
            (data held in memory, or a subset).
        runtime: the process's runtime, made once by the entry point (``mlcil.runs.make_runtime``;
            an experiment never makes one: it would start a process group).
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
        self.runtime = runtime
        self.plan = plan or RunPlan.from_config(config, sources)
        self.starting_model = starting_model or config.model
        self.check_sessions()
        data = config.data
        self.train_transform = build_transform(
            data.image_size, True, data.augment, data.randaugment
        )
        self.eval_transform = build_transform(data.image_size, False)
        train = config.train
        self.data = RunData(
            train_source=self.plan.train_source,
            test_source=self.plan.test_source,
            class_names=self.plan.class_names,
            sessions=self.plan.sessions,
            seed=config.seed,
            train_transform=self.train_transform,
            eval_transform=self.eval_transform,
            overlap=data.overlap,
            batch_size=train.batch_size,
            eval_batch_size=train.eval_batch_size or 2 * train.batch_size,
        )
        self.inputs = RunInputs(config, self.data, runtime, self.build_method)

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

    # The data view's parts the diagnostics read (they score the experiment's images).

    @property
    def eval_batch_size(self) -> int:
        return self.data.eval_batch_size

    def plain_images(
        self, indices: np.ndarray, source: ImageSource | None = None
    ) -> TargetedImages:
        return self.data.plain_images(indices, source)

    def describe_device(self) -> str:
        return f"{self.runtime.device} ({self.runtime.precision}, torch {torch.__version__})"
