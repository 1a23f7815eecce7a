"""Sessions added to a run after it was trained: ``mlcil train --resume RUN --add-session M``.

A run learns the sessions of its protocol from its dataset. Later, a user may teach it more: a
training manifest whose labels the run has not seen yet becomes one more session, whose classes
are those labels in order of first appearance. Each added session is recorded in
``<run>/added_sessions.json``::

    {"format": "mlcil-added-sessions", "version": 1,
     "sessions": [{"index": 4, "classes": ["8", "9"],
                   "train_manifest": "/abs/train.csv", "test_manifest": "/abs/test.csv"}]}

and ``run_plan`` gives the run's :class:`~mlcil.experiment.RunPlan` with them (built once, never
changed afterwards), so that resume, ``eval`` and ``predict`` all see the same classes, data and
sessions:

- The sessions are the protocol's first ``sessions[0].index`` sessions (the ones the run had
  learned when the first session was added; a run stopped early with ``--max-sessions`` drops
  the rest of its protocol), then one per added session.
- The class list is the classes seen by those sessions, then each added session's classes.
- The training source is the original one followed by every added training manifest, so the
  exemplar memory's positions stay valid; the test source is the original test split followed
  by every added test manifest. The original data keeps its labels for the classes it names
  (a class of the original dataset that the run had not learned, e.g. digit 8 of the embedded
  benchmark, keeps its original labels when a manifest brings it); its images carry 0 for a new
  class it does not name.
- Without a test manifest nothing of the new data is held out: the new classes are evaluated
  on the original test images only, and have no AP when those do not name them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mlcil.config.schema import RunConfig
from mlcil.data.base import ImageSource
from mlcil.data.manifest import load_manifest, new_labels_in_order
from mlcil.engine.checkpoint import latest_checkpoint, read_state
from mlcil.errors import ConfigError, DataError, WeightsError
from mlcil.experiment import RunPlan
from mlcil.fileio import parse_json, write_atomic, write_text_atomic
from mlcil.protocol import Session
from mlcil.record import AddedSessionEntry, RunMetrics
from mlcil.results import write_results
from mlcil.rundir import ADDED_SESSIONS, RunDir, checkpoint_name

logger = logging.getLogger(__name__)

ADDED_FILE = ADDED_SESSIONS  # the file's name, for messages (the path is RunDir's)
_FORMAT = "mlcil-added-sessions"
_VERSION = 1


@dataclasses.dataclass(frozen=True)
class AddedSession:
    """One session added to a finished run.

    Attributes:
        index: the session's index in the run (the number of sessions before it).
        classes: its new class names, in first-appearance order in the training manifest.
        train_manifest: absolute path of its training manifest.
        test_manifest: absolute path of its test manifest, or None (nothing held out).
    """

    index: int
    classes: tuple[str, ...]
    train_manifest: str
    test_manifest: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "classes": list(self.classes),
            "train_manifest": self.train_manifest,
            "test_manifest": self.test_manifest,
        }


def read_added_sessions(run_dir: str | Path) -> list[AddedSession]:
    """The sessions recorded in ``<run>/added_sessions.json`` (none when the file is absent)."""
    path = RunDir(run_dir).added_sessions_file
    if not path.is_file():
        return []
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ValueError(f"not a version-{_VERSION} {_FORMAT} file")
        return [
            AddedSession(
                index=int(entry["index"]),
                classes=tuple(str(name) for name in entry["classes"]),
                train_manifest=str(entry["train_manifest"]),
                test_manifest=_optional_text(entry["test_manifest"]),
            )
            for entry in data["sessions"]
        ]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path}: malformed added-sessions file: {error}") from error


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def write_added_sessions(run_dir: str | Path, sessions: Sequence[AddedSession]) -> None:
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "sessions": [session.to_json() for session in sessions],
    }
    write_text_atomic(RunDir(run_dir).added_sessions_file, json.dumps(payload, indent=1) + "\n")


@contextlib.contextmanager
def recorded_until_learned(run_dir: str | Path, added: Sequence[AddedSession]) -> Iterator[None]:
    """Record ``added`` for the duration of a training call; when that call fails before the
    added session's checkpoint is written, the run's previous record is put back, so a failed
    ``--add-session`` leaves the run folder as it was (rerun the same command)."""
    path = RunDir(run_dir).added_sessions_file
    previous = path.read_bytes() if path.is_file() else None
    write_added_sessions(run_dir, added)
    try:
        yield
    except BaseException:
        folder = latest_checkpoint(Path(run_dir))
        learned = folder is not None and folder.name == checkpoint_name(added[-1].index)
        if not learned:
            try:
                if previous is None:
                    path.unlink(missing_ok=True)
                else:  # a new file renamed into place: never written through a link
                    write_atomic(path, lambda handle: handle.write(previous))
            except OSError as error:  # e.g. the disk is still full: the record stays pending
                logger.warning("could not restore %s: %s", path, error)
        raise


class ConcatImageSource(ImageSource):
    """Several sources one after the other, with their labels re-expressed over one class list.

    A column of ``class_names`` takes the part's column of the same name, or zeros when the part
    does not name that class; the part's other columns are dropped.
    """

    def __init__(
        self, parts: Sequence[ImageSource], class_names: Sequence[str], split: str
    ) -> None:
        self.parts = list(parts)
        self.dataset = self.parts[0].dataset
        self.split = split
        self.class_names = list(class_names)
        self.labels = np.concatenate([remap_labels(part, self.class_names) for part in parts])
        self.image_refs = [ref for part in self.parts for ref in part.image_refs]
        self.label_density = self.parts[0].label_density
        self.offsets = np.cumsum([0, *(len(part) for part in self.parts)])
        self._check()

    def load_image(self, index: int) -> Image.Image:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part].load_image(index - int(self.offsets[part]))


def remap_labels(source: ImageSource, class_names: Sequence[str]) -> np.ndarray:
    """``source.labels`` with one column per name of ``class_names`` (0 where it has none)."""
    columns = {name: column for column, name in enumerate(source.class_names)}
    labels = np.zeros((len(source), len(class_names)), dtype=np.uint8)
    for target, name in enumerate(class_names):
        if name in columns:
            labels[:, target] = source.labels[:, columns[name]]
    return labels


def extended_plan(plan: RunPlan, added: Sequence[AddedSession]) -> RunPlan:
    """``plan`` with the added sessions, their classes and their data (a new plan)."""
    if not added:
        return plan
    first = added[0].index
    if not 0 < first <= len(plan.sessions):
        raise ConfigError(
            f"{ADDED_FILE}: the first added session has index {first}, but the run's protocol "
            f"has {len(plan.sessions)} sessions"
        )
    sessions = list(plan.sessions[:first])
    names = [plan.class_names[c] for c in sessions[-1].seen_classes]
    for item in added:
        if item.index != len(sessions):
            raise ConfigError(
                f"{ADDED_FILE}: added session index {item.index}, expected {len(sessions)}"
            )
        clash = [name for name in item.classes if name in names]
        if clash or not item.classes:
            raise ConfigError(f"{ADDED_FILE}: session {item.index} brings no new class {clash}")
        new = list(range(len(names), len(names) + len(item.classes)))
        names.extend(item.classes)
        sessions.append(Session(item.index, new, list(range(len(names)))))
    train_parts = [plan.train_source]
    test_parts = [plan.test_source]
    for item in added:
        train_parts.append(load_manifest(item.train_manifest, "train", names))
        if item.test_manifest is not None:
            test_parts.append(load_manifest(item.test_manifest, "test", names))
    return RunPlan(
        ConcatImageSource(train_parts, names, "train"),
        ConcatImageSource(test_parts, names, "test"),
        tuple(names),
        tuple(sessions),
    )


def annotate_metrics(run_dir: str | Path, metrics: RunMetrics) -> RunMetrics:
    """Record a run's added sessions in its record (``added_sessions``) and ``metrics.json``,
    so that a report reader sees that its last sessions are not its protocol's. No-op without
    any, or when the record already holds them."""
    added = [
        AddedSessionEntry.model_validate(item.to_json()) for item in read_added_sessions(run_dir)
    ]
    if not added or metrics.added_sessions == added:
        return metrics
    metrics.added_sessions = added
    write_results(Path(run_dir), metrics)
    return metrics


def run_plan(
    run_dir: str | Path, config: RunConfig, added: Sequence[AddedSession] | None = None
) -> RunPlan:
    """The plan of an existing run folder: its config's, extended by its added sessions
    (``added``, default those recorded in the folder)."""
    added = read_added_sessions(run_dir) if added is None else added
    return extended_plan(RunPlan.from_config(config), added)


def learned_sessions(folder: Path) -> int:
    """How many sessions the run had learned at a checkpoint folder."""
    state = read_state(folder)
    try:
        return int(state["next_session"])
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(
            f"{folder / 'state.json'}: malformed checkpoint state: {error!r}"
        ) from None


def plan_added_session(
    run_dir: str | Path,
    config: RunConfig,
    learned_sessions: int,
    train_manifest: str | Path,
    test_manifest: str | Path | None,
) -> tuple[RunPlan, list[AddedSession]]:
    """Check a session to add after the run's first ``learned_sessions`` sessions.

    Added sessions the run has not learned yet (an earlier ``--add-session`` that failed) are
    replaced. Everything is validated (manifests, labels, image files) before anything is
    written.

    Returns:
        The extended plan and the full list of added sessions to record.

    Raises:
        DataError: naming the manifest when it is missing, malformed, brings no new label, or
            its test manifest names a class that is neither known nor brought.
    """
    for path in (train_manifest, test_manifest):
        if path is not None and not Path(path).is_file():
            raise DataError(f"--add-session: manifest {path} does not exist")
    kept = [item for item in read_added_sessions(run_dir) if item.index < learned_sessions]
    base = RunPlan.from_config(config)
    kept_plan = extended_plan(base, kept)
    if learned_sessions < len(kept_plan.sessions):
        logger.warning(
            "%s learned %d of its %d sessions; the remaining sessions are dropped and the run "
            "continues with the added one",
            run_dir,
            learned_sessions,
            len(kept_plan.sessions),
        )
    seen = kept_plan.sessions[learned_sessions - 1].seen_classes
    known = [kept_plan.class_names[c] for c in seen]
    new = new_labels_in_order(train_manifest, known)
    if not new:
        raise DataError(
            f"--add-session: {train_manifest} brings no label the run has not learned (it knows "
            f"{len(known)} classes: {', '.join(known[:10])}{'...' if len(known) > 10 else ''})"
        )
    item = AddedSession(
        index=learned_sessions,
        classes=tuple(new),
        train_manifest=os.path.abspath(train_manifest),
        test_manifest=None if test_manifest is None else os.path.abspath(test_manifest),
    )
    added = [*kept, item]
    return extended_plan(base, added), added
