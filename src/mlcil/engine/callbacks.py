"""Session callbacks: how the features built above the engine (diagnostics, ``--overwrite``,
pretrained-weights provenance) take part in a run without the engine importing them.

Every hook has a no-op default; a callback overrides the ones it needs. They are called in the
order the callbacks were given, on every process (a callback that writes files checks
``runtime.is_main`` itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mlcil.protocol import Session

if TYPE_CHECKING:
    from mlcil.engine.checkpoint import RunState
    from mlcil.rundir import RunDir


class SessionCallback:
    """Hooks into a run's sessions (all no-ops by default)."""

    def session_starting(
        self, run: RunDir, state: RunState, session: Session, resumed: bool
    ) -> None:
        """Before the method begins ``session`` (``resumed``: inside it, from a mid-session
        checkpoint; the network already holds the session's growth)."""

    def session_evaluated(
        self, state: RunState, session: Session, own: np.ndarray, result: dict[str, Any]
    ) -> None:
        """After the session's memory update and evaluation, before the method's end of
        session; ``result`` (the session's ``metrics.json`` entry) may be added to."""

    def checkpoint_written(self, folder: Path) -> None:
        """After a checkpoint folder is complete and ``latest`` names it (main process)."""

    def header_ready(self, header: dict[str, Any]) -> None:
        """Before ``metrics.json`` is assembled; ``header`` (its first keys) may be added to."""


class Callbacks(SessionCallback):
    """Several callbacks called in order."""

    def __init__(self, callbacks: Sequence[SessionCallback] = ()) -> None:
        self.callbacks = list(callbacks)

    def session_starting(
        self, run: RunDir, state: RunState, session: Session, resumed: bool
    ) -> None:
        for callback in self.callbacks:
            callback.session_starting(run, state, session, resumed)

    def session_evaluated(
        self, state: RunState, session: Session, own: np.ndarray, result: dict[str, Any]
    ) -> None:
        for callback in self.callbacks:
            callback.session_evaluated(state, session, own, result)

    def checkpoint_written(self, folder: Path) -> None:
        for callback in self.callbacks:
            callback.checkpoint_written(folder)

    def header_ready(self, header: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.header_ready(header)
